"""Groups of client pools behind one calling convention: in-process objects or Ray actors.

The driver calls ``group.call(method, per_pool, **shared)``: every pool runs ``method`` with its
own keyword arguments plus the shared ones, in parallel where the backend allows, and the results
come back in pool order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ray_lips.pool import ClientPool, PoolPayload


class PoolGroup(Protocol):
    size: int

    def call(self, method: str, per_pool: list[dict[str, Any]] | None = None,
             **shared: Any) -> list[Any]: ...

    def shutdown(self) -> None: ...


PoolFactory = Callable[[dict[str, Any], list[PoolPayload]], PoolGroup]


class LocalPools:
    """All pools in this process, called one after another: the no-Ray training path."""

    def __init__(self, config: dict[str, Any], payloads: list[PoolPayload]):
        self.pools = [ClientPool(config, payload) for payload in payloads]
        self.size = len(self.pools)

    def call(self, method: str, per_pool: list[dict[str, Any]] | None = None,
             **shared: Any) -> list[Any]:
        per_pool = per_pool or [{} for _ in self.pools]
        return [getattr(pool, method)(**shared, **own)
                for pool, own in zip(self.pools, per_pool, strict=True)]

    def shutdown(self) -> None:
        self.pools = []


def local_pools(config: dict[str, Any], payloads: list[PoolPayload]) -> LocalPools:
    return LocalPools(config, payloads)
