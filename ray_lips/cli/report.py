"""``ray-lips report``: one Markdown report (tables and figures) for a run or a sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import click

METRICS = ("acc_global", "acc_after", "acc_before", "acc_test")
BASELINES = ("own", "fedavg")  # analysis.methods.BASELINES, without importing pandas here


@click.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Report folder (default: DIR/report, or a report folder in the common "
                   "parent of several DIRs).")
@click.option("--metric", default="acc_global", show_default=True, type=click.Choice(METRICS),
              help="Accuracy the tables and curves use.")
@click.option("--last-round", is_flag=True,
              help="Use the last evaluated round instead of the mean over the last "
                   "train.final_window evaluated rounds.")
@click.option("--baseline", default="own", show_default=True, type=click.Choice(BASELINES),
              help="What gains and paired comparisons are against: 'own' = the same algorithm "
                   "with the same knobs and the dense hand-out (FedProx+LIPS against FedProx); "
                   "'fedavg' = plain dense FedAvg for every method.")
@click.option("--track", "track_names", multiple=True,
              help="Also log the report (report.md, tables, figures) as one run of an "
                   "experiment tracker: mlflow, wandb, tensorboard (repeatable or "
                   "comma-separated).")
@click.option("--track-uri", default=None,
              help="MLflow's tracking URI (default: the runs' own file store, DIR/mlruns or "
                   "beside DIR).")
def report(dirs: tuple[str, ...], out: str | None, metric: str, last_round: bool,
           baseline: str, track_names: tuple[str, ...], track_uri: str | None) -> None:
    """Write a Markdown report of the runs found under DIR(s) and print its path.

    One row per method (algorithm, its knobs, hand-out), labelled e.g.
    ``fedprox(mu=0.01)+lips s=0.7 T=5``; gains against the chosen baseline.
    """
    from ray_lips.config import ConfigError
    from ray_lips.tracking import choose, require_installed

    try:  # before any work: a tracker asked for must be installed
        track = choose(None, track_names, track_uri)
        require_installed(track)
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    from analysis.report import NoRunsError, build_report

    try:
        path = build_report(list(dirs), out=out, metric=metric, windowed=not last_round,
                            baseline=baseline)
    except NoRunsError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    if track.names:
        _track(track, path, dirs, {"metric": metric, "windowed": str(not last_round),
                                   "baseline": baseline})
    click.echo(str(path))


def _track(track, report: Path, dirs: tuple[str, ...], params: dict[str, str]) -> None:
    """The report as a tracker run, in the experiment its runs logged to (their config's
    ``name`` where they share one, else the report folder's parent's name)."""
    import yaml

    from analysis.loaders import find_runs
    from ray_lips.tracking import log_report, report_store

    names = set()
    for run in find_runs([Path(d) for d in dirs]):
        try:
            names.add(yaml.safe_load((run / "config.yaml").read_text()).get("name"))
        except (OSError, yaml.YAMLError, AttributeError):
            continue
    experiment = names.pop() if len(names) == 1 and None not in names else \
        report.parent.parent.name
    log_report(track, report, experiment, report_store(Path(d) for d in dirs),
               {**params, "dirs": ", ".join(str(Path(d).resolve()) for d in dirs)})


if __name__ == "__main__":
    report()
