"""ray-lips: federated LIPS and FedAvg experiments on Ray."""

from ray_lips import moved

__version__ = "0.1.0"

moved.install()  # import paths from before the layout of folders keep working
