"""Paper-style tables from the ``runs`` frame, exported as Markdown and CSV.

Every table is a :class:`Table`: ``data`` holds the numbers (for CSV and further pandas work),
``display`` the formatted strings (for Markdown), ``caption`` says what the numbers are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ray_lips.loaders import METRICS, fmt_value, setting_columns

FINETUNE_COLUMNS = ("acc_finetune_mean", "acc_finetune_bnrecal_mean")
METHOD_COLUMNS = ("algorithm", "sparsity", "period")


# ----- shared helpers ---------------------------------------------------------------------------
def value_column(metric: str, windowed: bool = True) -> str:
    """The runs column behind a metric name: ``acc_global`` -> ``acc_global_window``.

    A name that is already a runs column (e.g. ``acc_finetune_mean``) is used as it is.
    """
    if metric in METRICS:
        return f"{metric}_{'window' if windowed else 'last'}"
    return metric


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


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "finished"] if "status" in runs else runs.iloc[0:0]


def setting_display_columns(runs: pd.DataFrame) -> list[str]:
    """Dataset, model, then any other setting key that differs between the runs."""
    cols = [c for c in ("data.dataset", "model") if c in runs]
    full = runs[runs["has_config"]] if "has_config" in runs else runs
    for col in setting_columns(full):
        if col not in cols and full[col].dropna().astype(str).nunique() > 1:
            cols.append(col)
    return cols


def method_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Sort rows by setting, FedAvg first, then sparsity and period."""
    key = frame["algorithm"].ne("fedavg").astype(int)
    return (frame.assign(_k=key).sort_values(["setting", "_k", "sparsity", "period", "method"])
            .drop(columns="_k").reset_index(drop=True))


def mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    if n < 2 or not np.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned, the rest left-aligned)."""
    if frame.empty:
        return "_(no rows)_"
    header = [_cell(c) for c in frame.columns]
    align = ["---:" if pd.api.types.is_numeric_dtype(frame[c]) and frame[c].dtype != bool
             else ":---" for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


@dataclass
class Table:
    data: pd.DataFrame
    display: pd.DataFrame
    caption: str

    def to_markdown(self) -> str:
        return f"{to_markdown(self.display)}\n\n_{self.caption}_"

    def save(self, folder: str | Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.csv`` (the numbers) and ``stem.md`` (table and caption)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        csv, md = folder / f"{stem}.csv", folder / f"{stem}.md"
        self.data.to_csv(csv, index=False)
        md.write_text(self.to_markdown() + "\n")
        return csv, md


# ----- the final-accuracy table ----------------------------------------------------------------
def cell_stats(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean, std (ddof 1) and number of seeds per (setting, method), finished runs only.

    Two finished runs of one cell with the same seed count once (their values are averaged).
    """
    done = finished(runs)
    per_seed = (done.groupby(["setting", "method", "seed"], dropna=False)[column].mean()
                .reset_index())
    grouped = per_seed.groupby(["setting", "method"], dropna=False)[column]
    out = grouped.agg(["mean", "std", "count"]).rename(columns={"count": "seeds"})
    return out.reset_index()


def final_table(runs: pd.DataFrame, metric: str = "acc_global", windowed: bool = True,
                alpha: float = 0.05, min_seeds: int = 3) -> Table:
    """Final accuracy mean ± std over seeds per setting x method, with the gain over FedAvg.

    ``gain`` is the LIPS cell's mean minus the FedAvg mean of the same setting; ``verdict``
    comes from the paired comparison (see :mod:`analysis.paired`). Both fine-tune scores are
    shown side by side. Runs that did not finish are left out of the numbers and counted in
    ``not_finished``.
    """
    from analysis.paired import paired_frame  # paired builds on this module's helpers

    column = value_column(metric, windowed)
    display_cols = setting_display_columns(runs)
    if "has_config" in runs:  # a Tune trial that died before writing its config has no cell
        runs = runs[runs["has_config"]]
    keys = runs.drop_duplicates(["setting", "method"])[
        ["setting", "method", *display_cols, *METHOD_COLUMNS]]
    data = keys.merge(cell_stats(runs, column), on=["setting", "method"], how="left")
    for ft in FINETUNE_COLUMNS:
        stats = cell_stats(runs, ft)[["setting", "method", "mean", "std"]]
        stats = stats.rename(columns={"mean": f"{ft}", "std": f"{ft}_std"})
        data = data.merge(stats, on=["setting", "method"], how="left")
    data["seeds"] = data["seeds"].fillna(0).astype(int)
    unfinished = runs[runs["status"] != "finished"].groupby(["setting", "method"]).size()
    data["not_finished"] = [int(unfinished.get((s, m), 0))
                            for s, m in zip(data["setting"], data["method"], strict=True)]
    base = data[data["algorithm"] == "fedavg"].set_index("setting")["mean"]
    data["gain"] = [
        mean - base[setting] if algo != "fedavg" and setting in base.index else math.nan
        for setting, algo, mean in zip(data["setting"], data["algorithm"], data["mean"],
                                       strict=True)]
    paired = paired_frame(runs, metric, windowed, alpha, min_seeds)
    data = data.merge(paired[["setting", "method", "n", "p_ttest", "verdict"]].rename(
        columns={"n": "paired_seeds"}), on=["setting", "method"], how="left")
    data = method_order(data.rename(columns={"mean": f"{column}_mean", "std": f"{column}_std"}))
    window = final_windows(runs)
    caption = (f"{metric_description(metric, windowed, window[0] if len(window) == 1 else None)}"
               f": mean ± std over seeds (n = seeds per cell). Gain = LIPS mean - FedAvg mean in "
               f"the same setting; '(within noise)' marks a gain the paired test does not "
               f"support (p >= {alpha} or fewer than {min_seeds} paired seeds). Fine-tune: "
               f"acc_finetune keeps the BN statistics fine-tuning left, acc_finetune_bnrecal "
               f"recomputes them on the client's data.")
    return Table(data=data, display=_final_display(data, column, display_cols), caption=caption)


def _knob(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def gain_text(gain: float, verdict: object, algorithm: str) -> str:
    if algorithm == "fedavg":
        return "-"
    if not np.isfinite(gain):
        return "n/a (no FedAvg)"
    text = f"{gain:+.3f}"
    return text if verdict in ("gain", "loss") else f"{text} (within noise)"


def text_column(values: pd.Series) -> list[str]:
    """Config values as text: floats compactly (1e+06, 0.05), missing as '?'."""
    return [fmt_value(v) for v in values]


def _final_display(data: pd.DataFrame, column: str, display_cols: list[str]) -> pd.DataFrame:
    shown = {c.split(".")[-1]: text_column(data[c]) for c in display_cols}
    shown["algorithm"] = data["algorithm"]
    shown["sparsity"] = [_knob(v) for v in data["sparsity"]]
    shown["period"] = [_knob(v) for v in data["period"]]
    shown["n"] = data["seeds"].astype(int)
    shown[column] = [mean_std(m, s, n) for m, s, n in zip(
        data[f"{column}_mean"], data[f"{column}_std"], data["seeds"], strict=True)]
    shown["gain vs FedAvg"] = [gain_text(g, v, a) for g, v, a in zip(
        data["gain"], data["verdict"], data["algorithm"], strict=True)]
    for ft in FINETUNE_COLUMNS:
        name = ft.removesuffix("_mean")
        shown[name] = [mean_std(m, s, n) for m, s, n in zip(
            data[ft], data[f"{ft}_std"], data["seeds"], strict=True)]
    frame = pd.DataFrame(shown)
    if data["not_finished"].any():
        frame["not finished"] = data["not_finished"].astype(int)
    return frame


# ----- best setting per dataset ----------------------------------------------------------------
def best_table(final: Table) -> Table:
    """The LIPS cell with the highest mean per setting, beside that setting's FedAvg."""
    data = final.data
    mean_col = next(c for c in data.columns if c.endswith("_mean") and c.startswith("acc_")
                    and c not in FINETUNE_COLUMNS)
    column = mean_col.removesuffix("_mean")
    lips = data[(data["algorithm"] != "fedavg") & data[mean_col].notna()]
    rows = []
    for setting, group in lips.groupby("setting", sort=True):
        best = group.loc[group[mean_col].idxmax()]
        base = data[(data["setting"] == setting) & (data["algorithm"] == "fedavg")]
        rows.append({
            **best.to_dict(),
            "fedavg_mean": base[mean_col].iloc[0] if len(base) else math.nan,
            "fedavg_std": base[f"{column}_std"].iloc[0] if len(base) else math.nan,
            "fedavg_seeds": int(base["seeds"].iloc[0]) if len(base) else 0,
            "candidates": len(group),
        })
    best = pd.DataFrame(rows)
    if best.empty:
        return Table(best, best, "No finished LIPS runs.")
    display_cols = [c for c in data.columns if c == "model" or c.startswith(("data.", "train."))]
    shown = pd.DataFrame({
        **{c.split(".")[-1]: text_column(best[c]) for c in display_cols},
        "best LIPS": best["method"],
        f"LIPS {column}": [mean_std(m, s, n) for m, s, n in zip(
            best[mean_col], best[f"{column}_std"], best["seeds"], strict=True)],
        f"FedAvg {column}": [mean_std(m, s, n) for m, s, n in zip(
            best["fedavg_mean"], best["fedavg_std"], best["fedavg_seeds"], strict=True)],
        "gain": [gain_text(g, v, "lips") for g, v in zip(best["gain"], best["verdict"],
                                                         strict=True)],
        "n": best["seeds"].astype(int),
        "settings tried": best["candidates"].astype(int),
    })
    caption = ("Best LIPS sparsity/period per setting by mean final value. The best of several "
               "settings is chosen on the same seeds it is scored on, so its gain is optimistic.")
    return Table(best, shown, caption)


def gain_grid(final: Table, setting: str) -> pd.DataFrame:
    """Sparsity (rows) x period (columns) grid of the gain over FedAvg for one setting.

    Cells that differ only in another LIPS knob (schedule, scorer) are averaged.
    """
    data = final.data
    rows = data[(data["setting"] == setting) & (data["algorithm"] != "fedavg")]
    return rows.pivot_table(index="sparsity", columns="period", values="gain", aggfunc="mean")
