"""Connecting to Ray: an explicit local instance unless the user names a cluster."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import ray

from ray_lips.config import ExperimentConfig


class ClusterError(RuntimeError):
    """The cluster cannot give what the config asks for."""


_IMPORT_WAIT_S = 300.0  # the most connect() waits for its background imports after Ray is up


def connect(address: str | None = None, num_cpus: int | None = None,
            while_starting: Sequence[str] = ()) -> str:
    """Join ``address`` (or $RAY_ADDRESS); otherwise start a private local Ray.

    A bare ``ray.init()`` would join whatever /tmp/ray/ray_current_cluster names, even a
    dead one, so the local case always asks for ``address="local"``. Token authentication, when
    the cluster uses it, is picked up by Ray from $RAY_AUTH_TOKEN or ~/.ray/auth_token.

    ``while_starting``: modules to import in a background thread meanwhile. Most of Ray's
    start is waiting for its daemons, so torch and the engine load in that time (about 3 s
    of a 2-core machine's start-up; benchmarks/README.md).
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "existing"
    importer = _import_in_background(while_starting)
    try:
        with _workers_ignore_working_dir():
            if address:
                ray.init(address=address, log_to_driver=True)
                return address
            ray.init(address="local", num_cpus=num_cpus, log_to_driver=True,
                     **PRIVATE_RAY_OPTIONS)
        return "local"
    finally:
        importer.join(timeout=_IMPORT_WAIT_S)


def _import_in_background(modules: Sequence[str]) -> threading.Thread:
    """Import ``modules`` in a daemon thread. A failure is left to the caller's own import of
    the same module, which raises it where it is handled."""

    def load() -> None:
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    thread = threading.Thread(target=load, name="ray-lips-imports", daemon=True)
    thread.start()
    return thread


# A private local Ray starts what a run needs and nothing that serves data: no dashboard, and
# no metrics agent exporting Prometheus data on 0.0.0.0 without a token.
PRIVATE_RAY_OPTIONS: dict = {
    "include_dashboard": False,
    "_system_config": {"enable_metrics_collection": False},
}


@contextmanager
def _workers_ignore_working_dir() -> Iterator[None]:
    """Start or join Ray from an empty private folder.

    ``ray.init`` puts the caller's working directory first on every worker's ``sys.path``, so a
    ``sklearn/`` or ``torch/`` folder where the user happens to stand would be imported inside
    the driver actor and the pools. Only modules the user names on ``PYTHONPATH`` (made
    absolute here, as the local Ray's workers start in that empty folder) reach the workers.
    """
    entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    if entries:
        os.environ["PYTHONPATH"] = os.pathsep.join(str(Path(e).resolve()) for e in entries)
    previous = os.getcwd()
    os.chdir(_empty_folder())
    try:
        yield
    finally:
        os.chdir(previous)


def _empty_folder() -> str:
    folder = tempfile.mkdtemp(prefix="ray-lips-cwd-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


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
