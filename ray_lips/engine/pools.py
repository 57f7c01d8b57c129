"""Groups of client pools behind one typed interface: in-process objects or Ray actors.

A group starts in two steps: the factory starts the pools empty (as Ray actors, their
processes import torch meanwhile), and ``load`` gives each its clients once the driver has
prepared the data. Each step of a round is then one method: every pool gets its own request
(and the arguments all pools share), runs in parallel where the backend allows, and the replies
come back in pool order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ray_lips.algorithms.base import Tensors
from ray_lips.config import ExperimentConfig
from ray_lips.engine.client_state import EntryInfo
from ray_lips.engine.messages import (
    HandoutReply,
    HandoutRequest,
    StatePartReply,
    StatePartRequest,
    TrainReply,
    TrainRequest,
)
from ray_lips.engine.payload import PoolPayload
from ray_lips.engine.pool import ClientPool

ClientState = dict[str, dict[int, Tensors]]  # slot -> client -> tensors


class PoolGroup(Protocol):
    size: int

    def load(self, payloads: list[PoolPayload]) -> None:
        """Give pool i the clients of ``payloads[i]``; returns once every pool holds them."""
        ...

    def set_global(self, round_idx: int, state: Tensors, density: float) -> None: ...

    def train_round(self, requests: list[TrainRequest],
                    message: dict[str, Tensors]) -> list[TrainReply]: ...

    def handout(self, requests: list[HandoutRequest], state: Tensors) -> list[HandoutReply]: ...

    def finetune(self, round_idx: int, epochs: int) -> list[list[dict[str, Any]]]: ...

    def state_index(self) -> list[list[EntryInfo]]:
        """Each pool's client state entries (what a checkpoint must hold), with sizes."""
        ...

    def sees(self, path: str) -> list[bool]:
        """Whether each pool sees the file at ``path`` (and so can write beside it)."""
        ...

    def save_state(self, requests: list[StatePartRequest]) -> list[StatePartReply]:
        """Pool i writes or sends the entries ``requests[i]`` names: one checkpoint part."""
        ...

    def import_state(self, states: list[ClientState]) -> None:
        """Adds ``states[i]``'s entries to pool i (of its own clients)."""
        ...

    def stats(self) -> list[dict[str, float]]: ...

    def shutdown(self) -> None: ...


PoolFactory = Callable[[ExperimentConfig], PoolGroup]  # starts ``cfg.resources.pools`` pools


class LocalPools:
    """All pools in this process, called one after another: the no-Ray training path."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.pools: list[ClientPool] = []
        self.size = cfg.resources.pools

    def load(self, payloads: list[PoolPayload]) -> None:
        self.pools = [ClientPool(self.cfg, payload) for payload in payloads]

    def set_global(self, round_idx: int, state: Tensors, density: float) -> None:
        for pool in self.pools:
            pool.set_global(round_idx, state, density)

    def train_round(self, requests: list[TrainRequest],
                    message: dict[str, Tensors]) -> list[TrainReply]:
        return [pool.train_round(request, message)
                for pool, request in zip(self.pools, requests, strict=True)]

    def handout(self, requests: list[HandoutRequest], state: Tensors) -> list[HandoutReply]:
        return [pool.handout(request, state)
                for pool, request in zip(self.pools, requests, strict=True)]

    def finetune(self, round_idx: int, epochs: int) -> list[list[dict[str, Any]]]:
        return [pool.finetune(round_idx, epochs) for pool in self.pools]

    def state_index(self) -> list[list[EntryInfo]]:
        return [pool.state_index() for pool in self.pools]

    def sees(self, path: str) -> list[bool]:
        return [pool.sees(path) for pool in self.pools]

    def save_state(self, requests: list[StatePartRequest]) -> list[StatePartReply]:
        return [pool.save_state(request)
                for pool, request in zip(self.pools, requests, strict=True)]

    def import_state(self, states: list[ClientState]) -> None:
        for pool, state in zip(self.pools, states, strict=True):
            pool.import_state(state)

    def stats(self) -> list[dict[str, float]]:
        return [pool.stats() for pool in self.pools]

    def shutdown(self) -> None:
        self.pools = []


def local_pools(cfg: ExperimentConfig) -> LocalPools:
    return LocalPools(cfg)
