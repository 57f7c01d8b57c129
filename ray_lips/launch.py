"""Running experiments on Ray from the command line: driver actors, progress, failures."""

from __future__ import annotations

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
from ray_lips.engine.ray_pools import RayPoolFactory
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


def start_driver(cfg: ExperimentConfig, run_dir: Path) -> Any:
    """The driver actor, pinned to this node so the run directory is on this machine's disk."""
    driver_cls = ray.remote(FederatedRun)
    node = ray.get_runtime_context().get_node_id()
    return driver_cls.options(
        num_cpus=cfg.resources.driver_cpus,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(cfg, str(run_dir), RayPoolFactory(cfg.resources))


def _failure_status(err: BaseException) -> str:
    if isinstance(err, DivergenceError):
        return "diverged"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    return "failed"


def run_on_ray(runs: list[tuple[str, ExperimentConfig, Path]],
               on_round: Callable[[str, dict], None] | None = None) -> dict[str, dict[str, Any]]:
    """Advance several runs in lockstep, each with its own driver actor; return their summaries.

    On any failure every run's status file records why, and the runs can be resumed.
    """
    drivers = {label: start_driver(cfg, run_dir) for label, cfg, run_dir in runs}
    cfgs = {label: cfg for label, cfg, _ in runs}
    writers = {label: RunWriter(run_dir) for label, _, run_dir in runs}
    timeout = max(cfg.resources.timeout_s for cfg in cfgs.values())
    summaries: dict[str, dict[str, Any]] = {}
    try:
        status = ray.get([d.summary.remote() for d in drivers.values()], timeout=timeout)
        done = {lbl: s["rounds_done"] for lbl, s in zip(drivers, status, strict=True)}
        progress = {lbl: Progress(lbl, cfg.train.rounds, already_done=done[lbl])
                    for lbl, cfg in cfgs.items()}
        started = time.perf_counter()
        active = [lbl for lbl in drivers if done[lbl] < cfgs[lbl].train.rounds]
        while active:
            rows = ray.get([drivers[lbl].run_round.remote() for lbl in active], timeout=timeout)
            for lbl, row in zip(active, rows, strict=True):
                done[lbl] += 1
                progress[lbl].update(row, time.perf_counter() - started, done[lbl])
                if on_round:
                    on_round(lbl, row)
            active = [lbl for lbl in active if done[lbl] < cfgs[lbl].train.rounds]
        finals = ray.get([d.finish.remote() for d in drivers.values()], timeout=timeout)
        summaries = dict(zip(drivers, finals, strict=True))
    except BaseException as err:
        cause = getattr(err, "cause", None) or err
        for writer in writers.values():
            if writer.read_status().get("status") != "finished":
                writer.write_status(_failure_status(cause), error=f"{type(cause).__name__}: "
                                    f"{cause}")
        raise
    finally:
        for driver in drivers.values():
            try:
                ray.get(driver.close.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - best effort: the actor may already be gone
                pass
            ray.kill(driver)
    return summaries
