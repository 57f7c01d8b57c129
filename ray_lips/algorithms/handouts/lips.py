"""LIPS's hand-out: each client gets a transiently sparse copy of the new global model.

In a sparsity round (r % T == 0 for the periodic schedules; when the inertia trigger fires for
``lips.schedule: inertia``) client k keeps, in every eligible tensor (every convolution
but the stem), the top floor(d_r * numel) entries ranked by its scorer (the reference:
|g_k * w|, its own last-batch gradient times the new global weight) and zeroes the rest. The
next round trains densely, so the zeros regrow. The gradient never leaves the pool: the pool
keeps each participant's fp16 last-batch gradient until the next hand-out, and a client that did
not train in the round has none and receives the dense model.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import torch

from ray_lips.algorithms.base import Tensors
from ray_lips.algorithms.handouts.dense import DenseHandout
from ray_lips.algorithms.handouts.schedule import density_at
from ray_lips.algorithms.handouts.sparsify import GRADIENT_SCORERS, keep_count, sparsify_state
from ray_lips.core.seeding import torch_generator
from ray_lips.core.traffic import sparse_copy_bytes, state_bytes
from ray_lips.models import check_lips_eligible

if TYPE_CHECKING:
    from ray_lips.config import ExperimentConfig
    from ray_lips.pools.client_store import ClientStore

GRADIENT = "lips.grad"  # the client-state slot of the remembered gradient
LEGACY_CLIENT_SLOTS = {"grads": GRADIENT}  # checkpoints written before the slots had names


class LipsHandout(DenseHandout):
    name = "lips"
    client_slots = (GRADIENT,)

    def __init__(self, cfg: ExperimentConfig, eligible: list[str]):
        check_lips_eligible(eligible, cfg.model)
        cfg.lips.check_rounds(cfg.train.rounds)
        self.cfg = cfg
        self.eligible = eligible
        self.remember = eligible if cfg.lips.scorer in GRADIENT_SCORERS else None
        self.round_idx, self.current_density = -1, 1.0

    def density(self, round_idx: int) -> float:
        """The periodic schedules' density; ``inertia``'s comes from the driver's trigger
        (:class:`ray_lips.core.inertia.InertiaTrigger`), which this raises for."""
        lips = self.cfg.lips
        return density_at(round_idx, self.cfg.train.rounds, lips.sparsity, lips.period,
                          lips.schedule, lips.step_round)

    def start_round(self, round_idx: int, density: float) -> None:
        self.round_idx, self.current_density = round_idx, density

    def handed(self, global_state: Tensors, client: int, store: ClientStore) -> Tensors:
        if self.current_density >= 1.0:
            return global_state
        grads = store.get(client, GRADIENT) if self.remember is not None else None
        if self.remember is not None and grads is None:
            return global_state  # did not train in that round: it gets the dense model
        generator = None
        if self.cfg.lips.scorer == "random":
            generator = torch_generator(self.cfg.seed, "scorer", client, self.round_idx)
        return sparsify_state(global_state, self.eligible, self.current_density,
                              self.cfg.lips.scorer, grads, generator)

    def handed_bytes(self, global_state: Tensors, clients: list[int], store: ClientStore,
                     skip: Collection[str] = ()) -> dict[int, int]:
        """A sparse copy's eligible tensors count their kept values plus a bitmap (each where
        smaller than dense): top-k keeps exactly floor(d * numel) entries, so no mask is built
        and no gradient read; the clients :meth:`handed` gives the dense model count it."""
        dense = state_bytes(global_state, skip)
        if self.current_density >= 1.0:
            return dict.fromkeys(clients, dense)
        kept = {name: keep_count(global_state[name].numel(), self.current_density)
                for name in self.eligible}
        sparse = sparse_copy_bytes(global_state, kept, skip)
        if self.remember is None:
            return dict.fromkeys(clients, sparse)
        trained = set(store.clients(GRADIENT))
        return {c: sparse if c in trained else dense for c in clients}

    def keep(self, store: ClientStore, grads: dict[int, dict[str, torch.Tensor]]) -> None:
        if self.remember is not None:
            store.replace_slot(GRADIENT, grads)

    def unneeded_slots(self) -> set[str]:
        return {GRADIENT} if self.current_density >= 1.0 else set()
