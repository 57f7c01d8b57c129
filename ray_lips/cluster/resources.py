"""What a run holds on a cluster, and the error when the cluster cannot give it. Pure Python
(no Ray): ``ray-lips run`` checks a run against ``ray.cluster_resources()``, a sweep spec
checks its trials against ``ray.nodes()``, and several runs are queued by what fits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ray_lips.config import ExperimentConfig

_SLACK = 1e-9  # fractions of GPUs and CPUs add up with rounding


class ClusterError(RuntimeError):
    """The cluster cannot give what the config asks for (or cannot be joined)."""


@dataclass(frozen=True)
class RunNeed:
    """What one run holds while it runs: its pools' CPUs and GPUs and its driver's CPUs."""

    cpus: float
    gpus: float

    @classmethod
    def of(cls, cfg: ExperimentConfig, runs: int = 1) -> RunNeed:
        """What ``runs`` runs of ``cfg`` hold at once."""
        res = cfg.resources
        return cls((res.pools * res.cpus_per_pool + res.driver_cpus) * runs,
                   res.pools * res.gpus_per_pool * runs)

    def short(self, total: Mapping[str, float]) -> dict[str, tuple[float, float]]:
        """The kinds (``CPU``, ``GPU``) of which ``total`` has less than this needs:
        kind -> (needed, there)."""
        out = {}
        for kind, amount in (("CPU", self.cpus), ("GPU", self.gpus)):
            there = total.get(kind, 0.0)
            if amount > there + _SLACK:
                out[kind] = (amount, there)
        return out


def fits(needs: Iterable[RunNeed], total: Mapping[str, float]) -> bool:
    """Whether runs of ``needs`` all run at once on ``total`` resources."""
    needs = list(needs)
    return not RunNeed(sum(n.cpus for n in needs), sum(n.gpus for n in needs)).short(total)
