"""FedBN (Li et al., ICLR 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization"): FedAvg with every BatchNorm layer kept local.

Each client keeps its BatchNorm weights, biases and running statistics (and batch counter):
they never leave it, it starts every round from the averaged rest of the model with its own
BatchNorm laid over it, and it holds that model between rounds. Everything else is averaged as
in FedAvg. The global model's BatchNorm entries stay at their initial values (weight 1, bias
0, statistics 0 and 1), so the global model is not one a client would use: there is no global
model to score (acc_global is NaN). On a model without BatchNorm it is FedAvg, bit for bit.
The LIPS hand-out composes with it: it sparsifies convolutions, which every client receives
from the server (BatchNorm is never eligible).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_lips.algorithms.base import (
    GLOBAL_BODY,
    Algorithm,
    AlgorithmOptions,
    LocalSettings,
)

if TYPE_CHECKING:
    from torch import nn

BATCHNORM = "fedbn.batchnorm"  # the client-state slot of a client's BatchNorm layers


class FedBN(Algorithm):
    name = "fedbn"
    label = "FedBN"
    order = 25
    family = GLOBAL_BODY  # averaged model, its own BatchNorm layers
    has_global_model = False
    client_slots = (BATCHNORM,)
    local_slot = BATCHNORM

    def __init__(self, options: AlgorithmOptions, settings: LocalSettings, model: nn.Module):
        from ray_lips.models import batchnorm_entry_names

        super().__init__(options, settings, model)
        self.local = frozenset(batchnorm_entry_names(model))
