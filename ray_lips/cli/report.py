"""``ray-lips report``: one Markdown report (tables and figures) for a run or a sweep."""

from __future__ import annotations

import sys

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
def report(dirs: tuple[str, ...], out: str | None, metric: str, last_round: bool,
           baseline: str) -> None:
    """Write a Markdown report of the runs found under DIR(s) and print its path.

    One row per method (algorithm, its knobs, hand-out), labelled e.g.
    ``fedprox(mu=0.01)+lips s=0.7 T=5``; gains against the chosen baseline.
    """
    from analysis.report import NoRunsError, build_report

    try:
        path = build_report(list(dirs), out=out, metric=metric, windowed=not last_round,
                            baseline=baseline)
    except NoRunsError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(str(path))


if __name__ == "__main__":
    report()
