"""The ``ray-lips`` command line."""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import click

from ray_lips.config import ConfigError, ExperimentConfig, load_config
from ray_lips.results import RunLockedError, RunWriter, new_run_dir, run_lock

SET_HELP = "Override a config key, e.g. --set train.rounds=10 (repeatable)."
ADDRESS_HELP = "Ray cluster to join (default: $RAY_ADDRESS, else a private local Ray)."


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(config: str, overrides: tuple[str, ...]) -> ExperimentConfig:
    try:
        return absolute_paths(load_config(config, overrides))
    except ConfigError as err:
        _fail(str(err))
        raise  # unreachable


def _preflight(cfg: ExperimentConfig, uses_ray: bool = True) -> None:
    """The checks that need no Ray (files, folders, modules, data sizes): exit 2 with one
    line."""
    from ray_lips.preflight import check_before_ray

    try:
        for warning in check_before_ray(cfg, uses_ray):
            click.echo(f"warning: {warning}", err=True)
    except ConfigError as err:
        _fail(str(err))


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Relative folders in the config, resolved against where the user stands: Ray's workers
    start elsewhere (see ``runtime.connect``)."""
    if not cfg.data.root.startswith("~"):
        cfg.data.root = str(Path(cfg.data.root).resolve())
    if cfg.resources.spill_dir and not cfg.resources.spill_dir.startswith("~"):
        cfg.resources.spill_dir = str(Path(cfg.resources.spill_dir).resolve())
    return cfg


@click.group()
@click.version_option(package_name="ray-lips")
def main() -> None:
    """Federated LIPS and FedAvg experiments on Ray."""


def _connect_and_check(cfg: ExperimentConfig, address: str | None, runs: int) -> None:
    from ray_lips.runtime import ClusterError, check_resources, connect

    connect(address, while_starting=["ray_lips.launch"])
    try:
        check_resources(cfg, concurrent_runs=runs)
    except ClusterError as err:
        _fail(str(err))


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a scheduler, ``kill``): an interruption like Ctrl+C."""


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise Terminated("stopped by SIGTERM")


def _run_and_report(runs, *, no_ray: bool = False) -> dict:
    """Run and return the summaries; any failure ends the command with one message naming
    the run directories and what to do next (no traceback)."""
    from ray_lips.engine.aggregate import DivergenceError

    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        if no_ray:
            from ray_lips.engine.experiment import run_local

            return {label: run_local(cfg, run_dir) for label, cfg, run_dir in runs}
        from ray_lips.launch import run_on_ray

        return run_on_ray(runs)
    except KeyboardInterrupt as err:
        dirs = " ".join(str(d) for _, _, d in runs)
        how = str(err) or "interrupted"
        code = 143 if isinstance(err, Terminated) else 130
        _fail(f"{how}; resume with: ray-lips run --resume {dirs}", code)
    except Exception as err:  # noqa: BLE001 - report any failure with the run directory
        cause = getattr(err, "cause", None) or err
        for _, _, run_dir in runs:
            click.echo(f"run directory: {run_dir}", err=True)
        if isinstance(cause, DivergenceError):
            hint = (" (resuming would diverge again: start a new run with a lower train.lr, "
                    "or set train.grad_clip)")
        else:
            hint = " (ray-lips run --resume RUN_DIR continues it)"
        _fail(f"{type(cause).__name__}: {cause}{hint}", 1)
    return {}


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--resume", "resume_dir", default=None, type=click.Path(file_okay=False),
              help="Continue the interrupted run in this directory.")
@click.option("--local", "no_ray", is_flag=True,
              help="Run in this process without Ray (pools run one after another).")
def run(config: str | None, overrides: tuple[str, ...], address: str | None,
        resume_dir: str | None, no_ray: bool) -> None:
    """Run one experiment from CONFIG (a run config or a sweep spec's base)."""
    if resume_dir:
        run_dir = Path(resume_dir).resolve()
        if not (run_dir / "config.yaml").is_file():
            _fail(f"--resume: {resume_dir} holds no config.yaml; is it a run directory?")
        if overrides or config:
            _fail("--resume takes the run's own config; do not pass CONFIG or --set")
        writer = RunWriter(run_dir)
        try:
            cfg = absolute_paths(writer.read_config())
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
        run_dir = new_run_dir(cfg)
        RunWriter(run_dir).write_config(cfg)
    click.echo(f"run directory: {run_dir}", err=True)
    try:
        with run_lock(run_dir):
            summary = _run_one(cfg, run_dir, address, no_ray)
    except RunLockedError as err:
        _fail(str(err))
    click.echo(_summary_table({_label(cfg): summary}))
    click.echo(str(run_dir))


def _label(cfg: ExperimentConfig) -> str:
    return cfg.algorithm if cfg.handout == "dense" else f"{cfg.algorithm}+{cfg.handout}"


def _run_one(cfg: ExperimentConfig, run_dir: Path, address: str | None,
             no_ray: bool) -> dict:
    if not no_ray:
        _connect_and_check(cfg, address, runs=1)
    return _run_and_report([(_label(cfg), cfg, run_dir)], no_ray=no_ray)[_label(cfg)]


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
    pairs = [(lbl, _baseline_of(lbl)) for lbl in labels if _baseline_of(lbl) in summaries]
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


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--algorithms", "methods", default="fedavg,lips", show_default=True,
              help="Comma-separated methods to run side by side: an algorithm (fedavg, "
                   "fedprox, scaffold, fedper, ditto, local), ALGORITHM+lips for it with the "
                   "LIPS hand-out, or lips (= fedavg+lips).")
def compare(config: str, overrides: tuple[str, ...], address: str | None,
            methods: str) -> None:
    """Run CONFIG once per method (same seed, same data) concurrently and compare them."""
    base = _load(config, overrides)
    _preflight(base)
    runs = []
    for method in [m.strip() for m in methods.split(",") if m.strip()]:
        algorithm, handout = _method_keys(method)
        cfg = _load(config, (*overrides, f"algorithm={algorithm}", f"handout={handout}"))
        run_dir = new_run_dir(cfg)
        RunWriter(run_dir).write_config(cfg)
        runs.append((method, cfg, run_dir))
    _connect_and_check(base, address, runs=len(runs))
    summaries = _run_and_report(runs)
    click.echo("")
    click.echo(_summary_table(summaries))
    for label, _, run_dir in runs:
        click.echo(f"{label:>12s}: {run_dir}")
    figure = _inertia_figure([d for _, _, d in runs])
    if figure:
        click.echo(f"inertia figure: {figure}")


def _inertia_figure(run_dirs: list[Path]) -> Path | None:
    """Draw the layer-wise inertia figure when the analysis package is available."""
    try:
        from analysis.figures import inertia_figure  # noqa: PLC0415
    except ImportError:
        return None
    out = Path(run_dirs[0]).parent / "inertia.png"
    return inertia_figure(run_dirs, out)


def _register_subcommands() -> None:
    from ray_lips.report_cli import report
    from ray_lips.sweep_cli import sweep

    main.add_command(sweep)
    main.add_command(report)


_register_subcommands()

if __name__ == "__main__":
    main()
