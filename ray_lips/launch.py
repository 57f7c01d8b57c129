"""Running experiments on Ray from the command line: driver actors, progress, failures."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_lips.config import ExperimentConfig
from ray_lips.engine.aggregate import DivergenceError
from ray_lips.engine.experiment import FederatedRun
from ray_lips.engine.ray_pools import PoolLostError, RayPoolFactory, start_pool_actors
from ray_lips.results import RunWriter


class Progress:
    """One status line per run: round, accuracies, seconds per round, ETA.

    ``already_done``: rounds a resumed run had finished before this process started; the
    seconds per round (and so the ETA) count only the rounds run since.
    """

    def __init__(self, label: str, rounds: int, stream=sys.stderr, already_done: int = 0):
        self.label, self.rounds, self.stream = label, rounds, stream
        self.already_done = already_done
        self.tty = stream.isatty()
        self.every = 1 if self.tty else max(1, rounds // 20)
        self.last_acc: dict[str, float] = {}

    def update(self, row: dict[str, Any], elapsed: float, done: int) -> None:
        for key in ("acc_after", "acc_global"):
            if not math.isnan(row.get(key, math.nan)):
                self.last_acc[key] = row[key]
        if not (self.tty or done % self.every == 0 or done == self.rounds):
            return
        per_round = elapsed / max(done - self.already_done, 1)
        eta = per_round * (self.rounds - done)
        width = 20
        filled = int(width * done / self.rounds)
        bar = "#" * filled + "-" * (width - filled)
        accs = " ".join(f"{k} {v:.3f}" for k, v in self.last_acc.items())
        line = (f"[{self.label}] [{bar}] round {done}/{self.rounds} {accs} "
                f"{per_round:.2f} s/round ETA {eta:.0f} s")
        end = "\r" if self.tty and done < self.rounds else "\n"
        print(line, end=end, file=self.stream, flush=True)


def start_driver(cfg: ExperimentConfig, run_dir: Path) -> tuple[Any, list[Any]]:
    """The driver actor, pinned to this node so the run directory is on this machine's disk,
    and its pool actors. Both start at once, so the pools' processes load torch while the
    driver's does; the pools are the driver's to fill and close, and ``_stop`` kills them
    with it."""
    driver_cls = ray.remote(FederatedRun)
    node = ray.get_runtime_context().get_node_id()
    driver = driver_cls.options(
        num_cpus=cfg.resources.driver_cpus,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    )
    pools = start_pool_actors(cfg, cfg.resources)
    factory = RayPoolFactory(cfg.resources, started=pools)
    return driver.remote(cfg, str(run_dir), factory), pools


def _failure_status(err: BaseException) -> str:
    if isinstance(err, DivergenceError):
        return "diverged"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    return "failed"


def _restartable(err: BaseException) -> bool:
    """A pool (or the driver actor) died or hung: the run can go on from its checkpoint."""
    return isinstance(err, PoolLostError | ray.exceptions.RayActorError)


def _stop(driver: Any, pools: list[Any], wait_s: float = 10.0) -> None:
    """Kill a driver actor and its pools, and wait until the driver can write no more."""
    ray.kill(driver, no_restart=True)
    for pool in pools:
        with contextlib.suppress(Exception):  # expected: already gone with a closed run
            ray.kill(pool, no_restart=True)
    with contextlib.suppress(Exception):  # expected: the actor is gone
        ray.get(driver.summary.remote(), timeout=wait_s)


class _Runs:
    """The driver actors of several runs, each restarted from its last checkpoint when one of
    its pools dies or hangs (at most ``resources.pool_restarts`` times)."""

    def __init__(self, runs: list[tuple[str, ExperimentConfig, Path]], stream=sys.stderr):
        self.cfgs = {label: cfg for label, cfg, _ in runs}
        self.dirs = {label: run_dir for label, _, run_dir in runs}
        self.drivers: dict[str, Any] = {}
        self.pools: dict[str, list[Any]] = {}
        for label, cfg, run_dir in runs:
            self.drivers[label], self.pools[label] = start_driver(cfg, run_dir)
        self.restarts = dict.fromkeys(self.cfgs, 0)
        self.timeout = max(cfg.resources.timeout_s for cfg in self.cfgs.values())
        self.stream = stream

    def call(self, labels: list[str], method: str) -> dict[str, Any]:
        """``method`` on the given runs' drivers at once; a run whose driver had to restart is
        missing from the answer (it goes on from its checkpoint)."""
        refs = {lbl: getattr(self.drivers[lbl], method).remote() for lbl in labels}
        answers = {}
        for lbl, ref in refs.items():
            try:
                answers[lbl] = ray.get(ref, timeout=self.timeout)
            except Exception as err:
                cause = getattr(err, "cause", None) or err
                limit = self.cfgs[lbl].resources.pool_restarts
                if not _restartable(cause) or self.restarts[lbl] >= limit:
                    raise
                self.restarts[lbl] += 1
                self.restart(lbl, f"{type(cause).__name__}: {cause}", limit)
        return answers

    def restart(self, label: str, reason: str, limit: int) -> None:
        _stop(self.drivers[label], self.pools[label])
        print(f"[{label}] {reason}", file=self.stream, flush=True)
        print(f"[{label}] restarting its pools from the last checkpoint (restart "
              f"{self.restarts[label]} of resources.pool_restarts {limit})",
              file=self.stream, flush=True)
        self.drivers[label], self.pools[label] = start_driver(self.cfgs[label],
                                                              self.dirs[label])

    def rounds_done(self, labels: list[str]) -> dict[str, int]:
        summaries = ray.get([self.drivers[lbl].summary.remote() for lbl in labels],
                            timeout=self.timeout)
        return {lbl: s["rounds_done"] for lbl, s in zip(labels, summaries, strict=True)}

    def stop_all(self, interrupted: bool) -> None:
        """After success or a failure the drivers close their pools; after an interruption
        there is no waiting for the round in flight: they are killed."""
        for label, driver in self.drivers.items():
            if not interrupted:
                with contextlib.suppress(Exception):  # best effort: the actor may be gone
                    ray.get(driver.close.remote(), timeout=60)
            _stop(driver, self.pools[label], wait_s=10.0 if interrupted else 1.0)


def run_on_ray(runs: list[tuple[str, ExperimentConfig, Path]],
               on_round: Callable[[str, dict], None] | None = None) -> dict[str, dict[str, Any]]:
    """Advance several runs in lockstep, each with its own driver actor; return their summaries.

    On any failure every run's status file records why, and the runs can be resumed.
    """
    writers = {label: RunWriter(run_dir) for label, _, run_dir in runs}
    fleet: _Runs | None = None
    interrupted = False
    try:
        fleet = _Runs(runs)
        labels = list(fleet.cfgs)
        rounds = {lbl: fleet.cfgs[lbl].train.rounds for lbl in labels}
        done = fleet.rounds_done(labels)
        progress = {lbl: Progress(lbl, rounds[lbl], already_done=done[lbl]) for lbl in labels}
        started = time.perf_counter()
        summaries: dict[str, dict[str, Any]] = {}
        while len(summaries) < len(labels):
            active = [lbl for lbl in labels if done[lbl] < rounds[lbl]]
            if not active:  # a run restarted during "finish" resumes at its end, finishes again
                waiting = [lbl for lbl in labels if lbl not in summaries]
                summaries.update(fleet.call(waiting, "finish"))
            else:
                rows = fleet.call(active, "run_round")
                for lbl in active:
                    if lbl not in rows:  # restarted: it goes on from its checkpoint
                        done.update(fleet.rounds_done([lbl]))
                        continue
                    done[lbl] += 1
                    progress[lbl].update(rows[lbl], time.perf_counter() - started, done[lbl])
                    if on_round:
                        on_round(lbl, rows[lbl])
        return {lbl: summaries[lbl] for lbl in labels}
    except BaseException as err:
        interrupted = isinstance(err, KeyboardInterrupt)
        cause = getattr(err, "cause", None) or err
        if fleet is not None:
            fleet.stop_all(interrupted)
            fleet = None
        for writer in writers.values():
            if writer.read_status().get("status") != "finished":
                writer.write_status(_failure_status(cause), error=f"{type(cause).__name__}: "
                                    f"{cause}")
        raise
    finally:
        if fleet is not None:
            fleet.stop_all(interrupted)
