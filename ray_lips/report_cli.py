"""``ray-lips report``: one Markdown report (tables and figures) for a run or a sweep."""

from __future__ import annotations

import sys

import click

METRICS = ("acc_global", "acc_after", "acc_before", "acc_test")


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
def report(dirs: tuple[str, ...], out: str | None, metric: str, last_round: bool) -> None:
    """Write a Markdown report of the runs found under DIR(s) and print its path."""
    from analysis.report import NoRunsError, build_report

    try:
        path = build_report(list(dirs), out=out, metric=metric, windowed=not last_round)
    except NoRunsError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(str(path))


if __name__ == "__main__":
    report()
