"""Paired comparisons of LIPS against FedAvg: same setting, same seed, one difference per seed.

A seed fixes the partition, the initial model and the batch order, so LIPS and FedAvg runs with
the same seed differ only in the method. The per-seed difference removes the seed-to-seed spread
that an unpaired comparison of means carries; a paired t-test (and a Wilcoxon signed-rank test)
says whether the mean difference stands out from its own spread. A difference is called a gain
(or a loss) only when p < ``alpha`` over at least ``min_seeds`` paired seeds; otherwise it is
reported as within noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.tables import (
    Table,
    finished,
    setting_display_columns,
    text_column,
    value_column,
)

ALPHA = 0.05
MIN_SEEDS = 3


def verdict(mean: float, p: float, n: int, alpha: float = ALPHA,
            min_seeds: int = MIN_SEEDS) -> str:
    """``gain``, ``loss`` or ``within noise`` for a paired mean difference."""
    if n < min_seeds or not np.isfinite(p) or p >= alpha or not np.isfinite(mean) or mean == 0:
        return "within noise"
    return "gain" if mean > 0 else "loss"


def paired_stats(lips: Sequence[float], fedavg: Sequence[float]) -> dict[str, float]:
    """n, mean/std of LIPS - FedAvg, wins/ties, paired t-test and Wilcoxon p-values."""
    a, b = np.asarray(lips, dtype=float), np.asarray(fedavg, dtype=float)
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


def seed_values(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """One value per (setting, method, seed) from finished runs; duplicate runs are averaged."""
    done = finished(runs)
    if done.empty or column not in done:
        return pd.DataFrame(columns=["setting", "method", "algorithm", "seed", "value"])
    return (done.groupby(["setting", "method", "algorithm", "seed"], dropna=False)[column]
            .mean().rename("value").reset_index())


def paired_differences(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Long frame: setting, method (a LIPS one), seed, lips, fedavg, diff = lips - fedavg."""
    values = seed_values(runs, column)
    base = values[values["algorithm"] == "fedavg"][["setting", "seed", "value"]]
    other = values[values["algorithm"] != "fedavg"]
    pairs = other.merge(base, on=["setting", "seed"], suffixes=("_lips", "_fedavg"))
    pairs = pairs.rename(columns={"value_lips": "lips", "value_fedavg": "fedavg"})
    pairs["diff"] = pairs["lips"] - pairs["fedavg"]
    return pairs[["setting", "method", "seed", "lips", "fedavg", "diff"]].dropna(
        subset=["diff"]).reset_index(drop=True)


def paired_frame(runs: pd.DataFrame, metric: str = "acc_global", windowed: bool = True,
                 alpha: float = ALPHA, min_seeds: int = MIN_SEEDS) -> pd.DataFrame:
    """One row per LIPS cell that has FedAvg partners: the paired statistics and the verdict."""
    column = value_column(metric, windowed)
    pairs = paired_differences(runs, column)
    rows = []
    for (setting, method), group in pairs.groupby(["setting", "method"], sort=True):
        group = group.sort_values("seed")
        row = {"setting": setting, "method": method, "metric": column,
               **paired_stats(group["lips"], group["fedavg"]),
               "seeds": ",".join(str(s) for s in group["seed"])}
        row["verdict"] = verdict(row["diff_mean"], row["p_ttest"], row["n"], alpha, min_seeds)
        rows.append(row)
    columns = ["setting", "method", "metric", "n", "diff_mean", "diff_std", "wins", "ties",
               "p_ttest", "p_wilcoxon", "seeds", "verdict"]
    frame = pd.DataFrame(rows, columns=columns)
    display = setting_display_columns(runs)
    keys = runs.drop_duplicates(["setting", "method"])[
        ["setting", "method", *display, "sparsity", "period"]]
    return keys.merge(frame, on=["setting", "method"], how="inner").reset_index(drop=True)


def _num(value: float, fmt: str = "+.3f") -> str:
    return "-" if value is None or not np.isfinite(value) else format(value, fmt)


def _p(value: float) -> str:
    if not np.isfinite(value):
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def paired_table(runs: pd.DataFrame, metrics: Sequence[str] = ("acc_global",),
                 windowed: bool = True, alpha: float = ALPHA,
                 min_seeds: int = MIN_SEEDS) -> Table:
    """The paired comparison of every LIPS cell with FedAvg, for one or more metrics."""
    frames = [paired_frame(runs, m, windowed, alpha, min_seeds) for m in metrics]
    data = pd.concat([f for f in frames if not f.empty] or [frames[0]], ignore_index=True)
    display_cols = setting_display_columns(runs)
    shown = pd.DataFrame({
        **{c.split(".")[-1]: text_column(data[c]) for c in display_cols},
        "method": data["method"],
        "metric": data["metric"],
        "paired seeds": data["n"].astype(int),
        "LIPS - FedAvg": [
            f"{_num(m)} ± {_num(s, '.3f')}" if np.isfinite(s) else _num(m)
            for m, s in zip(data["diff_mean"], data["diff_std"], strict=True)],
        "wins": [f"{w}/{n}" for w, n in zip(data["wins"], data["n"], strict=True)],
        "p (paired t)": [_p(p) for p in data["p_ttest"]],
        "p (Wilcoxon)": [_p(p) for p in data["p_wilcoxon"]],
        "verdict": data["verdict"],
    })
    caption = (
        f"Paired LIPS - FedAvg differences per seed (same setting, same seed), "
        f"{'windowed' if windowed else 'last-round'} values. A difference is a gain or a loss "
        f"only with p < {alpha} (paired t-test) over at least {min_seeds} paired seeds; "
        f"otherwise it is within noise.")
    return Table(data=data, display=shown, caption=caption)
