"""Client pools as Ray actors, optionally placed in a placement group (a Tune trial's)."""

from __future__ import annotations

from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_lips.algorithms.base import Tensors
from ray_lips.config import ExperimentConfig, ResourcesConfig
from ray_lips.engine.messages import HandoutReply, HandoutRequest, TrainReply, TrainRequest
from ray_lips.engine.payload import PoolPayload
from ray_lips.engine.pool import ClientPool
from ray_lips.engine.pools import ClientState

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


class RayPools:
    """One ``ClientPool`` actor per payload, each with its CPUs and GPU fraction."""

    def __init__(self, cfg: ExperimentConfig, payloads: list[PoolPayload],
                 resources: ResourcesConfig, placement_group: PlacementGroup | None = None,
                 first_bundle: int = 0):
        self.timeout_s = resources.timeout_s
        actor_cls = ray.remote(ClientPool)
        self.actors = []
        for index, payload in enumerate(payloads):
            options: dict[str, Any] = {"num_cpus": resources.cpus_per_pool,
                                       "num_gpus": resources.gpus_per_pool}
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group,
                    placement_group_bundle_index=first_bundle + index)
            threads = max(1, int(resources.cpus_per_pool))
            self.actors.append(actor_cls.options(**options).remote(cfg, ray.put(payload),
                                                                  threads=threads))
        self.size = len(self.actors)
        try:
            ray.get([a.clients.remote() for a in self.actors], timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise PoolStartError(
                f"{self.size} client pools ({resources.cpus_per_pool} CPU, "
                f"{resources.gpus_per_pool} GPU each) could not start within "
                f"{self.timeout_s:.0f} s; the cluster offers {ray.available_resources()}") from None

    def _get(self, refs: list[ray.ObjectRef]) -> list[Any]:
        return ray.get(refs, timeout=self.timeout_s)

    def set_global(self, round_idx: int, state: Tensors, density: float) -> None:
        shared = _shared(state)
        self._get([a.set_global.remote(round_idx, shared, density) for a in self.actors])

    def train_round(self, requests: list[TrainRequest],
                    message: dict[str, Tensors]) -> list[TrainReply]:
        shared = _shared(message)
        return self._get([actor.train_round.remote(request, shared)
                          for actor, request in zip(self.actors, requests, strict=True)])

    def handout(self, requests: list[HandoutRequest], state: Tensors) -> list[HandoutReply]:
        shared = _shared(state)
        return self._get([actor.handout.remote(request, shared)
                          for actor, request in zip(self.actors, requests, strict=True)])

    def finetune(self, round_idx: int, epochs: int) -> list[list[dict[str, Any]]]:
        return self._get([a.finetune.remote(round_idx, epochs) for a in self.actors])

    def export_state(self) -> list[ClientState]:
        return self._get([a.export_state.remote() for a in self.actors])

    def import_state(self, states: list[ClientState]) -> None:
        self._get([actor.import_state.remote(state)
                   for actor, state in zip(self.actors, states, strict=True)])

    def stats(self) -> list[dict[str, float]]:
        return self._get([a.stats.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class RayPoolFactory:
    """Picklable factory, so a driver actor or a Tune trial can start its own pools."""

    def __init__(self, resources: ResourcesConfig, placement_group: PlacementGroup | None = None,
                 first_bundle: int = 0):
        self.resources = resources
        self.placement_group = placement_group
        self.first_bundle = first_bundle

    def __call__(self, cfg: ExperimentConfig, payloads: list[PoolPayload]) -> RayPools:
        return RayPools(cfg, payloads, self.resources, self.placement_group, self.first_bundle)
