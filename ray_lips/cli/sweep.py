"""``ray-lips sweep SPEC``: a Ray Tune sweep of federated runs, local or on a cluster."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ray_lips.cluster.jobpaths import in_ray_job, where
from ray_lips.cluster.sweep_spec import (
    ClusterError,
    SweepSpec,
    check_cluster,
    describe,
    parse_spec,
)
from ray_lips.config import DATASETS, ConfigError, apply_overrides, is_import_path, validate_config
from ray_lips.config.schema import read_yaml
from ray_lips.tracking import TrackConfig, choose, require_installed


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def resume_command(spec_file: str, overrides: tuple[str, ...]) -> str:
    """The command that continues this sweep, quoted for a POSIX shell."""
    return shlex.join(["ray-lips", "sweep", spec_file, "--resume",
                       *(part for o in overrides for part in ("--set", o))])


def load_spec_and_track(spec_file: str, overrides: tuple[str, ...], names: tuple[str, ...],
                        uri: str | None) -> tuple[SweepSpec, TrackConfig]:
    """The spec (``sweep_spec.load_spec``) without its ``track:`` section, which is not part of
    the experiment, and the trackers asked for (that section plus ``--track``)."""
    tree = apply_overrides(read_yaml(spec_file), overrides)
    section = tree.pop("track", None)
    track = choose(section, names, uri)
    require_installed(track)
    return parse_spec(tree), track


def _check_start(spec: SweepSpec, resume: bool) -> None:
    from ray_lips.cluster.tune_trial import can_resume, saved_spec  # noqa: PLC0415 - imports Ray Tune

    where = spec.experiment_dir
    if resume:
        if not can_resume(where):
            _fail(f"--resume: no sweep to resume in {where} (sweep.name and sweep.storage_path "
                  "locate it)")
        saved = saved_spec(where)
        if saved is not None and (saved.get("trials") != spec.trials
                                  or saved.get("base") != spec.base):
            _warn(f"the spec differs from the one the sweep started with; resuming runs the "
                  f"original trials (see {where / 'sweep_spec.yaml'})")
    elif can_resume(where):
        _fail(f"{where} already holds a sweep named {spec.name!r}; continue it with --resume, "
              "or start another with --set sweep.name=NEW_NAME")


def _check_configs(spec: SweepSpec) -> None:
    """The checks that read files or import the user's code, before Ray, once per distinct
    dataset and model of the trials: a user's module imported, a file or folder dataset found,
    fingerprinted and read once (every value of a ``.npz``, every image of a folder: a NaN
    would otherwise fail each trial on Ray), the sizes each partition needs. The base's dataset
    is then carried by absolute path with its fingerprint, as the trials receive it."""
    from ray_lips.config.checks import check_config, check_dataset_contents  # noqa: PLC0415

    checked: set[str] = set()
    try:
        spec.base = check_config(validate_config(spec.base)).to_dict()
        for overrides, cfg in zip(spec.trials, spec.trial_configs(), strict=True):
            dataset = overrides.get("data.dataset")
            if (isinstance(dataset, str) and dataset not in DATASETS
                    and not is_import_path(dataset)
                    and not Path(dataset).expanduser().is_absolute()):
                raise ConfigError(f"sweep: data.dataset: {dataset!r} in a trial must be an "
                                  "absolute path (trials run in their own folders)")
            key = cfg.data.model_dump_json() + cfg.model
            if key not in checked:
                checked.add(key)
                try:
                    check_dataset_contents(check_config(cfg))
                except ConfigError as err:
                    if not any(k == "model" or k.startswith("data.") for k in overrides):
                        raise  # the base's dataset and model: every trial's problem
                    raise ConfigError(f"sweep: the trial {describe(overrides)} is invalid: "
                                      f"{str(err).removeprefix('invalid config: ')}") from None
    except ConfigError as err:
        _fail(str(err))


def _connect_and_check(spec: SweepSpec, address: str | None) -> None:
    import ray  # noqa: PLC0415

    from ray_lips.cluster import connect as runtime  # noqa: PLC0415

    try:
        runtime.connect(address, while_starting=["ray_lips.cluster.tune_trial"])
        if spec.check_resources:
            check_cluster(spec, ray.nodes())
    except ClusterError as err:
        _fail(str(err))


@click.command("sweep")
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True,
              help="Override a key of the base config or of the sweep section, e.g. "
                   "--set train.rounds=10 --set sweep.max_concurrent_trials=2 (repeatable).")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted sweep in the spec's storage_path/name: finished "
                   "trials are kept, unfinished and failed ones continue from their checkpoints.")
@click.option("--address", default=None,
              help="Ray cluster to join (default: $RAY_ADDRESS, else a private local Ray).")
@click.option("--track", "track_names", multiple=True,
              help="Log every trial to an experiment tracker: mlflow, wandb, tensorboard "
                   "(repeatable or comma-separated; added to the spec's track: section; none: "
                   "no tracker). A resumed sweep keeps the trackers it started with.")
@click.option("--track-uri", default=None,
              help="MLflow's tracking URI (default: the file store STORAGE/NAME/mlruns).")
def sweep(spec_file: str, overrides: tuple[str, ...], resume: bool, address: str | None,
          track_names: tuple[str, ...], track_uri: str | None) -> None:
    """Run the Ray Tune sweep described by SPEC (a run config plus a `sweep:` section)."""
    try:
        spec, track = load_spec_and_track(spec_file, overrides, track_names, track_uri)
    except ConfigError as err:
        _fail(str(err))
        return
    if spec.storage_is_relative and in_ray_job():
        click.echo(f"sweep.storage_path is relative: inside a Ray job it is taken from the home "
                   f"folder, not from the job's temporary copy of the working directory "
                   f"({spec.storage_path})", err=True)
    _check_configs(spec)  # before comparing with a saved spec: its base was checked too
    _check_start(spec, resume)
    click.echo(f"sweep {spec.name!r}: {spec.total_trials} trial(s) -> "
               f"{where(spec.experiment_dir)}", err=True)
    for overrides_ in spec.trials[:20]:
        click.echo(f"  {describe(overrides_)}", err=True)
    if len(spec.trials) > 20:
        click.echo(f"  ... and {len(spec.trials) - 20} more", err=True)
    _connect_and_check(spec, address)

    from ray_lips.cluster.sweep_stop import (  # noqa: PLC0415
        TrialActorsCallback,
        mark_running_interrupted,
        sigterm_received,
        stop_trial_actors,
        terminate_on_sigterm,
    )
    from ray_lips.cluster.tune_trial import (  # noqa: PLC0415
        TrackerCallback,
        expected_trials,
        format_table,
        mark_interrupted,
        run_sweep,
        saved_spec,
        trial_table,
    )

    expected = expected_trials(spec, resume)
    try:
        with terminate_on_sigterm(spec.experiment_dir):
            trackers = ([TrackerCallback(track, spec.base, spec.name, spec.experiment_dir)]
                        if track.names else [])
            results = run_sweep(spec, resume=resume,
                                callbacks=[TrialActorsCallback(), *trackers])
    except KeyboardInterrupt:
        if not sigterm_received():
            raise
        stop_trial_actors()
        mark_running_interrupted(spec.experiment_dir)
        click.echo(f"storage: {where(spec.experiment_dir)}")
        _fail(f"stopped by SIGTERM; the unfinished trials are marked interrupted; continue "
              f"with: {resume_command(spec_file, overrides)}", 143)
        return
    mark_interrupted(results)
    saved = saved_spec(spec.experiment_dir) if resume else None
    grid = (saved or {}).get("trials", spec.trials)
    table = trial_table(results, grid if not spec.random and spec.num_samples == 1 else None)
    click.echo("")
    click.echo(format_table(table))
    click.echo(f"storage: {where(spec.experiment_dir)}")
    unfinished = table["status"].isin(["interrupted", "running", "pending"]).sum() + max(
        0, expected - len(table))
    failed = table["status"].isin(["failed", "error"]).sum()
    if unfinished:
        _fail(f"{unfinished} trial(s) did not finish; continue with: "
              f"{resume_command(spec_file, overrides)}", 130)
    if failed:
        _fail(f"{failed} trial(s) failed; see error.txt in their directories "
              f"(--resume retries them from their last checkpoints)", 1)


if __name__ == "__main__":
    sweep()
