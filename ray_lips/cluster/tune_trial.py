"""The Ray Tune side of a sweep: the trial function, its placement group, the Tuner.

Each trial is one federated run and is itself the driver (``FederatedRun``); its client pools are
actors in the trial's placement group: bundle 0 is the driver's (``resources.driver_cpus``; Tune
drops it when empty), then one bundle per pool, so a sweep never asks for more GPUs than exist.
The run files go straight into the trial's directory in the storage path, beside Tune's own
files, so analysis reads sweeps and single runs alike. ``FederatedRun`` resumes from the newest
checkpoint in that directory; the same checkpoint also travels as the Tune checkpoint, so a
restored trial finds it even when its directory did not come along. A trial holds its
directory's run lock while it runs, as ``ray-lips run`` does: a ``--resume`` of it is refused.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler

from ray_lips.cluster.sweep_spec import (
    TIME_ATTR,
    Dimension,
    SchedulerSpec,
    SweepSpec,
    describe,
    trial_bundles,
    trial_config,
    trial_label,
)
from ray_lips.cluster.sweep_stop import mark_if_running
from ray_lips.config import ExperimentConfig, validate_config
from ray_lips.core.failure import DivergenceError
from ray_lips.core.run import FederatedRun, drive
from ray_lips.core.run_folder import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LAYERS_FILE,
    ROUNDS_FILE,
    STATUS_FILE,
    RunWriter,
    client_state_folder,
    copy_folder_replacing,
    copy_replacing,
    run_lock,
    write_bytes_replacing,
)
from ray_lips.pools.ray_actors import RayPoolFactory
from ray_lips.tracking import RunTrackers, TrackConfig, run_info

SPEC_FILE = "sweep_spec.yaml"
WINDOW_KEYS = ("acc_global_window", "acc_after_window", "acc_before_window", "acc_test_window")
# Called in the trial after every round with the round's row and the run directory (shipped to
# the trial's worker with the trainable): progress hooks, and fault injection in tests.
AfterRound = Callable[[dict[str, Any], Path], None]


# ----- the trial ------------------------------------------------------------------------------
def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted overrides of one trial: its grid point plus its random draws."""
    return {**config.get("overrides", {}), **config.get("sampled", {})}


def resolve_trial(base: dict[str, Any], config: dict[str, Any]) -> ExperimentConfig:
    return validate_config(trial_config(base, trial_overrides(config)))


def trial_run_dir() -> Path:
    """The trial's directory in the storage path (not Tune's node-local staging directory)."""
    from ray.train._internal.session import get_storage  # noqa: PLC0415 - developer API

    storage = get_storage()
    if storage.storage_filesystem.type_name == "local":
        return Path(storage.trial_fs_path)
    return Path(tune.get_context().get_trial_dir())


def round_metrics(row: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What Tune gets for a round: rounds done, the windows so far, and the round's row.

    The first keys are the columns of Tune's progress table.
    """
    out: dict[str, Any] = {TIME_ATTR: int(row.get("round", -1)) + 1}
    out.update({k: summary[k] for k in WINDOW_KEYS if k in summary})
    out.update({k: v for k, v in row.items() if _is_number(v)})
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)


def pack_checkpoint(writer: RunWriter, checkpoint_file: Path, folder: Path) -> None:
    """What a Tune checkpoint holds: the run's checkpoint (with its client state parts) and
    the tables it continues."""
    shutil.copy2(checkpoint_file, folder / checkpoint_file.name)
    parts = client_state_folder(checkpoint_file)
    if parts.is_dir():
        shutil.copytree(parts, folder / parts.name)
    for name in (CONFIG_FILE, ROUNDS_FILE, LAYERS_FILE):
        if (writer.dir / name).exists():
            shutil.copy2(writer.dir / name, folder / name)


def _report(metrics: dict[str, Any], checkpoint_file: Path | None, writer: RunWriter) -> None:
    if checkpoint_file is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ray-lips-ckpt-") as tmp:
        pack_checkpoint(writer, checkpoint_file, Path(tmp))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def adopt_checkpoint(checkpoint: tune.Checkpoint | None, writer: RunWriter) -> None:
    """Copy the Tune checkpoint's files into the run directory unless it has a newer one."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        found = sorted(Path(folder).glob("round_*.pt"))
        if not found:
            return
        newest = writer.latest_checkpoint()
        if newest is not None and newest.name >= found[-1].name:
            return
        for name in (CONFIG_FILE, ROUNDS_FILE, LAYERS_FILE):
            if (Path(folder) / name).exists():
                copy_replacing(Path(folder) / name, writer.dir / name)
        target = writer.dir / CHECKPOINT_DIR / found[-1].name
        parts = client_state_folder(found[-1])
        if parts.is_dir():  # the parts first: a main file never stands beside missing parts
            copy_folder_replacing(parts, client_state_folder(target))
        else:
            shutil.rmtree(client_state_folder(target), ignore_errors=True)
        copy_replacing(found[-1], target)


def _pool_factory(cfg: ExperimentConfig) -> RayPoolFactory:
    group = ray.util.get_current_placement_group()
    first = len(group.bundle_specs) - cfg.resources.pools if group is not None else 0
    return RayPoolFactory(cfg.resources, placement_group=group, first_bundle=first)


def _drive(run: FederatedRun, writer: RunWriter, after_round: AfterRound | None,
           stoppable: bool) -> None:
    """The run to its end (``core.run.drive``), reporting evaluated and checkpointed rounds;
    then the summary. ``stoppable``: Tune may stop the trial at any report (a scheduler, a
    time budget), so the round tables are written before each, not only with checkpoints."""
    last = writer.latest_checkpoint()

    def report(row: dict[str, Any]) -> None:
        nonlocal last
        if after_round is not None:
            after_round(row, writer.dir)
        newest = writer.latest_checkpoint()
        fresh = newest if newest != last else None
        last = newest
        if not run.done and (row["evaluated"] or fresh is not None):
            if stoppable and fresh is None:
                run.write_tables()
            _report(round_metrics(row, run.summary()), fresh, writer)

    summary = drive(run, report)
    row = run.rounds_rows[-1] if run.rounds_rows else {}
    final = {**round_metrics(row, summary), **{k: v for k, v in summary.items() if _is_number(v)}}
    _report(final, writer.latest_checkpoint(), writer)


def lips_trial(config: dict[str, Any], base: dict[str, Any],
               after_round: AfterRound | None = None, stoppable: bool = False) -> None:
    """The Tune function trainable: one federated run, reported round by round, holding its
    directory's run lock throughout. Its config is validated here, once. ``stoppable``: the
    sweep has a scheduler or a time budget (see ``_drive``)."""
    cfg = resolve_trial(base, config)
    run_dir = trial_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        _trial(cfg, RunWriter(run_dir), after_round, stoppable)


def _trial(cfg: ExperimentConfig, writer: RunWriter, after_round: AfterRound | None,
           stoppable: bool) -> None:
    earlier = writer.read_status()
    if earlier.get("status") == "diverged":  # deterministic: a retry would diverge again
        raise DivergenceError(f"diverged in an earlier attempt, not retried: "
                              f"{earlier.get('error')}")
    run: FederatedRun | None = None
    try:
        adopt_checkpoint(tune.get_checkpoint(), writer)
        writer.write_config(cfg)
        run = FederatedRun(cfg, writer.dir, _pool_factory(cfg))
        _drive(run, writer, after_round, stoppable)
    except Exception as err:  # a pool's error arrives wrapped: write_end follows its cause
        writer.write_end(err)
        raise
    finally:
        if run is not None:
            run.close()


# ----- Tune plumbing --------------------------------------------------------------------------
def make_trainable(base: dict[str, Any], after_round: AfterRound | None = None,
                   stoppable: bool = False) -> Any:
    """``lips_trial`` bound to the base config, with each trial's placement group."""

    def resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        return tune.PlacementGroupFactory(trial_bundles(resolve_trial(base, config)),
                                          strategy="PACK")

    trainable = tune.with_parameters(lips_trial, base=base, after_round=after_round,
                                     stoppable=stoppable)
    return tune.with_resources(trainable, resources=resources)


def trial_name(trial: Trial) -> str:
    return f"{trial.trial_id}_{trial_label(trial_overrides(trial.config))}"


def _domain(dim: Dimension) -> Any:
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    if dim.kind == "uniform":
        return tune.uniform(*dim.values)
    return tune.loguniform(*dim.values)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    space: dict[str, Any] = {"overrides": tune.grid_search(spec.trials)}
    if spec.random:
        space["sampled"] = {d.key: _domain(d) for d in spec.random}
    return space


class RunStatusCallback(tune.Callback):
    """Settles status.json of trials that ended without the trial saying why."""

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        _settle(trial, "stopped",
                reason="stopped by Tune before its last round (scheduler or time budget)")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        _settle(trial, "failed", error="the trial process failed; see error.txt")


def _settle(trial: Trial, status: str, **fields: str) -> None:
    """Record how a trial ended when it could not say so itself (still marked running)."""
    path = Path(trial.path) if trial.path else None
    if path is None or not (path / STATUS_FILE).exists():
        return
    writer = RunWriter(path)
    if writer.read_status().get("status") == "running":
        writer.write_status(status, **fields)


class TrackerCallback(tune.Callback):
    """Logs each trial to the experiment trackers (``ray_lips.tracking``) from the process
    that runs the sweep: the trial's whole config as parameters, every reported round with
    its round as the step, the run's summary at the end. Tune calls it in this process, so the
    trackers need not be installed on the cluster's nodes."""

    def __init__(self, track: TrackConfig, base: dict[str, Any], experiment: str,
                 base_dir: Path):
        self.track, self.base, self.experiment, self.base_dir = track, base, experiment, base_dir
        self._open: dict[str, RunTrackers] = {}
        self._rounds: dict[str, int] = {}  # each trial's train.rounds

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks; open runs stay here
        return {**self.__dict__, "_open": {}}

    def _trackers(self, trial: Trial) -> RunTrackers:
        if trial.trial_id not in self._open:
            cfg = resolve_trial(self.base, trial.config)
            self._rounds[trial.trial_id] = cfg.train.rounds
            run_dir = Path(trial.path) if trial.path else self.base_dir
            self._open[trial.trial_id] = RunTrackers(self.track, run_info(
                cfg, run_dir, self.base_dir, experiment=self.experiment, name=trial_name(trial),
                tags={"trial_id": trial.trial_id,
                      "overrides": describe(trial_overrides(trial.config))}))
        return self._open[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._trackers(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict[str, Any], **info: Any) -> None:
        """A round's report; the trial's last one (``_drive``'s final report, after the run
        wrote its summary) is the last round's row plus the summary, logged as such."""
        if "round" not in result:
            return
        trackers = self._trackers(trial)
        if result.get(TIME_ATTR) != self._rounds[trial.trial_id]:
            trackers.log_round(result, skip=AUTO_RESULT_KEYS)
            return
        summary = _run_status(Path(trial.path) if trial.path else None).get("summary", {})
        summary_only = set(summary) - {*WINDOW_KEYS, TIME_ATTR}
        trackers.log_round(result, skip=(*AUTO_RESULT_KEYS, *summary_only))
        trackers.log_summary(summary)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        trackers = self._open.pop(trial.trial_id, None)
        if trackers is not None:
            trackers.close()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        trackers = self._open.pop(trial.trial_id, None)
        if trackers is not None:
            trackers.close(failed=True)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial_id in list(self._open):  # stopped with the sweep (Ctrl+C, a time budget)
            self._open.pop(trial_id).close(failed=True)


def make_scheduler(spec: SchedulerSpec | None) -> ASHAScheduler | None:
    """ASHA on the spec's metric, with rounds done as its clock."""
    if spec is None:
        return None
    options = {} if spec.reduction_factor is None else {"reduction_factor": spec.reduction_factor}
    return ASHAScheduler(time_attr=TIME_ATTR, metric=spec.metric, mode=spec.mode,
                         max_t=spec.max_t, grace_period=spec.grace_period, **options)


def build_tuner(spec: SweepSpec, callbacks: Sequence[tune.Callback] = (),
                after_round: AfterRound | None = None) -> tune.Tuner:
    return tune.Tuner(
        make_trainable(spec.base, after_round, stops_early(spec.section)),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            num_samples=spec.num_samples, scheduler=make_scheduler(spec.scheduler),
            max_concurrent_trials=spec.max_concurrent_trials, time_budget_s=spec.time_budget_s,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=str(spec.storage_path),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[RunStatusCallback(), *callbacks]),
    )


def stops_early(section: dict[str, Any]) -> bool:
    """Whether Tune may stop the sweep's trials before their last round (its ``sweep``
    section has a scheduler or a time budget)."""
    return bool(section.get("scheduler")) or section.get("time_budget_s") is not None


def save_spec(spec: SweepSpec) -> Path:
    """The resolved spec beside the experiment: what ``--resume`` runs, whatever the file says."""
    spec.experiment_dir.mkdir(parents=True, exist_ok=True)
    path = spec.experiment_dir / SPEC_FILE
    write_bytes_replacing(path, yaml.safe_dump({
        "name": spec.name, "base": spec.base, "trials": spec.trials,
        "random": [{"key": d.key, "kind": d.kind, "values": list(d.values)} for d in spec.random],
        "sweep": spec.section,
    }, sort_keys=False).encode())
    return path


def saved_spec(experiment_dir: Path) -> dict[str, Any] | None:
    path = experiment_dir / SPEC_FILE
    return yaml.safe_load(path.read_text()) if path.exists() else None


def expected_trials(spec: SweepSpec, resume: bool) -> int:
    """How many trials the sweep has (for ``--resume``: the sweep as it was started)."""
    saved = saved_spec(spec.experiment_dir) if resume else None
    if not saved:
        return spec.total_trials
    return len(saved.get("trials") or [{}]) * int(saved.get("sweep", {}).get("num_samples", 1))


def can_resume(experiment_dir: Path) -> bool:
    return experiment_dir.is_dir() and tune.Tuner.can_restore(str(experiment_dir))


def run_sweep(spec: SweepSpec, *, resume: bool = False, callbacks: Sequence[tune.Callback] = (),
              after_round: AfterRound | None = None) -> tune.ResultGrid:
    """Fit the sweep (Ray must be connected).

    ``resume`` restores the experiment directory with the trials, callbacks and settings it was
    started with; ``callbacks`` and ``after_round`` only apply to a new sweep.
    """
    if resume:
        saved = saved_spec(spec.experiment_dir) or {}
        tuner = tune.Tuner.restore(str(spec.experiment_dir),
                                   trainable=make_trainable(
                                       saved.get("base", spec.base),
                                       stoppable=stops_early(saved.get("sweep", spec.section))),
                                   resume_unfinished=True, resume_errored=True)
    else:
        save_spec(spec)
        tuner = build_tuner(spec, callbacks, after_round)
    return tuner.fit()


# ----- the table at the end -------------------------------------------------------------------
def mark_interrupted(results: tune.ResultGrid) -> int:
    """After the sweep has returned, a trial whose run still says ``running`` was stopped with
    it (Ctrl+C, SIGTERM): say so in its status.json, so that reports and ``ray-lips report`` do
    not show it as running. Returns how many were marked."""
    return sum(mark_if_running(Path(result.path), "the sweep stopped before this trial "
                               "finished; ray-lips sweep SPEC --resume continues")
               for result in results if result.path)



def _run_status(path: Path | None) -> dict[str, Any]:
    if path is None or not (path / STATUS_FILE).exists():
        return {}
    return RunWriter(path).read_status()


def trial_table(results: tune.ResultGrid,
                grid: Sequence[dict[str, Any]] | None = None) -> pd.DataFrame:
    """One row per trial: id, overrides, run status, windowed accuracies, rounds done.

    The status and numbers come from the run directory when it has them (``finished``,
    ``diverged``, ``failed``, ``stopped`` by the scheduler, ``interrupted`` = started, not
    finished), else from Tune's last result.
    """
    rows = []
    for result in results:
        path = Path(result.path) if result.path else None
        metrics = result.metrics or {}
        status = _run_status(path)
        state = status.get("status") or ("error" if result.error else "pending")
        if result.error is not None and state == "running":
            state = "error"
        elif state == "running":  # the sweep has returned: this trial was stopped mid-run
            state = "interrupted"
        numbers = {**metrics, **status.get("summary", {})}
        trial_id = metrics.get("trial_id") or ("_".join(path.name.split("_")[:2]) if path else "?")
        if result.config:
            overrides = describe(trial_overrides(result.config))
        else:  # not started: Tune keeps no config; the grid's order gives it
            overrides = _grid_point(trial_id, grid)
        rows.append({
            "trial": trial_id,
            "overrides": overrides,
            "status": state,
            "acc_global_window": numbers.get("acc_global_window", math.nan),
            "acc_after_window": numbers.get("acc_after_window", math.nan),
            "rounds": int(status.get("round", metrics.get(TIME_ATTR, 0)) or 0),
        })
    columns = ["trial", "overrides", "status", "acc_global_window", "acc_after_window", "rounds"]
    return pd.DataFrame(rows, columns=columns).sort_values("trial").reset_index(drop=True)


def _grid_point(trial_id: str, grid: Sequence[dict[str, Any]] | None) -> str:
    """The overrides of grid trial ``<experiment>_<index>`` (trial ids count the grid)."""
    _, _, index = trial_id.partition("_")
    if grid is None or not index.isdigit() or int(index) >= len(grid):
        return "(not started)"
    return describe(grid[int(index)])


def format_table(table: pd.DataFrame) -> str:
    """The table as text, text columns left-aligned, accuracies to 4 decimals."""
    formatters: dict[str, Callable[[Any], str]] = {
        k: (lambda v: "-" if pd.isna(v) else f"{v:.4f}")
        for k in ("acc_global_window", "acc_after_window")}
    for column in ("trial", "overrides", "status"):
        width = max([len(column), *(len(str(v)) for v in table[column])])
        formatters[column] = lambda v, w=width: str(v).ljust(w)
    return table.to_string(index=False, formatters=formatters, justify="left")
