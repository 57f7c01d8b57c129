"""Client pools as Ray actors, optionally placed in a placement group (a Tune trial's)."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_lips.config import ExperimentConfig, ResourcesConfig
from ray_lips.pools.client_pool import ClientPool, CudaUnavailableError, pool_threads
from ray_lips.pools.in_process import PoolGroup
from ray_lips.pools.messages import PoolCall, PoolDevice
from ray_lips.pools.payload import DatasetArrays, PoolPayload

# Arguments at least this large go through the object store once, shared by every pool.
_SHARE_ABOVE_BYTES = 64 * 1024


def _shared(value: Any) -> Any:
    """``value`` itself, or once in the object store when it is large (every pool reads the
    same copy)."""
    return ray.put(value) if _size_bytes(value) >= _SHARE_ABOVE_BYTES else value


def _size_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_size_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_size_bytes(v) for v in value)
    return 0


class PoolStartError(RuntimeError):
    """The cluster could not place the client pools in time."""


@dataclass
class CallTimes:
    """How long a run's pool calls have taken: what bounds the next ones. A restart of the
    run's pools starts from these (``RayPoolFactory(..., times=error.times)``)."""

    slowest: dict[str, float] = field(default_factory=dict)  # kind -> slowest call, seconds
    # slowest seconds per client-epoch of a training call's busiest pool (0: none timed yet)
    training_rate: float = 0.0


class PoolLostError(RuntimeError):
    """A client pool died or stopped answering; the run can go on from its last checkpoint.

    ``times``: the pool calls timed so far, for the pools that take over.
    """

    def __init__(self, message: str, times: CallTimes | None = None):
        super().__init__(message)
        self.times = times


class PoolHungError(PoolLostError):
    """A client pool did not answer within its call's deadline (see ``CallDeadlines``)."""

    def __init__(self, message: str, times: CallTimes | None = None, pool: int = -1,
                 kind: str = "", limit_s: float = 0.0):
        super().__init__(message, times)
        self.pool, self.kind, self.limit_s = pool, kind, limit_s


class ClientPoolActor(ClientPool):
    """The pool as an actor. It starts empty, so that its process imports torch while the
    driver prepares the data, and becomes a pool when ``setup`` gives it its clients."""

    def __init__(self, threads: int):  # the pool itself is built by ``setup``
        torch.set_num_threads(threads)

    def setup(self, cfg: ExperimentConfig, payload: PoolPayload,
              dataset: DatasetArrays | None) -> PoolDevice:
        """Become the pool of ``payload``; raises ``CudaUnavailableError`` when it must train
        on CUDA and torch sees none here."""
        ClientPool.__init__(self, cfg, payload, dataset=dataset)
        return self.device_info()

    def location(self) -> str:
        return f"pid {os.getpid()} on {socket.gethostname()}"

    def node(self) -> str:
        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"

    def device_info(self) -> PoolDevice:
        return replace(ClientPool.device_info(self), ip=ray.util.get_node_ip_address(),
                       gpu_ids=[str(gpu) for gpu in ray.get_gpu_ids()])


class CallDeadlines:
    """How long each kind of pool call may take before its pool counts as hung.

    A kind timed before: ``factor`` times its slowest call, never less than ``min_s``. A kind
    not timed yet once a training call has been: ``factor`` times an estimate from the
    training calls (fine-tuning: the seconds per client-epoch of training times the busiest
    pool's clients times its epochs, plus two for its evaluations; any other kind: the slowest
    training call), never less than ``min_s``. Before anything is timed: ``factor`` x
    ``min_s``. Never more than ``timeout_s``.
    """

    def __init__(self, factor: float, min_s: float, timeout_s: float,
                 times: CallTimes | None = None):
        self.factor, self.min_s, self.timeout_s = factor, min_s, timeout_s
        self.times = (CallTimes(dict(times.slowest), times.training_rate) if times is not None
                      else CallTimes())  # a copy: the earlier pools' record stays as it was

    @property
    def slowest(self) -> dict[str, float]:
        return self.times.slowest

    def limit(self, kind: str, client_epochs: float = 0.0) -> tuple[float, str]:
        """Seconds a ``kind`` call may take, and how that was derived (for the message).

        ``client_epochs``: the work of the call's busiest pool, where it can be estimated
        from training (fine-tuning)."""
        bounds = (f"at least resources.hang_min_s {self.min_s:g} s, at most "
                  f"resources.timeout_s {self.timeout_s:g} s")
        if kind in self.slowest:
            seconds = self.factor * self.slowest[kind]
            how = (f"resources.hang_factor {self.factor:g} x its slowest earlier {kind} "
                   f"({self.slowest[kind]:.2f} s), {bounds}")
            return min(self.timeout_s, max(self.min_s, seconds)), how
        training = self.slowest.get("training")
        if training is not None:
            if client_epochs > 0 and self.times.training_rate > 0:
                estimate = self.times.training_rate * client_epochs
                source = (f"{self.times.training_rate:.3g} s per client-epoch of training x "
                          f"{client_epochs:g}")
            else:
                estimate, source = training, "the slowest training call"
            how = (f"first {kind}: resources.hang_factor {self.factor:g} x {estimate:.2f} s "
                   f"estimated from {source}, {bounds}")
            return min(self.timeout_s, max(self.min_s, self.factor * estimate)), how
        how = (f"first {kind}, nothing timed yet: resources.hang_factor {self.factor:g} x "
               f"resources.hang_min_s {self.min_s:g} s, at most resources.timeout_s "
               f"{self.timeout_s:g} s")
        return min(self.timeout_s, self.factor * self.min_s), how

    def record(self, kind: str, seconds: float, client_epochs: float = 0.0) -> None:
        self.slowest[kind] = max(seconds, self.slowest.get(kind, 0.0))
        if kind == "training" and client_epochs > 0:
            self.times.training_rate = max(self.times.training_rate, seconds / client_epochs)


def start_pool_actors(cfg: ExperimentConfig, resources: ResourcesConfig,
                      placement_group: PlacementGroup | None = None,
                      first_bundle: int = 0) -> list[ray.actor.ActorHandle]:
    """``cfg.resources.pools`` empty pool actors, each with its CPUs and GPU fraction (in the
    placement group's bundles from ``first_bundle`` on, when given). Returns at once."""
    actor_cls = ray.remote(ClientPoolActor)
    threads = pool_threads(resources)
    actors = []
    for index in range(cfg.resources.pools):
        options: dict[str, Any] = {"num_cpus": resources.cpus_per_pool,
                                   "num_gpus": resources.gpus_per_pool}
        if placement_group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=first_bundle + index)
        actors.append(actor_cls.options(**options).remote(threads))
    return actors


class RayPools(PoolGroup):
    """One ``ClientPool`` actor per payload, each with its CPUs and GPU fraction.

    ``times``: pool calls timed by the pools this group replaces (see ``CallDeadlines``).
    """

    def __init__(self, cfg: ExperimentConfig, resources: ResourcesConfig,
                 placement_group: PlacementGroup | None = None, first_bundle: int = 0,
                 started: list[ray.actor.ActorHandle] | None = None,
                 times: CallTimes | None = None):
        self.cfg = cfg
        self.resources = resources
        self.timeout_s = resources.timeout_s
        self.deadlines = CallDeadlines(resources.hang_factor, resources.hang_min_s,
                                       resources.timeout_s, times)
        self.actors = started or start_pool_actors(cfg, resources, placement_group,
                                                   first_bundle)
        self.size = len(self.actors)
        self.locations = ["not started"] * self.size
        self.placed: list[PoolDevice] = []
        self.hosted = [0] * self.size  # clients per pool

    def load(self, payloads: list[PoolPayload]) -> None:
        """Each pool's clients; waits (at most ``resources.timeout_s``) until every pool is
        placed and holds them. A pool that must train on CUDA and sees none stops the run
        with its ``CudaUnavailableError``.

        The dataset goes into the object store once; each pool maps it read-only (one copy per
        node) and gets only its clients' row numbers in its payload.
        """
        datasets = {id(p.dataset): p.dataset for p in payloads if p.dataset is not None}
        shared = {key: ray.put(dataset) for key, dataset in datasets.items()}
        refs = [actor.setup.remote(self.cfg, ray.put(replace(payload, dataset=None)),
                                   shared.get(id(payload.dataset)))
                for actor, payload in zip(self.actors, payloads, strict=True)]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            self.shutdown()
            res = self.resources
            raise PoolStartError(
                f"{self.size} client pools ({res.cpus_per_pool} CPU, {res.gpus_per_pool} GPU "
                f"each) could not start within {self.timeout_s:.0f} s; the cluster offers "
                f"{ray.available_resources()}")
        try:
            self.placed = ray.get(refs)
        except ray.exceptions.RayTaskError as err:
            self.shutdown()
            if isinstance(err.cause, CudaUnavailableError):
                raise err.cause from None
            raise
        self.locations = [device.location() for device in self.placed]
        self.hosted = [len(payload.data.clients) for payload in payloads]

    def devices(self) -> list[PoolDevice]:
        return list(self.placed)

    def _get(self, refs: list[ray.ObjectRef], kind: str,
             client_epochs: float = 0.0) -> list[Any]:
        """Every pool's reply, or a ``PoolLostError`` naming the first pool that died or did
        not answer within its deadline (see ``CallDeadlines``; ``client_epochs``: the work of
        the busiest pool, for training and fine-tuning)."""
        limit, how = self.deadlines.limit(kind, client_epochs)
        started = time.monotonic()
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=limit)
        if pending:
            index = refs.index(pending[0])
            raise PoolHungError(
                f"client pool {index} ({self.locations[index]}) did not finish {kind} within "
                f"{limit:.1f} s ({how})", self.deadlines.times, index, kind, limit)
        replies = []
        for index, ref in enumerate(refs):
            try:
                replies.append(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                raise PoolLostError(f"client pool {index} ({self.locations[index]}) died during "
                                    f"{kind}: {type(err).__name__}",
                                    self.deadlines.times) from None
        self.deadlines.record(kind, time.monotonic() - started, client_epochs)
        return replies

    def call(self, call: PoolCall) -> list[Any]:
        """Every actor's reply (see ``_get``); large shared arguments go through the object
        store once."""
        shared = replace(call, shared=tuple(_shared(value) for value in call.shared))
        return self._get([getattr(actor, call.name).remote(*arguments)
                          for actor, arguments in zip(self.actors, shared.arguments(self.size),
                                                      strict=True)],
                         call.kind, call.work)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class RayPoolFactory:
    """Picklable factory, so a driver actor or a Tune trial can start its own pools.

    ``started``: pool actors already started by whoever made the factory (``ray-lips run``
    starts them with the driver actor, so that all their processes load at the same time);
    the factory's one call uses them instead of starting new ones. ``times``: the pool calls
    timed before a restart (``PoolLostError.times``), which bound the new pools' first calls.
    """

    def __init__(self, resources: ResourcesConfig, placement_group: PlacementGroup | None = None,
                 first_bundle: int = 0, started: list[ray.actor.ActorHandle] | None = None,
                 times: CallTimes | None = None):
        self.resources = resources
        self.placement_group = placement_group
        self.first_bundle = first_bundle
        self.started = started
        self.times = times

    def __call__(self, cfg: ExperimentConfig) -> RayPools:
        started, self.started = self.started, None
        return RayPools(cfg, self.resources, self.placement_group, self.first_bundle, started,
                        self.times)
