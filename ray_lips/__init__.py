"""ray-lips: federated LIPS and FedAvg experiments on Ray."""

__version__ = "0.1.0"
