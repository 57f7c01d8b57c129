"""Communication: what each method's clients download and upload, and accuracy against it.

Reads the traffic columns of ``rounds.parquet`` (``down_bytes``, ``up_bytes``,
``down_bytes_dense``: per round, summed over the clients handed the model and the clients that
trained; see :mod:`ray_lips.core.traffic`). Runs written before those columns existed have no
traffic and are left out here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import _colours, _grid, _method_sort, _style, _wrap, save
from analysis.frames import Table
from analysis.methods import label_sort_key

TRAFFIC_COLUMNS = ("down_bytes", "up_bytes", "down_bytes_dense")
MB = 2**20


def traffic_rounds(rounds: pd.DataFrame, statuses: Sequence[str] = ("finished",)
                   ) -> pd.DataFrame:
    """The rounds of runs in ``statuses`` that record traffic, in round order per run, with
    ``traffic_bytes`` (down + up of the round) and ``cumulative_bytes`` (up to and with it)."""
    if rounds.empty or any(c not in rounds for c in TRAFFIC_COLUMNS):
        return pd.DataFrame(columns=[*rounds.columns, "traffic_bytes", "cumulative_bytes"])
    rows = rounds[rounds["status"].isin(statuses)] if "status" in rounds else rounds
    rows = rows.dropna(subset=list(TRAFFIC_COLUMNS)).sort_values(["run_id", "round"])
    rows = rows.assign(traffic_bytes=rows["down_bytes"] + rows["up_bytes"])
    return rows.assign(cumulative_bytes=rows.groupby("run_id")["traffic_bytes"].cumsum())


def traffic_per_run(rounds: pd.DataFrame, statuses: Sequence[str] = ("finished",)
                    ) -> pd.DataFrame:
    """Per run: total and per-round downlink and uplink, and the downlink a dense hand-out
    would have cost."""
    rows = traffic_rounds(rounds, statuses)
    keys = [c for c in ("run_id", "setting", "method", "seed") if c in rows]
    if rows.empty:
        return pd.DataFrame(columns=[*keys, "rounds", "down_total", "up_total",
                                     "down_dense_total", "down_per_round", "up_per_round"])
    per_run = rows.groupby(keys, dropna=False).agg(
        rounds=("round", "count"), down_total=("down_bytes", "sum"),
        up_total=("up_bytes", "sum"), down_dense_total=("down_bytes_dense", "sum"))
    per_run = per_run.reset_index()
    per_run["down_per_round"] = per_run["down_total"] / per_run["rounds"]
    per_run["up_per_round"] = per_run["up_total"] / per_run["rounds"]
    return per_run


def traffic_table(rounds: pd.DataFrame, statuses: Sequence[str] = ("finished",)) -> Table:
    """Per setting and method, means over seeds: total and per-round downlink and uplink (MB)
    and the share of the dense downlink saved by the hand-out."""
    per_run = traffic_per_run(rounds, statuses)
    columns = ["down_total", "up_total", "down_per_round", "up_per_round", "down_dense_total"]
    if per_run.empty:
        data = pd.DataFrame(columns=["setting", "method", "seeds", *columns, "down_saved"])
    else:
        data = per_run.groupby(["setting", "method"])[columns].mean()
        data.insert(0, "seeds", per_run.groupby(["setting", "method"])["run_id"].count())
        data = data.reset_index()
        data["down_saved"] = 1.0 - data["down_total"] / data["down_dense_total"]
        data = data.sort_values(["setting", "method"],
                                key=lambda s: s.map(label_sort_key) if s.name == "method" else s)
        data = data.reset_index(drop=True)
    display = pd.DataFrame({
        "setting": data["setting"], "method": data["method"], "n": data["seeds"],
        "down total (MB)": [f"{v / MB:.2f}" for v in data["down_total"]],
        "up total (MB)": [f"{v / MB:.2f}" for v in data["up_total"]],
        "down / round (MB)": [f"{v / MB:.3f}" for v in data["down_per_round"]],
        "up / round (MB)": [f"{v / MB:.3f}" for v in data["up_per_round"]],
        "downlink saved": [f"{v:.1%}" for v in data["down_saved"]],
    })
    caption = ("Bytes on the wire, summed over clients and rounds (mean over seeds; "
               "1 MB = 1,048,576 bytes). Downlink: the model each client is handed after each "
               "round (a LIPS sparse copy as kept values plus a bitmap of their positions, "
               "where smaller); uplink: what each trained client returns. Saved: against "
               "handing every client the dense model.")
    return Table(data, display, caption)


def accuracy_traffic_figure(rounds: pd.DataFrame, metric: str = "acc_global",
                            statuses: Sequence[str] = ("finished",)) -> Figure | None:
    """``metric`` against cumulative traffic (down + up, MB), one axis per setting, one line per
    method: mean over seeds at each evaluated round. None when no run records traffic."""
    rows = traffic_rounds(rounds, statuses)
    if "evaluated" in rows:
        rows = rows[rows["evaluated"].astype(bool)]
    rows = rows.dropna(subset=[metric]) if metric in rows else rows.iloc[0:0]
    if rows.empty:
        return None
    stats = rows.groupby(["setting", "method", "round"]).agg(
        accuracy=(metric, "mean"), traffic=("cumulative_bytes", "mean")).reset_index()
    settings = sorted(stats["setting"].unique())
    fig, axes = _grid(len(settings), 5.5, 3.8)
    colours = _colours(_method_sort(stats["method"].unique()))
    for ax, setting in zip(axes, settings, strict=True):
        here = stats[stats["setting"] == setting]
        for method in _method_sort(here["method"].unique()):
            line = here[here["method"] == method].sort_values("round")
            ax.plot(line["traffic"] / MB, line["accuracy"], color=colours[method], lw=1.6,
                    ls=_style(method), label=method)
        ax.set_title(_wrap(setting), fontsize=9)
        ax.set_xlabel("cumulative traffic, down + up (MB)")
        ax.set_ylabel(f"{metric} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return fig


def traffic_section(rounds: pd.DataFrame, metric: str, fig_dir: Path, table_dir: Path,
                    link: Callable[[Path], str]) -> list[str]:
    """The report's "Communication" section: the traffic table (saved as ``traffic.csv``,
    ``.md`` and ``.tex`` in ``table_dir``) and ``metric`` against cumulative traffic (saved in
    ``fig_dir``), as Markdown lines; ``link`` makes a saved file's link from the report."""
    table = traffic_table(rounds)
    lines = ["## Communication", ""]
    if table.data.empty:
        return lines + ["_No finished run records its traffic (runs written before "
                        "`rounds.parquet` had `down_bytes` and `up_bytes`)._", ""]
    table.save(table_dir, "traffic")
    lines += [table.to_markdown(), ""]
    fig = accuracy_traffic_figure(rounds, metric)
    if fig is not None:
        path = save(fig, fig_dir / f"{metric}_vs_traffic.png")
        lines += [f"![{metric} versus cumulative traffic]({link(path)})", "",
                  "_Mean over seeds at each evaluated round against the bytes downloaded and "
                  "uploaded by all clients up to that round._", ""]
    return lines
