"""How the new global model reaches each client: ``dense`` (the model itself), ``lips``
(LIPS's transiently sparse copy, with its ``sparsify`` masks and density ``schedule``) or
``freeze`` (dense, while stalled layers are frozen: :mod:`ray_lips.core.freeze`)."""
