"""Client pools as Ray actors, optionally placed in a placement group (a Tune trial's)."""

from __future__ import annotations

from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_lips.config import ResourcesConfig
from ray_lips.pool import ClientPool, PoolPayload

# Arguments at least this large go through the object store once, shared by every pool.
_SHARE_ABOVE_BYTES = 64 * 1024


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

    def __init__(self, config: dict[str, Any], payloads: list[PoolPayload],
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
            self.actors.append(actor_cls.options(**options).remote(config, ray.put(payload),
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

    def call(self, method: str, per_pool: list[dict[str, Any]] | None = None,
             **shared: Any) -> list[Any]:
        per_pool = per_pool or [{} for _ in self.actors]
        shared = {k: ray.put(v) if _size_bytes(v) >= _SHARE_ABOVE_BYTES else v
                  for k, v in shared.items()}
        refs = [getattr(actor, method).remote(**shared, **own)
                for actor, own in zip(self.actors, per_pool, strict=True)]
        return ray.get(refs, timeout=self.timeout_s)

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

    def __call__(self, config: dict[str, Any], payloads: list[PoolPayload]) -> RayPools:
        return RayPools(config, payloads, self.resources, self.placement_group, self.first_bundle)
