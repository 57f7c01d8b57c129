"""How the new global model reaches each client: ``dense`` (the model itself) or ``lips``
(LIPS's transiently sparse copy, with its ``sparsify`` masks and density ``schedule``)."""
