"""FedPer (Arivazhagan et al., 2019): the body is federated, the last layers stay personal.

The last ``fedper.personal_layers`` parameter-owning layers (by default the classifier) never
leave the client: the server averages the body only, and each client trains and holds the
shared body with its own head. There is no global model to score (acc_global is NaN); the
global state's head entries stay at their initial values, unused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from ray_lips.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientUpdate,
    Tensors,
    Trained,
    TrainJob,
)
from ray_lips.models import layer_groups

if TYPE_CHECKING:
    from ray_lips.config import ExperimentConfig

HEAD = "fedper.head"  # the client-state slot of the personal layers


class FedPer(Algorithm):
    name = "fedper"
    has_global_model = False
    sparse_handout = False
    client_slots = (HEAD,)

    def __init__(self, cfg: ExperimentConfig, model: nn.Module):
        super().__init__(cfg, model)
        groups = layer_groups(model)[-cfg.fedper.personal_layers:]
        prefixes = tuple(f"{g.name}." for g in groups)
        self.personal = [k for k in model.state_dict() if k.startswith(prefixes)]

    def shared(self, state: Tensors) -> Tensors:
        return {k: v for k, v in state.items() if k not in self.personal}

    def held_state(self, ctx: ClientContext, client: int) -> Tensors:
        head = ctx.store.get(client, HEAD)
        handed = ctx.handed(client)
        return handed if head is None else {**handed, **head}

    def start_state(self, ctx: ClientContext, client: int) -> Tensors:
        return self.held_state(ctx, client)

    def update(self, ctx: ClientContext, job: TrainJob, trained: Trained,
               message: Mapping[str, Tensors]) -> ClientUpdate:
        ctx.store.put(job.client, HEAD, {k: trained.state[k] for k in self.personal})
        return super().update(ctx, job, trained, message)
