"""Running experiments on Ray from the command line: driver actors, a queue of runs that fit the
cluster, progress, and failures told in one line."""

from __future__ import annotations

import contextlib
import errno
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_lips.cluster.resources import RunNeed, fits
from ray_lips.config import ExperimentConfig
from ray_lips.core.failure import RunFailedError, error_line, root_cause
from ray_lips.core.run import FederatedRun, RoundDone
from ray_lips.core.run_folder import RunWriter
from ray_lips.pools.in_process import PoolFactory
from ray_lips.pools.ray_actors import (
    CallTimes,
    PoolLostError,
    PoolStartError,
    RayPoolFactory,
    start_pool_actors,
)


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


# ----- errors in one line ------------------------------------------------------------------
# ``RunFailedError``, ``root_cause`` and ``error_line``: ``ray_lips.core.failure`` (Ray-aware
# without importing Ray), importable from here as before.
# Failures of the machinery rather than of the run's code, data or config: after them a
# ``--resume`` goes on from the last checkpoint.
_RESUMABLE_RAY_ERRORS = (
    ray.exceptions.GetTimeoutError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.OutOfDiskError,
    ray.exceptions.ObjectStoreFullError,
    ray.exceptions.RaySystemError,
)


def resuming_can_help(err: BaseException) -> bool:
    """Whether ``ray-lips run --resume`` can go on after ``err``: an interruption, pools lost
    or hung past their restarts, a timeout, a dead node or worker, a full disk. Not after an
    error in the user's code, data or config, nor a damaged or refused checkpoint, which a
    resume would meet again."""
    err = root_cause(err)
    if isinstance(err, (KeyboardInterrupt, PoolLostError, PoolStartError,
                        *_RESUMABLE_RAY_ERRORS)):
        return True
    if isinstance(err, ray.exceptions.RayActorError):
        return not err.actor_init_failed
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


# ----- driver actors -------------------------------------------------------------------------
class DriverActor(FederatedRun):
    """``FederatedRun`` as a Ray actor that builds the run in ``start``, not in its constructor.

    An error while building (the user's dataset or model, a pool's setup, a refused checkpoint)
    then comes back as ``start``'s error holding the original exception; an actor whose
    constructor fails dies, Ray keeps only the text of its traceback, and the worker prints it
    once more into the command's output.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str, make_pools: PoolFactory):
        self._start_args = (cfg, run_dir, make_pools)  # the run itself is built by ``start``

    def start(self) -> int:
        """Load the data, build the model, fill the pools and restore the latest checkpoint;
        returns the rounds already done."""
        FederatedRun.__init__(self, *self._start_args)
        return self.round


def start_driver(cfg: ExperimentConfig, run_dir: Path,
                 times: CallTimes | None = None) -> tuple[Any, list[Any]]:
    """The driver actor, pinned to this node so the run directory is on this machine's disk,
    and its pool actors. Both start at once, so the pools' processes load torch while the
    driver's does; the pools are the driver's to fill (its ``start``) and close, and ``_stop``
    kills them with it."""
    driver_cls = ray.remote(DriverActor)
    node = ray.get_runtime_context().get_node_id()
    driver = driver_cls.options(
        num_cpus=cfg.resources.driver_cpus,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    )
    pools = start_pool_actors(cfg, cfg.resources)
    # ``times``: the pool calls timed before a restart, which bound the new pools' first calls
    factory = RayPoolFactory(cfg.resources, started=pools, times=times)
    return driver.remote(cfg, str(run_dir), factory), pools


def _restartable(err: BaseException) -> bool:
    """A pool (or the driver actor) died or hung, or the driver did not answer within
    ``resources.timeout_s``: the run can go on from its checkpoint."""
    if isinstance(err, ray.exceptions.RayActorError):
        return not err.actor_init_failed  # a constructor that failed would fail again
    return isinstance(err, PoolLostError | ray.exceptions.GetTimeoutError)


def _stop(driver: Any, pools: list[Any], wait_s: float = 10.0) -> None:
    """Kill a driver actor and its pools, and wait until the driver can write no more."""
    ray.kill(driver, no_restart=True)
    for pool in pools:
        with contextlib.suppress(Exception):  # expected: already gone with a closed run
            ray.kill(pool, no_restart=True)
    with contextlib.suppress(Exception):  # expected: the actor is gone
        ray.get(driver.summary.remote(), timeout=wait_s)


# ----- several runs on one cluster -----------------------------------------------------------
def runs_at_once(cfgs: list[ExperimentConfig], total: Mapping[str, float]) -> int:
    """How many of ``cfgs``, started in order as the earlier ones finish, run at the same
    time at most on a cluster of ``total`` resources (``ray.cluster_resources()``); at least
    one. Runs of the same resources run ``total // need`` at a time."""
    needs = [RunNeed.of(cfg) for cfg in cfgs]
    most = 1
    for first in range(len(needs)):
        count = 1
        while first + count < len(needs) and fits(needs[first:first + count + 1], total):
            count += 1
        most = max(most, count)
    return min(most, len(needs))


class _Runs:
    """The driver actors of several runs, each restarted from its last checkpoint when one of
    its pools dies or hangs (at most ``resources.pool_restarts`` times)."""

    def __init__(self, runs: list[tuple[str, ExperimentConfig, Path]], stream=sys.stderr):
        self.cfgs = {label: cfg for label, cfg, _ in runs}
        self.dirs = {label: run_dir for label, _, run_dir in runs}
        self.drivers: dict[str, Any] = {}
        self.pools: dict[str, list[Any]] = {}
        self.restarts = dict.fromkeys(self.cfgs, 0)
        self.times: dict[str, CallTimes] = {}  # pool calls timed before a run's restart
        self.timeout = max(cfg.resources.timeout_s for cfg in self.cfgs.values())
        self.stream = stream

    def start(self, label: str) -> None:
        """Start the run's driver and pools; its ``start`` call builds the run."""
        self.drivers[label], self.pools[label] = start_driver(
            self.cfgs[label], self.dirs[label], self.times.get(label))

    def call(self, calls: dict[str, str]) -> dict[str, Any]:
        """Each run's method (``calls``: label -> ``start`` or ``advance``) on its driver, all
        at once. A run
        whose driver had to restart is missing from the answer (it starts again from its
        checkpoint); a run that cannot go on raises ``RunFailedError``."""
        refs = {lbl: getattr(self.drivers[lbl], method).remote() for lbl, method in calls.items()}
        answers = {}
        for lbl, ref in refs.items():
            try:
                answers[lbl] = ray.get(ref, timeout=self.timeout)
            except Exception as err:
                cause = root_cause(err)
                limit = self.cfgs[lbl].resources.pool_restarts
                if not _restartable(cause) or self.restarts[lbl] >= limit:
                    raise RunFailedError(lbl, cause) from None
                self.restarts[lbl] += 1
                if isinstance(cause, PoolLostError) and cause.times is not None:
                    self.times[lbl] = cause.times
                self.restart(lbl, error_line(cause), limit)
        return answers

    def restart(self, label: str, reason: str, limit: int) -> None:
        self.stop(label, close=False, wait_s=10.0)
        print(f"[{label}] {reason}", file=self.stream, flush=True)
        print(f"[{label}] restarting its pools from the last checkpoint (restart "
              f"{self.restarts[label]} of resources.pool_restarts {limit})",
              file=self.stream, flush=True)
        self.start(label)

    def stop(self, label: str, close: bool, wait_s: float) -> None:
        """End one run's driver and pools; ``close`` lets the driver close its pools first."""
        driver, pools = self.drivers.pop(label), self.pools.pop(label)
        if close:
            with contextlib.suppress(Exception):  # best effort: the actor may be gone
                ray.get(driver.close.remote(), timeout=60)
        _stop(driver, pools, wait_s=wait_s)

    def stop_all(self, interrupted: bool) -> None:
        """After success or a failure the drivers close their pools; after an interruption
        there is no waiting for the round in flight: they are killed."""
        for label in list(self.drivers):
            self.stop(label, close=not interrupted, wait_s=10.0 if interrupted else 1.0)

    def run(self, on_round: Callable[[str, dict], None] | None) -> dict[str, dict[str, Any]]:
        """Start as many runs as the cluster holds, advance the started ones a step at a time
        together (``FederatedRun.advance``: a round, then the end), and start the next queued
        run as one finishes; returns their summaries."""
        total = ray.cluster_resources()
        queue = list(self.cfgs)
        running: list[str] = []
        next_call: dict[str, str] = {}
        done: dict[str, int] = {}
        progress: dict[str, Progress] = {}
        started: dict[str, float] = {}
        summaries: dict[str, dict[str, Any]] = {}
        while queue or running:
            while queue and (not running or fits(
                    [RunNeed.of(self.cfgs[lbl]) for lbl in (*running, queue[0])], total)):
                label = queue.pop(0)
                self.start(label)
                running.append(label)
                next_call[label] = "start"
            answers = self.call({lbl: next_call[lbl] for lbl in running})
            for lbl in list(running):
                if lbl not in answers:  # restarted: it starts again from its checkpoint
                    next_call[lbl] = "start"
                    continue
                answer = answers[lbl]
                if next_call[lbl] == "start":
                    done[lbl] = answer
                    if lbl not in progress:
                        progress[lbl] = Progress(lbl, self.cfgs[lbl].train.rounds, self.stream,
                                                 already_done=done[lbl])
                        started[lbl] = time.perf_counter()
                elif isinstance(answer, RoundDone):
                    done[lbl] += 1
                    progress[lbl].update(answer.row, time.perf_counter() - started[lbl],
                                         done[lbl])
                    if on_round:
                        on_round(lbl, answer.row)
                else:  # finished: its resources go to the next run in the queue
                    summaries[lbl] = answer.summary
                    running.remove(lbl)
                    self.stop(lbl, close=True, wait_s=1.0)
                    continue
                next_call[lbl] = "advance"
        return {lbl: summaries[lbl] for lbl in self.cfgs}


def run_on_ray(runs: list[tuple[str, ExperimentConfig, Path]],
               on_round: Callable[[str, dict], None] | None = None,
               stream=sys.stderr) -> dict[str, dict[str, Any]]:
    """Run several runs, each with its own driver actor, as many at a time as the cluster
    holds (the rest wait their turn); return their summaries.

    On any failure every unfinished run's status file records why in one line (the run that
    failed: ``failed`` or ``diverged``; the others, stopped with it: ``interrupted``), and a
    ``RunFailedError`` names the run that failed.
    """
    writers = {label: RunWriter(run_dir) for label, _, run_dir in runs}
    fleet = _Runs(runs, stream)
    try:
        return fleet.run(on_round)
    except BaseException as err:
        interrupted = isinstance(err, KeyboardInterrupt)
        fleet.stop_all(interrupted)
        failed = err.label if isinstance(err, RunFailedError) else None
        cause = root_cause(err)
        for label, writer in writers.items():
            if writer.read_status().get("status") == "finished":
                continue
            # write_end: as well as the disk allows, so the error reported stays this one
            if failed is None or label == failed:
                writer.write_end(cause)
            else:
                writer.write_end(cause, "interrupted", f"stopped because run {failed} "
                                 f"failed: {error_line(cause)}")
        raise
    finally:
        fleet.stop_all(interrupted=True)  # nothing is left after the paths above; a guard
