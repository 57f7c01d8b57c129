"""Connecting to Ray: an explicit local instance unless the user names a cluster."""

from __future__ import annotations

import os

import ray

from ray_lips.config import ExperimentConfig


class ClusterError(RuntimeError):
    """The cluster cannot give what the config asks for."""


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Join ``address`` (or $RAY_ADDRESS); otherwise start a private local Ray.

    A bare ``ray.init()`` would join whatever cluster /tmp/ray/ray_current_cluster names, even a
    dead one, so the local case always asks for ``address="local"``. Token authentication, when
    the cluster uses it, is picked up by Ray from $RAY_AUTH_TOKEN or ~/.ray/auth_token.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "existing"
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return "local"


def check_resources(cfg: ExperimentConfig, concurrent_runs: int = 1) -> None:
    """Stop with a clear message when the cluster cannot host the pools at all."""
    total = ray.cluster_resources()
    res = cfg.resources
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    if res.gpus_per_pool > 0 and gpus == 0:
        raise ClusterError(
            f"resources.gpus_per_pool is {res.gpus_per_pool} but Ray reports no GPU in this "
            "cluster; set resources.gpus_per_pool=0 to train on CPUs")
    need_gpus = res.pools * res.gpus_per_pool * concurrent_runs
    if need_gpus > gpus + 1e-9:
        raise ClusterError(
            f"resources: {concurrent_runs} run(s) x {res.pools} pools x {res.gpus_per_pool} GPU "
            f"= {need_gpus:g} GPUs, but the cluster has {gpus:g}")
    need_cpus = (res.pools * res.cpus_per_pool + res.driver_cpus) * concurrent_runs
    if need_cpus > cpus + 1e-9:
        raise ClusterError(
            f"resources: {concurrent_runs} run(s) x ({res.pools} pools x {res.cpus_per_pool} CPU "
            f"+ {res.driver_cpus} driver CPU) = {need_cpus:g} CPUs, but the cluster has {cpus:g}; "
            "lower resources.pools or resources.cpus_per_pool")
