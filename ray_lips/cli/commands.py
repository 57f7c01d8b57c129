"""The ``ray-lips`` command line."""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ray_lips.algorithms import registry
from ray_lips.cluster.jobpaths import durable_path
from ray_lips.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    load_config,
    validate_config,
)
from ray_lips.config.checks import check_config
from ray_lips.config.schema import read_yaml
from ray_lips.core.run_folder import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    ROUNDS_FILE,
    STATUS_FILE,
    RunLockedError,
    RunWriter,
    new_run_dir,
    run_lock,
)

if TYPE_CHECKING:
    from ray_lips.tracking import TrackConfig

SET_HELP = "Override a config key, e.g. --set train.rounds=10 (repeatable)."
TRACK_HELP = ("Log to an experiment tracker: mlflow, wandb, tensorboard (repeatable or "
              "comma-separated; added to the config's track: section; none: no tracker).")
TRACK_URI_HELP = "MLflow's tracking URI (default: the file store OUTPUT/mlruns)."
ADDRESS_HELP = "Ray cluster to join (default: $RAY_ADDRESS, else a private local Ray)."


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(config: str, overrides: tuple[str, ...]) -> ExperimentConfig:
    """The validated and checked config; a ``--set`` that changes more than its own key says so
    (one line each)."""
    notes: list[str] = []
    try:
        cfg = absolute_paths(check_config(load_config(config, overrides, notes)))
    except ConfigError as err:
        _fail(str(err))
        raise  # unreachable
    for note in notes:
        click.echo(f"note: {note}", err=True)
    return cfg


def _variant(base: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """``base`` with more keys set: validated, not checked again (``base`` was) but for an
    algorithm of the user's it names."""
    from ray_lips.config.checks import check_algorithm

    try:
        return check_algorithm(validate_config(apply_overrides(base.to_dict(), overrides)))
    except ConfigError as err:
        _fail(str(err))
        raise  # unreachable


def _preflight(cfg: ExperimentConfig, uses_ray: bool = True) -> None:
    """The checks that need no Ray (files, folders, modules, data sizes): exit 2 with one
    line."""
    from ray_lips.config.checks import check_before_ray

    try:
        for warning in check_before_ray(cfg, uses_ray):
            click.echo(f"warning: {warning}", err=True)
    except ConfigError as err:
        _fail(str(err))


def _trackers(config: str | None, overrides: tuple[str, ...], names: tuple[str, ...],
              uri: str | None, resumed: Path | None = None) -> TrackConfig:
    """The trackers asked for (the config file's ``track:`` section, after ``--set``, plus
    ``--track``; resuming ``resumed`` without ``--track``: the trackers it logged to); exit 2
    with one line naming the extra to install when one is missing."""
    from ray_lips.tracking import choose, continued, require_installed, section_of

    try:
        section = section_of(apply_overrides(read_yaml(config), overrides)) if config else None
        track = (continued(resumed, uri) if resumed is not None and not names
                 else choose(section, names, uri))
        require_installed(track)
    except ConfigError as err:
        _fail(str(err))
        raise  # unreachable
    return track


class _Tracked(contextlib.AbstractContextManager):
    """The trackers of a command's runs, open from the start to the end of the command;
    closed as failed when it ends with an error or an interruption."""

    def __init__(self, track: TrackConfig, runs: list[Run]):
        from ray_lips.tracking import RunTrackers, run_info

        self.runs = {label: RunTrackers(track, run_info(cfg, run_dir))
                     for label, cfg, run_dir in runs} if track.names else {}

    @property
    def hook(self) -> OnRound | None:
        """What ``_run_and_report`` calls with every round's row; none without trackers."""
        return self._log_round if self.runs else None

    def _log_round(self, label: str, row: dict) -> None:
        if label in self.runs:
            self.runs[label].log_round(row)

    def log_summaries(self, summaries: dict[str, dict]) -> None:
        for label, summary in summaries.items():
            if label in self.runs:
                self.runs[label].log_summary(summary)

    def log_figure(self, path: Path | None) -> None:
        for trackers in self.runs.values():
            trackers.log_figure(path)

    def __exit__(self, kind: object, *rest: object) -> None:
        for trackers in self.runs.values():
            trackers.close(failed=kind is not None)


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Relative folders in the config, resolved against where the user stands: Ray's workers
    start elsewhere (see ``runtime.connect``). A relative ``output`` inside a ``ray job submit``
    job goes below the home folder, not into the job's temporary copy of the working directory
    (``jobpaths.durable_path``)."""
    cfg = cfg.model_copy(update={"output": str(durable_path(cfg.output))})  # a plain path
    if not cfg.data.root.startswith("~"):
        cfg.data.root = str(Path(cfg.data.root).resolve())
    if cfg.resources.spill_dir and not cfg.resources.spill_dir.startswith("~"):
        cfg.resources.spill_dir = str(Path(cfg.resources.spill_dir).resolve())
    return cfg


@click.group()
@click.version_option(package_name="ray-lips")
def main() -> None:
    """Federated LIPS and FedAvg experiments on Ray."""


def _connect_and_check(cfg: ExperimentConfig, address: str | None) -> None:
    """Join or start Ray and check that one run of ``cfg`` fits the cluster: exit 2 with one
    line if not. Called before any run folder is made."""
    from ray_lips.cluster.connect import ClusterError, check_resources, connect

    try:
        connect(address, while_starting=["ray_lips.cluster.driver"])
        check_resources(cfg, concurrent_runs=1)
    except ClusterError as err:  # connect turns Ray's connection and token errors into these
        _fail(str(err))


def _lock(stack: contextlib.ExitStack, run_dir: Path) -> None:
    """Hold ``run_dir``'s run lock until ``stack`` closes; exit 2 if another process has it."""
    try:
        stack.enter_context(run_lock(run_dir))
    except RunLockedError as err:
        _fail(str(err))


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a scheduler, ``kill``): an interruption like Ctrl+C."""


_SIGTERM_SEEN: list[int] = []  # Ray turns an interruption inside ray.get into a bare one


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    _SIGTERM_SEEN.append(signum)
    raise Terminated("stopped by SIGTERM")


Run = tuple[str, ExperimentConfig, Path]  # label, config, run directory
OnRound = Callable[[str, dict], None]  # a run's label and a round's row


def _run_and_report(runs: list[Run], *, no_ray: bool = False, created: bool = False,
                    on_round: OnRound | None = None) -> dict:
    """Run and return the summaries; any failure ends the command with one line saying what
    failed and, where a resume can help, the command that resumes it (no traceback).

    ``created``: this command made the run folders; those of runs that never trained are
    removed after a failure that a resume cannot help. ``on_round``: called here with each
    run's label and every round's row (the trackers).
    """
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        if no_ray:
            return {label: _run_here(cfg, run_dir, label, on_round)
                    for label, cfg, run_dir in runs}
        from ray_lips.cluster.driver import run_on_ray

        return run_on_ray(runs, on_round=on_round)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated) or bool(_SIGTERM_SEEN)
        how = "stopped by SIGTERM" if terminated else str(err) or "interrupted"
        code = 143 if terminated else 130
        _fail(f"{how}; {_resume_hint([d for _, _, d in _unfinished(runs)])}", code)
    except Exception as err:  # noqa: BLE001 - report any failure in one line
        _fail(_failure_message(err, runs, created), 1)
    return {}


def _run_here(cfg: ExperimentConfig, run_dir: Path, label: str,
              on_round: OnRound | None) -> dict:
    """One run in this process (``--local``); ``core.run.run_local`` with ``on_round``."""
    from ray_lips.core.run import FederatedRun, drive, run_local

    if on_round is None:
        return run_local(cfg, run_dir)
    run = FederatedRun(cfg, run_dir)
    try:
        return drive(run, lambda row: on_round(label, row))
    except BaseException as err:
        run.writer.write_end(err)  # as well as the disk allows; the error is this one
        raise
    finally:
        run.close()


def _failure_message(err: Exception, runs: list[Run], created: bool) -> str:
    """The line that ends a failed command, after tidying the run folders it leaves."""
    from ray_lips.cluster.driver import resuming_can_help
    from ray_lips.core.failure import DivergenceError, error_line, root_cause

    cause = root_cause(err)
    failed = getattr(err, "label", None)  # run_on_ray names the run that failed
    line = error_line(cause)
    if failed is not None and len(runs) > 1:
        line = f"{failed}: {line}"
    if isinstance(cause, DivergenceError):
        return (f"{line} (resuming would diverge again: start a new run with a lower "
                "train.lr, or set train.grad_clip)")
    if resuming_can_help(cause):
        return f"{line}; {_resume_hint([d for _, _, d in _unfinished(runs)])}"
    # Resuming would meet the same error. A run that never trained leaves nothing behind; the
    # other runs of a compare, stopped with the failed one, can be resumed.
    stopped = []
    for label, _, run_dir in _unfinished(runs):
        if created and _remove_untrained(run_dir):
            continue
        if failed is not None and label != failed:
            stopped.append(run_dir)
    return f"{line}; {_resume_hint(stopped, 'the others')}" if stopped else line


def _unfinished(runs: list[Run]) -> list[Run]:
    return [run for run in runs if RunWriter(run[2]).read_status().get("status") != "finished"]


def _resume_hint(run_dirs: list[Path], what: str = "") -> str:
    """``resume with: ray-lips run --resume DIR`` (one command a run folder)."""
    commands = " && ".join(shlex.join(["ray-lips", "run", "--resume", str(run_dir)])
                           for run_dir in run_dirs)
    return f"resume {what + ' ' if what else ''}with: {commands}"


_CREATED_FILES = (CONFIG_FILE, STATUS_FILE, ".lock")


def _remove_untrained(run_dir: Path) -> bool:
    """Remove a run folder this command made whose run never trained (no round written, no
    checkpoint): only the files ray-lips wrote there, and the folder if that empties it.
    Returns whether the folder is gone."""
    checkpoints = run_dir / CHECKPOINT_DIR
    if (run_dir / ROUNDS_FILE).exists() or (
            checkpoints.is_dir() and not checkpoints.is_symlink() and any(checkpoints.iterdir())):
        return False
    for name in _CREATED_FILES:
        (run_dir / name).unlink(missing_ok=True)  # a planted link is removed, not followed
    for folder in (checkpoints, run_dir):
        with contextlib.suppress(OSError):  # kept when not empty (or not a folder)
            folder.rmdir()
    return not run_dir.exists()


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--resume", "resume_dir", default=None, type=click.Path(file_okay=False),
              help="Continue the interrupted run in this directory (and the tracker runs it "
                   "logged to, unless --track names others).")
@click.option("--local", "no_ray", is_flag=True,
              help="Run in this process without Ray (pools run one after another).")
@click.option("--track", "track_names", multiple=True, help=TRACK_HELP)
@click.option("--track-uri", default=None, help=TRACK_URI_HELP)
def run(config: str | None, overrides: tuple[str, ...], address: str | None,
        resume_dir: str | None, no_ray: bool, track_names: tuple[str, ...],
        track_uri: str | None) -> None:
    """Run one experiment from CONFIG (a run config or a sweep spec's base)."""
    if resume_dir:
        run_dir = Path(resume_dir).resolve()
        if not (run_dir / "config.yaml").is_file():
            _fail(f"--resume: {resume_dir} holds no config.yaml; is it a run directory?")
        if overrides or config:
            _fail("--resume takes the run's own config; do not pass CONFIG or --set")
        writer = RunWriter(run_dir)
        try:
            cfg = absolute_paths(check_config(writer.read_config()))
        except ConfigError as err:
            _fail(f"--resume: {run_dir / 'config.yaml'}: {err}")
        status = writer.read_status()
        if status.get("status") == "finished":
            click.echo(f"{run_dir} is finished ({status.get('round')} of "
                       f"{status.get('rounds')} rounds); nothing to resume", err=True)
            if status.get("summary"):
                click.echo(_summary_table({_label(cfg): status["summary"]}))
            return
        _preflight(cfg, uses_ray=not no_ray)
    else:
        if not config:
            _fail("give a CONFIG file or --resume RUN_DIR")
        cfg = _load(config, overrides)
        _preflight(cfg, uses_ray=not no_ray)
    track = _trackers(None if resume_dir else config, overrides, track_names, track_uri,
                      resumed=run_dir if resume_dir else None)
    label = _label(cfg)
    with contextlib.ExitStack() as stack:
        if resume_dir:
            _lock(stack, run_dir)
        if not no_ray:  # before a run folder is made: a refusal leaves none behind
            _connect_and_check(cfg, address)
        if not resume_dir:
            run_dir = new_run_dir(cfg)
            RunWriter(run_dir).write_config(cfg)
            _lock(stack, run_dir)
        click.echo(f"run directory: {run_dir}", err=True)
        tracked = stack.enter_context(_Tracked(track, [(label, cfg, run_dir)]))
        summary = _run_and_report([(label, cfg, run_dir)], no_ray=no_ray,
                                  created=not resume_dir, on_round=tracked.hook)[label]
        tracked.log_summaries({label: summary})
    click.echo(_summary_table({label: summary}))
    click.echo(str(run_dir))


def _label(cfg: ExperimentConfig) -> str:
    return cfg.method


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        f"{value:.4f}"


def _summary_table(summaries: dict[str, dict]) -> str:
    labels = list(summaries)
    first = next(iter(summaries.values()))
    window = first.get("final_window", 10)
    metrics = [
        (f"acc_global (mean of last {window} eval rounds)", "acc_global_window"),
        (f"acc_after  (mean of last {window} eval rounds)", "acc_after_window"),
        ("acc_global (last round)", "acc_global_last"),
        ("acc_after  (last round)", "acc_after_last"),
        (f"acc_test   (mean of last {window}, test subset)", "acc_test_window"),
        ("acc_finetune (client mean)", "acc_finetune_mean"),
        ("acc_finetune_bnrecal (client mean)", "acc_finetune_bnrecal_mean"),
        ("seconds per round", "seconds_per_round"),
    ]
    # a gain needs a baseline other than the method itself among the runs
    pairs = [(lbl, base) for lbl in labels
             if (base := _baseline_of(lbl)) != lbl and base in summaries]
    width = max(12, *(len(lbl) + 2 for lbl in labels))
    header = f"{'metric':44s}" + "".join(f"{lbl:>{width}s}" for lbl in labels)
    header += "".join(f"{'gain ' + lbl:>{width + 5}s}" for lbl, _ in pairs)
    lines = [header, "-" * len(header)]
    for title, key in metrics:
        line = f"{title:44s}" + "".join(f"{_fmt(summaries[lbl].get(key)):>{width}s}"
                                        for lbl in labels)
        for lbl, base in pairs:
            if key == "seconds_per_round":
                line += " " * (width + 5)
                continue
            gain = summaries[lbl].get(key, math.nan) - summaries[base].get(key, math.nan)
            line += f"{'-' if math.isnan(gain) else f'{gain:+.4f}':>{width + 5}s}"
        lines.append(line)
    if pairs:
        lines.append("gain: against the same algorithm with the dense hand-out ("
                     + ", ".join(f"{lbl} - {base}" for lbl, base in pairs) + ")")
    return "\n".join(lines)


def _method_keys(method: str) -> tuple[str, str]:
    """``fedprox+lips`` -> (fedprox, lips); ``lips`` (shorthand) -> (fedavg, lips)."""
    if method == "lips":
        return "fedavg", "lips"
    algorithm, _, handout = method.partition("+")
    return algorithm, handout or "dense"


def _baseline_of(method: str) -> str:
    """The method a gain is measured against: the same algorithm, dense (``lips``: fedavg)."""
    algorithm, handout = _method_keys(method)
    return method if handout == "dense" else algorithm


ALGORITHMS_HELP = (
    "Comma-separated methods to run side by side: an algorithm ("
    + ", ".join(registry.names()) + ", or your own as package.module:Class), ALGORITHM+lips "
    "for it with the LIPS hand-out (" + ", ".join(registry.composable_with_lips())
    + "), ALGORITHM+freeze for it with the freeze hand-out (the same algorithms), or lips "
    "(= fedavg+lips).")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--algorithms", "methods", default="fedavg,lips", show_default=True,
              help=ALGORITHMS_HELP)
@click.option("--track", "track_names", multiple=True, help=TRACK_HELP)
@click.option("--track-uri", default=None, help=TRACK_URI_HELP)
def compare(config: str, overrides: tuple[str, ...], address: str | None,
            methods: str, track_names: tuple[str, ...], track_uri: str | None) -> None:
    """Run CONFIG once per method (same seed, same data) and compare them: as many at a time
    as the cluster holds, the others queued until one finishes."""
    base = _load(config, overrides)
    _preflight(base)
    track = _trackers(config, overrides, track_names, track_uri)
    asked = [m.strip() for m in methods.split(",") if m.strip()]
    if not asked:
        _fail("--algorithms: name at least one method, e.g. --algorithms fedavg,lips")
    cfgs: dict[str, ExperimentConfig] = {}  # by the label run folders and reports use too
    for method in asked:
        algorithm, handout = _method_keys(method)
        cfg = _variant(base, [f"algorithm={algorithm}", f"handout={handout}"])
        cfgs.setdefault(_label(cfg), cfg)  # ``lips`` and ``fedavg+lips`` are one method
    labels = list(cfgs)
    _connect_and_check(base, address)  # one run must fit; the others wait their turn
    import ray

    from ray_lips.cluster.driver import runs_at_once

    at_once = runs_at_once(list(cfgs.values()), ray.cluster_resources())
    click.echo(f"compare: {len(labels)} run(s), "
               + (f"{at_once} at a time on this cluster" if at_once < len(labels)
                  else "all at once"), err=True)
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        for method, cfg in cfgs.items():
            run_dir = new_run_dir(cfg)
            RunWriter(run_dir).write_config(cfg)
            _lock(stack, run_dir)
            runs.append((method, cfg, run_dir))
            click.echo(f"run directory ({method}): {run_dir}", err=True)
        tracked = stack.enter_context(_Tracked(track, runs))
        summaries = _run_and_report(runs, created=True, on_round=tracked.hook)
        tracked.log_summaries(summaries)
        click.echo("")
        click.echo(_summary_table(summaries))
        for label, _, run_dir in runs:
            click.echo(f"{label:>12s}: {run_dir}")
        figure = _inertia_figure(runs)
        if figure:
            click.echo(f"inertia figure: {figure}")
            tracked.log_figure(figure)


def _figure_path(runs: list[Run]) -> Path:
    """Beside the compared runs, named after the first run's folder with ``compare`` for its
    method (``demo_compare_s0_20250101-120000_inertia.png``): each compare its own figure."""
    _, cfg, run_dir = runs[0]
    prefix = f"{cfg.name}_{_label(cfg)}_"
    name = run_dir.name
    stem = (f"{cfg.name}_compare_{name[len(prefix):]}" if name.startswith(prefix) else name)
    return run_dir.parent / f"{stem}_inertia.png"


def _inertia_figure(runs: list[Run]) -> Path | None:
    """Draw the layer-wise inertia figure when the analysis package is available."""
    try:
        from analysis.figures import inertia_figure  # noqa: PLC0415
    except ImportError:
        return None
    return inertia_figure([run_dir for _, _, run_dir in runs], _figure_path(runs))


def _register_subcommands() -> None:
    from ray_lips.cli.report import report
    from ray_lips.cli.sweep import sweep

    main.add_command(sweep)
    main.add_command(report)


_register_subcommands()

if __name__ == "__main__":
    main()
