"""What every table of the analysis builds on: the runs column a metric reads, the finished
runs, the setting columns a table shows, the order of methods, and :class:`Table` with its
Markdown. :mod:`analysis.tables` and :mod:`analysis.paired` both use these, and neither imports
the other's helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.loaders import METRICS, setting_columns
from analysis.methods import ALGORITHMS, BASELINE_TEXT, check_baseline, fmt_value, label_sort_key

ALPHA = 0.05  # a paired difference is a gain or a loss only with p < ALPHA ...
MIN_SEEDS = 3  # ... over at least MIN_SEEDS paired seeds


def value_column(metric: str, windowed: bool = True) -> str:
    """The runs column behind a metric name: ``acc_global`` -> ``acc_global_window``.

    A name that is already a runs column (e.g. ``acc_finetune_mean``) is used as it is.
    """
    if metric in METRICS:
        return f"{metric}_{'window' if windowed else 'last'}"
    return metric


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
    """Sort rows by setting, then algorithm (FedAvg first, in ``ALGORITHMS`` order), its knobs,
    the dense hand-out before LIPS, then sparsity and period."""
    rank = {name: i for i, name in enumerate(ALGORITHMS)}
    bases = {b: i for i, b in enumerate(sorted(set(frame["base_method"].astype(str)),
                                               key=label_sort_key))}
    keys = pd.DataFrame({
        "_s": frame["setting"],
        "_a": [rank.get(a, len(rank)) for a in frame["algorithm"]],
        "_b": [bases[str(b)] for b in frame["base_method"]],
        "_h": frame["handout"].ne("dense").astype(int),
        "_sp": frame["sparsity"], "_p": frame["period"], "_m": frame["method"]},
        index=frame.index)
    order = keys.sort_values(list(keys.columns), na_position="first").index
    return frame.loc[order].reset_index(drop=True)


def baseline_description(baseline: str) -> str:
    """What the gains of this baseline are taken against, in words."""
    return f"{BASELINE_TEXT[check_baseline(baseline)]} (`--baseline {baseline}`)"


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


def text_column(values: pd.Series) -> list[str]:
    """Config values as text: floats compactly (1e+06, 0.05), missing as '?'."""
    return [fmt_value(v) for v in values]
