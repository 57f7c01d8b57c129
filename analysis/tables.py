"""Paper-style tables from the ``runs`` frame, exported as Markdown, CSV and LaTeX.

Every table is a :class:`Table`: ``data`` holds the numbers (for CSV and further pandas work),
``display`` the formatted strings (for Markdown and LaTeX), ``caption`` says what the numbers
are. In LaTeX the best mean of each accuracy column is bold and a gain names its verdict.

Tables have one row per method and setting, methods grouped by family (what their clients
predict with: one global model; a global body with personal parts; personal models); a method
is named by its full label (the ``method`` column, see :mod:`analysis.methods`), so rows that
differ in any knob look different.
Gains are against a named baseline: ``own`` (the default; the same algorithm with the same
knobs and the dense hand-out) or ``fedavg`` (plain dense FedAvg for every method).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.frames import (
    ALPHA,
    MIN_SEEDS,
    Table,
    baseline_description,
    finished,
    mean_std,
    method_order,
    setting_display_columns,
    text_column,
    value_column,
)
from analysis.loaders import METRICS
from analysis.methods import baseline_labels, check_baseline, family_of, local_work_of
from analysis.paired import paired_frame

FINETUNE_COLUMNS = ("acc_finetune_mean", "acc_finetune_bnrecal_mean")
METHOD_COLUMNS = ("algorithm", "handout", "base_method", "sparsity", "period")


# ----- shared helpers ---------------------------------------------------------------------------
def metric_description(metric: str, windowed: bool, window: int | None) -> str:
    if metric not in METRICS:
        return f"`{metric}`"
    if not windowed:
        return f"`{metric}` at the last evaluated round"
    span = f"the last {window}" if window else "the last `train.final_window`"
    return f"`{metric}` averaged over {span} evaluated rounds (windowed)"


def final_windows(runs: pd.DataFrame) -> list[int]:
    done = finished(runs)
    return sorted({int(w) for w in done.get("final_window", pd.Series(dtype=int)).dropna()})


# ----- the final-accuracy table ----------------------------------------------------------------
def cell_stats(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean, std (ddof 1) and number of seeds per (setting, method), finished runs only.

    A seed counts once: of several finished runs of one cell and seed, the loader keeps the
    newest as ``finished`` and marks the others ``duplicate`` (:func:`mark_duplicates`).
    ``seeds`` counts the finished seeds even where the metric is missing (NaN mean): an
    algorithm without a global model has no ``acc_global`` but its runs did finish.
    """
    done = finished(runs)
    per_seed = (done.groupby(["setting", "method", "seed"], dropna=False)[column].mean()
                .reset_index())
    grouped = per_seed.groupby(["setting", "method"], dropna=False)[column]
    out = grouped.agg(["mean", "std", "size"]).rename(columns={"size": "seeds"})
    return out.reset_index()


def final_table(runs: pd.DataFrame, metric: str = "acc_global", windowed: bool = True,
                alpha: float = ALPHA, min_seeds: int = MIN_SEEDS,
                baseline: str = "own") -> Table:
    """Final accuracy mean ± std over seeds, one row per setting x method, with the gain.

    ``baseline`` names the method of the same setting each row's ``gain`` is taken against:
    ``own`` (the same algorithm and knobs with the dense hand-out) or ``fedavg`` (plain dense
    FedAvg). Rows that are a baseline themselves have no gain. ``verdict`` comes from the paired
    comparison with the same baseline (see :mod:`analysis.paired`). Both fine-tune scores are
    shown side by side. Runs that did not finish are left out of the numbers and counted in
    ``not_finished``. Columns of ``data``: the setting's, ``method`` and its parts
    (:data:`METHOD_COLUMNS`), ``family``, ``local_work`` (a participant's local training per
    round, in local epochs), ``seeds``, ``{column}_mean``/``_std``, the fine-tune means and
    stds, ``not_finished``, ``baseline`` (the partner's label), ``baseline_mean``,
    ``baseline_seeds``, ``gain``, ``paired_seeds``, ``p_ttest``, ``verdict``.
    """
    check_baseline(baseline)
    column = value_column(metric, windowed)
    display_cols = setting_display_columns(runs)
    if "has_config" in runs:  # a Tune trial that died before writing its config has no cell
        runs = runs[runs["has_config"]]
    first = runs.drop_duplicates(["setting", "method"])
    keys = first[["setting", "method", *display_cols, *METHOD_COLUMNS]].copy()
    configs = first.to_dict("records")
    keys["family"] = [family_of(config) for config in configs]
    keys["local_work"] = [local_work_of(config) for config in configs]
    data = keys.merge(cell_stats(runs, column), on=["setting", "method"], how="left")
    for ft in FINETUNE_COLUMNS:
        stats = cell_stats(runs, ft)[["setting", "method", "mean", "std"]]
        stats = stats.rename(columns={"mean": f"{ft}", "std": f"{ft}_std"})
        data = data.merge(stats, on=["setting", "method"], how="left")
    data["seeds"] = data["seeds"].fillna(0).astype(int)
    unfinished = runs[runs["status"] != "finished"].groupby(["setting", "method"]).size()
    data["not_finished"] = [int(unfinished.get((s, m), 0))
                            for s, m in zip(data["setting"], data["method"], strict=True)]
    data["baseline"] = baseline_labels(data, baseline)
    cells = {(s, m): (mean, n) for s, m, mean, n in zip(
        data["setting"], data["method"], data["mean"], data["seeds"], strict=True)}
    partners = [cells.get((s, b), (math.nan, 0)) if isinstance(b, str) else (math.nan, 0)
                for s, b in zip(data["setting"], data["baseline"], strict=True)]
    data["baseline_mean"] = [mean for mean, _ in partners]
    data["baseline_seeds"] = [int(n) for _, n in partners]
    data["gain"] = data["mean"] - data["baseline_mean"]
    paired = paired_frame(runs, metric, windowed, alpha, min_seeds, baseline)
    data = data.merge(paired[["setting", "method", "n", "p_ttest", "verdict"]].rename(
        columns={"n": "paired_seeds"}), on=["setting", "method"], how="left")
    data = method_order(data.rename(columns={"mean": f"{column}_mean", "std": f"{column}_std"}))
    window = final_windows(runs)
    caption = (f"{metric_description(metric, windowed, window[0] if len(window) == 1 else None)}"
               f": mean ± std over seeds (n = finished seeds per cell; '-' = the method has no "
               f"value for this metric). Gain = mean - the baseline's mean in the same setting; "
               f"baseline: {baseline_description(baseline)}; a baseline has no gain. "
               f"'(within noise)' marks a gain the paired test does not support "
               f"(p >= {alpha} or fewer than {min_seeds} paired seeds). Fine-tune: "
               f"acc_finetune keeps the BN statistics fine-tuning left, acc_finetune_bnrecal "
               f"recomputes them on the client's data. Local work: a participant's local "
               f"training per round, in local epochs (passes over its training data, each a "
               f"forward and a backward pass; in parentheses what differs, e.g. a part of the "
               f"model or extra forward passes).")
    best_of = {ft.removesuffix("_mean"): ft for ft in FINETUNE_COLUMNS}
    if column.startswith("acc_"):  # higher is better: an accuracy, not any runs column
        best_of = {column: f"{column}_mean", **best_of}
    return Table(data=data, display=_final_display(data, column, display_cols), caption=caption,
                 best_of=best_of, latex_cells={"gain": gain_cells(data, name_verdict=True)})


def gain_text(gain: float, verdict: object, baseline: object, baseline_seeds: int = 1,
              name_verdict: bool = False) -> str:
    """A gain cell: '-' for a baseline or a missing value, 'n/a (no X)' when X was not run.

    A gain the paired test does not support says '(within noise)'; ``name_verdict`` names a
    supported one too: '+0.031 (gain)', '-0.020 (loss)'.
    """
    if not isinstance(baseline, str):
        return "-"
    if not baseline_seeds:
        return f"n/a (no {baseline})"
    if gain is None or not np.isfinite(gain):
        return "-"
    text = f"{gain:+.3f}"
    if verdict in ("gain", "loss"):
        return f"{text} ({verdict})" if name_verdict else text
    return f"{text} (within noise)"


def gain_cells(data: pd.DataFrame, name_verdict: bool = False) -> list[str]:
    """:func:`gain_text` of every row of a final (or best) table's data."""
    return [gain_text(g, v, b, n, name_verdict) for g, v, b, n in zip(
        data["gain"], data["verdict"], data["baseline"], data["baseline_seeds"], strict=True)]


def _final_display(data: pd.DataFrame, column: str, display_cols: list[str]) -> pd.DataFrame:
    shown = {c.split(".")[-1]: text_column(data[c]) for c in display_cols}
    shown["family"] = data["family"]
    shown["method"] = data["method"]
    shown["local work"] = data["local_work"]
    shown["n"] = data["seeds"].astype(int)
    shown[column] = [mean_std(m, s, n) for m, s, n in zip(
        data[f"{column}_mean"], data[f"{column}_std"], data["seeds"], strict=True)]
    shown["baseline"] = [b if isinstance(b, str) else "-" for b in data["baseline"]]
    shown["gain"] = gain_cells(data)
    for ft in FINETUNE_COLUMNS:
        name = ft.removesuffix("_mean")
        shown[name] = [mean_std(m, s, n) for m, s, n in zip(
            data[ft], data[f"{ft}_std"], data["seeds"], strict=True)]
    frame = pd.DataFrame(shown)
    if data["not_finished"].any():
        frame["not finished"] = data["not_finished"].astype(int)
    return frame


# ----- best method per baseline ----------------------------------------------------------------
def metric_mean_column(data: pd.DataFrame) -> str:
    """The ``{column}_mean`` column of a :func:`final_table`'s data (the metric's mean)."""
    return next(c for c in data.columns if c.endswith("_mean") and c != "baseline_mean"
                and c not in FINETUNE_COLUMNS)


def best_table(final: Table) -> Table:
    """Per setting and baseline, the compared method with the highest mean, beside its baseline.

    Under the ``own`` baseline the candidates of ``fedprox(mu=0.01)`` are its LIPS hand-outs,
    so a row is the best LIPS setting on top of one algorithm; under ``fedavg`` every method is
    a candidate against FedAvg. Methods without a value for the metric are no candidates.
    """
    data = final.data
    mean_col = metric_mean_column(data)
    column = mean_col.removesuffix("_mean")
    compared = data[data["baseline"].notna() & data[mean_col].notna()]
    rows = []
    for (setting, baseline), group in compared.groupby(["setting", "baseline"], sort=False):
        best = group.loc[group[mean_col].idxmax()]
        base = data[(data["setting"] == setting) & (data["method"] == baseline)]
        rows.append({
            **best.to_dict(),
            "baseline_std": base[f"{column}_std"].iloc[0] if len(base) else math.nan,
            "candidates": len(group),
        })
    best = pd.DataFrame(rows)
    if best.empty:
        return Table(best, best, "No finished method with a finished baseline.")
    best = method_order(best)
    display_cols = [c for c in data.columns if c == "model" or c.startswith(("data.", "train."))]
    shown = pd.DataFrame({
        **{c.split(".")[-1]: text_column(best[c]) for c in display_cols},
        "baseline": best["baseline"],
        f"baseline {column}": [mean_std(m, s, n) for m, s, n in zip(
            best["baseline_mean"], best["baseline_std"], best["baseline_seeds"], strict=True)],
        "best method": best["method"],
        column: [mean_std(m, s, n) for m, s, n in zip(
            best[mean_col], best[f"{column}_std"], best["seeds"], strict=True)],
        "gain": gain_cells(best),
        "n": best["seeds"].astype(int),
        "methods tried": best["candidates"].astype(int),
    })
    caption = ("Per setting and baseline, the compared method with the highest mean final "
               "value. The best of several methods is chosen on the same seeds it is scored "
               "on, so its gain is optimistic.")
    best_of = {column: mean_col} if column.startswith("acc_") else {}
    return Table(best, shown, caption, best_of=best_of,
                 latex_cells={"gain": gain_cells(best, name_verdict=True)})


def gain_grid(final: Table, setting: str, base: str | None = None) -> pd.DataFrame:
    """Sparsity (rows) x period (columns) grid of the LIPS hand-outs' gain in one setting.

    ``base`` picks the algorithm the hand-out is on top of (a ``base_method`` label such as
    ``fedprox(mu=0.01)``); None takes every LIPS row. Cells that differ only in another knob
    (schedule, scorer, or the algorithm's when ``base`` is None) are averaged.
    """
    data = final.data
    rows = data[(data["setting"] == setting) & (data["handout"] == "lips")]
    if base is not None:
        rows = rows[rows["base_method"] == base]
    return rows.pivot_table(index="sparsity", columns="period", values="gain", aggfunc="mean")


def lips_bases(final: Table, setting: str) -> list[str]:
    """The algorithms (``base_method`` labels) with LIPS rows in a setting, in table order."""
    data = final.data
    rows = data[(data["setting"] == setting) & (data["handout"] == "lips")]
    return list(dict.fromkeys(rows["base_method"]))
