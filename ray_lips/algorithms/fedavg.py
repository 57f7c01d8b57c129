"""FedAvg (McMahan et al., 2017): clients train from the global model, the server averages their
models weighted by sample counts. The base class is exactly this."""

from __future__ import annotations

from ray_lips.algorithms.base import Algorithm


class FedAvg(Algorithm):
    name = "fedavg"
    label = "FedAvg"
    order = 0
