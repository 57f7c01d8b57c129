"""LIPS's hand-out: each client gets a transiently sparse copy of the new global model.

In a sparsity round (r % T == 0 for the periodic schedules; when the inertia trigger fires for
``lips.schedule: inertia``) client k keeps, in every eligible tensor (every convolution
but the stem), the top floor(d_r * numel) entries ranked by its scorer (the reference:
|g_k * w|, its own last-batch gradient times the new global weight) and zeroes the rest. The
next round trains densely, so the zeros regrow. The gradient never leaves the pool: the pool
keeps each participant's fp16 last-batch gradient until the next hand-out, and a client that did
not train in the round has none and receives the dense model.

Two variants (defaults: the reference). ``lips.gradient: epoch_mean`` remembers the mean of the
same per-step gradient over the last local epoch instead of its last mini-batch. ``lips.mask:
shared`` hands every client ONE sparse copy, ranked by |w| * sum_k |g_k| (= sum_k |g_k * w|)
over the round's participants: each trained client adds its fp16 |g_k| to the aggregated part
:data:`SHARED_SCORE` with weight 1 (fp16 values lie on the 2^-32 fixed-point grid, so the sum
is exact and the same for any pooling), the driver takes that part out of the averages and
sends the sum with the new global model; every client, trained in the round or not, then
receives the same sparse copy.
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
SHARED_SCORE = "lips.score"  # the aggregated part of sum_k |g_k| (lips.mask: shared)
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
        self.remember_mean = self.remember is not None and cfg.lips.gradient == "epoch_mean"
        self.shared = cfg.lips.mask == "shared"
        self.score_part = SHARED_SCORE if self.shared and self.remember is not None else None
        self.round_idx, self.current_density = -1, 1.0
        self.score: Tensors | None = None  # shared mask: the participants' summed |g|
        self._shared_copy: tuple[Tensors, Tensors] | None = None  # (global state, its copy)

    def density(self, round_idx: int) -> float:
        """The periodic schedules' density; ``inertia``'s comes from the driver's trigger
        (:class:`ray_lips.core.inertia.InertiaTrigger`), which this raises for."""
        lips = self.cfg.lips
        return density_at(round_idx, self.cfg.train.rounds, lips.sparsity, lips.period,
                          lips.schedule, lips.step_round)

    def start_round(self, round_idx: int, density: float,
                    score: Tensors | None = None) -> None:
        self.round_idx, self.current_density = round_idx, density
        self.score, self._shared_copy = score, None

    def wants_score(self, round_idx: int) -> bool:
        """A shared mask's score is summed in the rounds whose hand-out may be sparse: those
        of the periodic schedules' sparsity rounds, every round of ``inertia`` (decided once
        the round is measured)."""
        if self.score_part is None:
            return False
        return self.cfg.lips.schedule == "inertia" or self.density(round_idx) < 1.0

    def score_of(self, grads: Tensors) -> Tensors:
        """A trained client's share of the shared mask's score: |g_k| of its stored gradient."""
        return {name: grads[name].abs() for name in self.eligible}

    def handed(self, global_state: Tensors, client: int, store: ClientStore) -> Tensors:
        if self.current_density >= 1.0:
            return global_state
        if self.shared:
            return self._shared(global_state)
        grads = store.get(client, GRADIENT) if self.remember is not None else None
        if self.remember is not None and grads is None:
            return global_state  # did not train in that round: it gets the dense model
        generator = None
        if self.cfg.lips.scorer == "random":
            generator = torch_generator(self.cfg.seed, "scorer", client, self.round_idx)
        return sparsify_state(global_state, self.eligible, self.current_density,
                              self.cfg.lips.scorer, grads, generator)

    def _shared(self, global_state: Tensors) -> Tensors:
        """The one sparse copy every client receives (built once per hand-out); the dense
        model when a gradient scorer has no score (nobody trained)."""
        if self._shared_copy is not None and self._shared_copy[0] is global_state:
            return self._shared_copy[1]
        if self.remember is not None and self.score is None:
            return global_state
        generator = None
        if self.cfg.lips.scorer == "random":  # one stream for all clients: keyed by round only
            generator = torch_generator(self.cfg.seed, "scorer", self.round_idx)
        copy = sparsify_state(global_state, self.eligible, self.current_density,
                              self.cfg.lips.scorer, self.score, generator)
        self._shared_copy = (global_state, copy)
        return copy

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
        if self.remember is None or (self.shared and self.score is not None):
            return dict.fromkeys(clients, sparse)
        if self.shared:  # no score: the dense model for all
            return dict.fromkeys(clients, dense)
        trained = set(store.clients(GRADIENT))
        return {c: sparse if c in trained else dense for c in clients}

    def keep(self, store: ClientStore, grads: dict[int, dict[str, torch.Tensor]]) -> None:
        if self.remember is not None and not self.shared:  # shared: in the aggregated score
            store.replace_slot(GRADIENT, grads)

    def unneeded_slots(self) -> set[str]:
        return {GRADIENT} if self.current_density >= 1.0 else set()
