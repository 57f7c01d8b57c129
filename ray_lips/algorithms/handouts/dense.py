"""The hand-out: how the new global model reaches each client after aggregation.

``DenseHandout`` gives every client the global model itself. LIPS's transient sparse copy
(:mod:`ray_lips.algorithms.handouts.lips`) is the other one. A hand-out has a server side (the
density
of each round's hand-out, from its schedule) and a client side (the model a client is handed,
built in the pool that hosts it, from what the client kept of its own training).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, ClassVar

import torch

from ray_lips.algorithms.base import Tensors
from ray_lips.core.traffic import state_bytes

if TYPE_CHECKING:
    from ray_lips.pools.client_store import ClientStore


class DenseHandout:
    """Every client receives the global model unchanged."""

    name = "dense"
    remember: list[str] | None = None  # parameters whose last-batch gradient must be kept
    remember_mean: bool = False  # keep the last epoch's mean gradient instead (epoch_mean)
    score_part: str | None = None  # the aggregated part of a shared mask's score (LIPS shared)
    client_slots: ClassVar[tuple[str, ...]] = ()  # the ClientStore slots it keeps

    # ----- server side --------------------------------------------------------------------
    def density(self, round_idx: int) -> float:
        return 1.0

    # ----- client side --------------------------------------------------------------------
    def start_round(self, round_idx: int, density: float,
                    score: Tensors | None = None) -> None:
        """The hand-out after round ``round_idx`` is made with ``density`` (and, for a shared
        mask, the participants' summed ``score`` from :attr:`score_part`)."""

    def wants_score(self, round_idx: int) -> bool:
        """Whether the trained clients of ``round_idx`` add to :attr:`score_part`."""
        return False

    def score_of(self, grads: Tensors) -> Tensors:
        """What a trained client adds to :attr:`score_part` (weight 1), from its gradients."""
        raise NotImplementedError(f"the {self.name} hand-out aggregates no score")

    def handed(self, global_state: Tensors, client: int, store: ClientStore) -> Tensors:
        return global_state

    def handed_bytes(self, global_state: Tensors, clients: list[int], store: ClientStore,
                     skip: Collection[str] = ()) -> dict[int, int]:
        """Bytes each of ``clients`` downloads for what :meth:`handed` gives it, from shapes
        alone (no copy is built); entries in ``skip`` stay on the client and are not sent."""
        return dict.fromkeys(clients, state_bytes(global_state, skip))

    def keep(self, store: ClientStore, grads: dict[int, dict[str, torch.Tensor]]) -> None:
        """Keep what this round's participants' training left for the next hand-out."""

    def unneeded_slots(self) -> set[str]:
        """Client-state slots the next hand-out does not read (left out of checkpoints)."""
        return set()
