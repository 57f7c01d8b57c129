"""Paired comparisons of each method with its baseline: same setting, same seed, one
difference per seed.

A seed fixes the partition, the initial model and the batch order, so a method's run and its
baseline's run with the same seed differ only in the method. The baseline is named (see
:mod:`analysis.methods`): ``own``, the default, compares ``fedprox(mu=0.01)+lips ..`` with
``fedprox(mu=0.01)`` and ``fedavg+lips ..`` with ``fedavg``; ``fedavg`` compares every method with
plain dense FedAvg. The per-seed difference removes the seed-to-seed spread that an unpaired
comparison of means carries; a paired t-test (and a Wilcoxon signed-rank test) says whether the
mean difference stands out from its own spread. A difference is called a gain (or a loss) only
when p < ``alpha`` over at least ``min_seeds`` paired seeds; otherwise it is reported as within
noise. Seeds where either value is missing (a metric the algorithm does not have) are no pairs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.frames import (
    ALPHA,
    MIN_SEEDS,
    Table,
    baseline_description,
    finished,
    method_order,
    setting_display_columns,
    text_column,
    value_column,
)
from analysis.methods import baseline_labels, check_baseline


def verdict(mean: float, p: float, n: int, alpha: float = ALPHA,
            min_seeds: int = MIN_SEEDS) -> str:
    """``gain``, ``loss`` or ``within noise`` for a paired mean difference."""
    if n < min_seeds or not np.isfinite(p) or p >= alpha or not np.isfinite(mean) or mean == 0:
        return "within noise"
    return "gain" if mean > 0 else "loss"


def paired_stats(method: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """n, mean/std of method - baseline, wins/ties, paired t-test and Wilcoxon p-values."""
    a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    diff = a - b
    n = len(diff)
    out = {
        "n": n,
        "diff_mean": float(diff.mean()) if n else math.nan,
        "diff_std": float(diff.std(ddof=1)) if n > 1 else math.nan,
        "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
        "p_ttest": math.nan, "p_wilcoxon": math.nan,
    }
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant differences: scipy warns and gives NaN
            out["p_ttest"] = float(stats.ttest_rel(a, b).pvalue)
            if np.any(diff != 0):
                try:
                    out["p_wilcoxon"] = float(stats.wilcoxon(a, b).pvalue)
                except ValueError:
                    pass
    return out


def seed_values(runs: pd.DataFrame, column: str, baseline: str = "own") -> pd.DataFrame:
    """One value per (setting, method, seed) from finished runs, with the method's baseline
    label (NaN for a baseline); duplicate runs are averaged."""
    done = finished(runs)
    if done.empty or column not in done:
        return pd.DataFrame(columns=["setting", "method", "baseline", "seed", "value"])
    done = done.assign(baseline=baseline_labels(done, baseline))
    return (done.groupby(["setting", "method", "baseline", "seed"], dropna=False)[column]
            .mean().rename("value").reset_index())


def paired_differences(runs: pd.DataFrame, column: str, baseline: str = "own") -> pd.DataFrame:
    """Long frame: setting, method, baseline, seed, the two values and diff = method - baseline.

    Only seeds where both values exist are rows.
    """
    values = seed_values(runs, column, baseline)
    partner = values[["setting", "method", "seed", "value"]].rename(
        columns={"method": "baseline", "value": "baseline_value"})
    partner["baseline"] = partner["baseline"].astype(object)
    compared = values[values["baseline"].notna()].rename(columns={"value": "method_value"})
    compared = compared.assign(baseline=compared["baseline"].astype(object))
    pairs = compared.merge(partner, on=["setting", "baseline", "seed"])
    pairs["diff"] = pairs["method_value"] - pairs["baseline_value"]
    columns = ["setting", "method", "baseline", "seed", "method_value", "baseline_value", "diff"]
    return pairs[columns].dropna(subset=["diff"]).reset_index(drop=True)


def paired_frame(runs: pd.DataFrame, metric: str = "acc_global", windowed: bool = True,
                 alpha: float = ALPHA, min_seeds: int = MIN_SEEDS,
                 baseline: str = "own") -> pd.DataFrame:
    """One row per (setting, method) with baseline partners: the paired statistics and the
    verdict."""
    check_baseline(baseline)
    column = value_column(metric, windowed)
    pairs = paired_differences(runs, column, baseline)
    rows = []
    for (setting, method, partner), group in pairs.groupby(["setting", "method", "baseline"],
                                                           sort=False):
        group = group.sort_values("seed")
        row = {"setting": setting, "method": method, "baseline": partner, "metric": column,
               **paired_stats(group["method_value"], group["baseline_value"]),
               "seeds": ",".join(str(s) for s in group["seed"])}
        row["verdict"] = verdict(row["diff_mean"], row["p_ttest"], row["n"], alpha, min_seeds)
        rows.append(row)
    columns = ["setting", "method", "baseline", "metric", "n", "diff_mean", "diff_std", "wins",
               "ties", "p_ttest", "p_wilcoxon", "seeds", "verdict"]
    frame = pd.DataFrame(rows, columns=columns)
    display = setting_display_columns(runs)
    keys = runs.drop_duplicates(["setting", "method"])[
        ["setting", "method", *display, "algorithm", "handout", "base_method", "sparsity",
         "period"]]
    return method_order(keys.merge(frame, on=["setting", "method"], how="inner"))


def _num(value: float, fmt: str = "+.3f") -> str:
    return "-" if value is None or not np.isfinite(value) else format(value, fmt)


def _p(value: float) -> str:
    if not np.isfinite(value):
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def paired_table(runs: pd.DataFrame, metrics: Sequence[str] = ("acc_global",),
                 windowed: bool = True, alpha: float = ALPHA,
                 min_seeds: int = MIN_SEEDS, baseline: str = "own") -> Table:
    """The paired comparison of every method with its baseline, for one or more metrics."""
    frames = [paired_frame(runs, m, windowed, alpha, min_seeds, baseline) for m in metrics]
    data = pd.concat([f for f in frames if not f.empty] or [frames[0]], ignore_index=True)
    display_cols = setting_display_columns(runs)
    shown = pd.DataFrame({
        **{c.split(".")[-1]: text_column(data[c]) for c in display_cols},
        "method": data["method"],
        "baseline": data["baseline"],
        "metric": data["metric"],
        "paired seeds": data["n"].astype(int),
        "method - baseline": [
            f"{_num(m)} ± {_num(s, '.3f')}" if np.isfinite(s) else _num(m)
            for m, s in zip(data["diff_mean"], data["diff_std"], strict=True)],
        "wins": [f"{w}/{n}" for w, n in zip(data["wins"], data["n"], strict=True)],
        "p (paired t)": [_p(p) for p in data["p_ttest"]],
        "p (Wilcoxon)": [_p(p) for p in data["p_wilcoxon"]],
        "verdict": data["verdict"],
    })
    caption = (
        f"Paired differences method - baseline per seed (same setting, same seed), "
        f"{'windowed' if windowed else 'last-round'} values; baseline: "
        f"{baseline_description(baseline)}. A difference is a gain or a loss only with "
        f"p < {alpha} (paired t-test) over at least {min_seeds} paired seeds; otherwise it is "
        f"within noise.")
    return Table(data=data, display=shown, caption=caption)
