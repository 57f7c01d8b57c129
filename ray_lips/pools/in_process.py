"""Groups of client pools behind one typed interface: in-process objects or Ray actors.

A group starts in two steps: the factory starts the pools empty (as Ray actors, their
processes import torch meanwhile), and ``load`` gives each its clients once the driver has
prepared the data. Each step of a round is then one method: every pool gets its own request
(and the arguments all pools share), runs in parallel where the backend allows, and the replies
come back in pool order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from ray_lips.algorithms.base import Tensors
from ray_lips.config import ExperimentConfig
from ray_lips.pools.client_pool import ClientPool, pool_threads
from ray_lips.pools.client_store import EntryInfo
from ray_lips.pools.messages import (
    HandoutReply,
    HandoutRequest,
    PoolCall,
    PoolDevice,
    StatePartReply,
    StatePartRequest,
    TrainReply,
    TrainRequest,
)
from ray_lips.pools.payload import PoolPayload

ClientState = dict[str, dict[int, Tensors]]  # slot -> client -> tensors


# Fine-tuning scores each client four times and recalibrates its BN statistics (forward
# passes only): counted as this many epochs of training when bounding its first call.
FINETUNE_EVALUATION_EPOCHS = 2


class PoolGroup(ABC):
    """The client pools of a run, one step of a round for all of them at once: every step is
    a ``PoolCall`` that ``call`` runs (``LocalPools``: in this process; ``RayPools``: on Ray
    actors), with the replies in pool order. The steps are listed here, once."""

    cfg: ExperimentConfig
    size: int
    hosted: list[int]  # clients per pool, once loaded

    @abstractmethod
    def load(self, payloads: list[PoolPayload]) -> None:
        """Give pool i the clients of ``payloads[i]``; returns once every pool holds them."""

    @abstractmethod
    def call(self, call: PoolCall) -> list[Any]:
        """Every pool's reply to ``call``, in pool order."""

    @abstractmethod
    def devices(self) -> list[PoolDevice]:
        """Each loaded pool's device (e.g. ``cpu``, ``cuda:0 (NVIDIA H100 ...)``), node, GPU ids
        and CUDA_VISIBLE_DEVICES, as the pool saw them when it was loaded; no call to a pool."""

    @abstractmethod
    def shutdown(self) -> None: ...

    def set_global(self, round_idx: int, state: Tensors, density: float,
                   score: Tensors | None = None) -> None:
        extra = () if score is None else (score,)  # a shared mask's summed score
        self.call(PoolCall(ClientPool.set_global, "set_global",
                           shared=(round_idx, state, density, *extra)))

    def train_round(self, requests: list[TrainRequest],
                    message: dict[str, Tensors]) -> list[TrainReply]:
        busiest = max((len(request.participants) for request in requests), default=0)
        return self.call(PoolCall(ClientPool.train_round, "training", requests, (message,),
                                  busiest * self.cfg.train.local_epochs))

    def handout(self, requests: list[HandoutRequest], state: Tensors,
                score: Tensors | None = None) -> list[HandoutReply]:
        """Pool i hands out ``state`` per ``requests[i]``; ``score``: a shared mask's summed
        score, sent only when the hand-out needs it."""
        evaluates = any(r.eval_test or r.eval_clients for r in requests)
        extra = () if score is None else (score,)
        return self.call(PoolCall(ClientPool.handout, "hand-out with evaluation" if evaluates
                                  else "hand-out", requests, (state, *extra)))

    def finetune(self, epochs: int) -> list[list[dict[str, Any]]]:
        # each client fine-tunes ``epochs`` and is scored about as often as an epoch costs
        work = max(self.hosted, default=0) * (epochs + FINETUNE_EVALUATION_EPOCHS)
        return self.call(PoolCall(ClientPool.finetune, "fine-tuning", shared=(epochs,),
                                  work=work))

    def state_index(self) -> list[list[EntryInfo]]:
        """Each pool's client state entries (what a checkpoint must hold), with sizes."""
        return self.call(PoolCall(ClientPool.state_index, "state index"))

    def sees(self, path: str) -> list[bool]:
        """Whether each pool sees the file at ``path`` (and so can write beside it)."""
        return self.call(PoolCall(ClientPool.sees, "checkpoint folder check", shared=(path,)))

    def save_state(self, requests: list[StatePartRequest]) -> list[StatePartReply]:
        """Pool i writes or sends the entries ``requests[i]`` names: one checkpoint part."""
        return self.call(PoolCall(ClientPool.save_state, "client state checkpoint", requests))

    def import_state(self, states: list[ClientState]) -> None:
        """Adds ``states[i]``'s entries to pool i (of its own clients)."""
        self.call(PoolCall(ClientPool.import_state, "state import", states))


def pool_stats(group: PoolGroup) -> list[dict[str, float]]:
    """Each pool's memory and store statistics (``ClientPool.stats``): for the benchmarks."""
    return group.call(PoolCall(ClientPool.stats, "stats"))


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


class LocalPools(PoolGroup):
    """All pools in this process, called one after another: the no-Ray training path.

    Each call runs with the threads a Ray pool of the same config has (``cpus_per_pool``, see
    ``pool_threads``), so the numbers are the same in one process as on Ray; the caller's
    thread count is restored after each call.
    """

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.pools: list[ClientPool] = []
        self.size = cfg.resources.pools
        self.hosted: list[int] = []
        self.threads = pool_threads(cfg.resources)

    def _threads(self) -> AbstractContextManager[None]:
        return torch_threads(self.threads)

    def load(self, payloads: list[PoolPayload]) -> None:
        with self._threads():
            self.pools = [ClientPool(self.cfg, payload) for payload in payloads]
        self.hosted = [len(payload.data.clients) for payload in payloads]

    def call(self, call: PoolCall) -> list[Any]:
        with self._threads():
            return [call.method(pool, *arguments)
                    for pool, arguments in zip(self.pools, call.arguments(len(self.pools)),
                                               strict=True)]

    def devices(self) -> list[PoolDevice]:
        return [pool.device_info() for pool in self.pools]

    def shutdown(self) -> None:
        self.pools = []


def local_pools(cfg: ExperimentConfig) -> LocalPools:
    return LocalPools(cfg)
