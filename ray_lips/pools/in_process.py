"""Groups of client pools behind one typed interface: in-process objects or Ray actors.

A group starts in two steps: the factory starts the pools empty (as Ray actors, their
processes import torch meanwhile), and ``load`` gives each its clients once the driver has
prepared the data. Each step of a round is then one method: every pool gets its own request
(and the arguments all pools share), runs in parallel where the backend allows, and the replies
come back in pool order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import torch

from ray_lips.algorithms.base import Tensors
from ray_lips.config import ExperimentConfig
from ray_lips.pools.client_pool import ClientPool, pool_threads
from ray_lips.pools.client_store import EntryInfo
from ray_lips.pools.messages import (
    HandoutReply,
    HandoutRequest,
    PoolDevice,
    StatePartReply,
    StatePartRequest,
    TrainReply,
    TrainRequest,
)
from ray_lips.pools.payload import PoolPayload

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

    def devices(self) -> list[PoolDevice]:
        """Each loaded pool's device (e.g. ``cpu``, ``cuda:0 (NVIDIA H100 ...)``), node, GPU ids
        and CUDA_VISIBLE_DEVICES, as the pool saw them when it was loaded; no call to a pool."""
        ...

    def shutdown(self) -> None: ...


PoolFactory = Callable[[ExperimentConfig], PoolGroup]  # starts ``cfg.resources.pools`` pools


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside, the caller's again afterwards."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class LocalPools:
    """All pools in this process, called one after another: the no-Ray training path.

    Each call runs with the threads a Ray pool of the same config has (``cpus_per_pool``, see
    ``pool_threads``), so the numbers are the same in one process as on Ray; the caller's
    thread count is restored after each call.
    """

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.pools: list[ClientPool] = []
        self.size = cfg.resources.pools
        self.threads = pool_threads(cfg.resources)

    def _threads(self) -> AbstractContextManager[None]:
        return torch_threads(self.threads)

    def load(self, payloads: list[PoolPayload]) -> None:
        with self._threads():
            self.pools = [ClientPool(self.cfg, payload) for payload in payloads]

    def set_global(self, round_idx: int, state: Tensors, density: float) -> None:
        with self._threads():
            for pool in self.pools:
                pool.set_global(round_idx, state, density)

    def train_round(self, requests: list[TrainRequest],
                    message: dict[str, Tensors]) -> list[TrainReply]:
        with self._threads():
            return [pool.train_round(request, message)
                    for pool, request in zip(self.pools, requests, strict=True)]

    def handout(self, requests: list[HandoutRequest], state: Tensors) -> list[HandoutReply]:
        with self._threads():
            return [pool.handout(request, state)
                    for pool, request in zip(self.pools, requests, strict=True)]

    def finetune(self, round_idx: int, epochs: int) -> list[list[dict[str, Any]]]:
        with self._threads():
            return [pool.finetune(round_idx, epochs) for pool in self.pools]

    def state_index(self) -> list[list[EntryInfo]]:
        return [pool.state_index() for pool in self.pools]

    def sees(self, path: str) -> list[bool]:
        return [pool.sees(path) for pool in self.pools]

    def save_state(self, requests: list[StatePartRequest]) -> list[StatePartReply]:
        with self._threads():
            return [pool.save_state(request)
                    for pool, request in zip(self.pools, requests, strict=True)]

    def import_state(self, states: list[ClientState]) -> None:
        with self._threads():
            for pool, state in zip(self.pools, states, strict=True):
                pool.import_state(state)

    def stats(self) -> list[dict[str, float]]:
        return [pool.stats() for pool in self.pools]

    def devices(self) -> list[PoolDevice]:
        return [pool.device_info() for pool in self.pools]

    def shutdown(self) -> None:
        self.pools = []


def local_pools(cfg: ExperimentConfig) -> LocalPools:
    return LocalPools(cfg)
