"""FedPer (Arivazhagan et al., 2019): the body is federated, the last layers stay personal.

The last ``fedper.personal_layers`` parameter-owning layers (by default the classifier) never
leave the client: the server averages the body only, and each client trains and holds the
shared body with its own head. There is no global model to score (acc_global is NaN); the
global state's head entries stay at their initial values, unused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ray_lips.algorithms.base import (
    Algorithm,
    AlgorithmOptions,
    ClientRound,
    ClientUpdate,
    ClientView,
    LocalSettings,
    Tensors,
    Trained,
    TrainJob,
)

if TYPE_CHECKING:
    from torch import nn

HEAD = "fedper.head"  # the client-state slot of the personal layers


class FedPer(Algorithm):
    name = "fedper"
    label = "FedPer"
    order = 30
    has_global_model = False
    sparse_handout = False
    client_slots = (HEAD,)

    class Options(AlgorithmOptions):
        personal_layers: int = Field(1, ge=1)  # trailing parameter-owning layers kept local

    options: Options

    def __init__(self, options: Options, settings: LocalSettings, model: nn.Module):
        from ray_lips.models import layer_groups

        super().__init__(options, settings, model)
        groups = layer_groups(model)[-options.personal_layers:]
        prefixes = tuple(f"{g.name}." for g in groups)
        self.personal = [k for k in model.state_dict() if k.startswith(prefixes)]

    def shared(self, state: Tensors) -> Tensors:
        return {k: v for k, v in state.items() if k not in self.personal}

    def held_state(self, view: ClientView, client: int) -> Tensors:
        head = view.store.get(client, HEAD)
        handed = view.handed(client)
        return handed if head is None else {**handed, **head}

    def start_state(self, round: ClientRound, client: int) -> Tensors:
        return self.held_state(round, client)

    def update(self, round: ClientRound, job: TrainJob, trained: Trained) -> ClientUpdate:
        round.store.put(job.client, HEAD, {k: trained.state[k] for k in self.personal})
        return super().update(round, job, trained)
