"""Local-only training: no communication. Every client trains its own model, from the common
initial model, for the same rounds and epochs as the federated algorithms; nothing is
aggregated and there is no global model (acc_global and acc_test are NaN)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ray_lips.algorithms.base import (
    PERSONAL_MODELS,
    Algorithm,
    ClientRound,
    ClientUpdate,
    ClientView,
    Tensors,
    Trained,
    TrainJob,
)

if TYPE_CHECKING:
    import torch

OWN = "local.model"  # the client-state slot of the client's own model


class LocalOnly(Algorithm):
    name = "local"
    label = "Local only"
    order = 50
    family = PERSONAL_MODELS
    has_global_model = False
    sparse_handout = False
    client_slots = (OWN,)

    def held_state(self, view: ClientView, client: int) -> Tensors:
        own = view.store.get(client, OWN)
        return view.global_state if own is None else own  # the initial model until it trains

    def start_state(self, round: ClientRound, client: int) -> Tensors:
        return self.held_state(round, client)

    def update(self, round: ClientRound, job: TrainJob, trained: Trained) -> ClientUpdate:
        round.store.put(job.client, OWN, trained.state)
        return ClientUpdate(job.client, trained.result.loss, {}, trained.result.last_grads,
                            trained.accuracy)

    def aggregate(self, global_state: Tensors, averages: Mapping[str, Tensors],
                  server_state: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return dict(global_state), dict(server_state)
