"""What every table of the analysis builds on: the runs column a metric reads, the finished
runs, the setting columns a table shows, the order of methods, and :class:`Table` with its
Markdown and LaTeX. :mod:`analysis.tables` and :mod:`analysis.paired` both use these, and
neither imports the other's helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import latex
from analysis.loaders import METRICS, setting_columns
from analysis.methods import (
    ALGORITHMS,
    BASELINE_TEXT,
    check_baseline,
    family_rank,
    fmt_value,
    label_sort_key,
)
from ray_lips.algorithms import registry

ALPHA = 0.05  # a paired difference is a gain or a loss only with p < ALPHA ...
MIN_SEEDS = 3  # ... over at least MIN_SEEDS paired seeds
DIGITS = 3  # decimals of a mean ± std cell; LaTeX's bold compares means at this precision


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
    """Sort rows by setting, then family (its ``family`` column, else the built-in algorithm's),
    then algorithm (FedAvg first, in ``ALGORITHMS`` order), its knobs, the dense hand-out before
    LIPS, then sparsity and period."""
    rank = {name: i for i, name in enumerate(ALGORITHMS)}
    builtin = registry.builtin()
    families = (frame["family"] if "family" in frame else
                [builtin[a].family if a in builtin else None for a in frame["algorithm"]])
    bases = {b: i for i, b in enumerate(sorted(set(frame["base_method"].astype(str)),
                                               key=label_sort_key))}
    keys = pd.DataFrame({
        "_s": frame["setting"],
        "_f": [family_rank(f) for f in families],
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


def mean_std(mean: float, std: float, n: int, digits: int = DIGITS) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    if n < 2 or not np.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def cell_text(value: object) -> str:
    """A table cell as plain text: missing as empty, floats as 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(value: object) -> str:
    return cell_text(value).replace("|", "\\|").replace("\n", " ")


def _numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and column.dtype != bool


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned, the rest left-aligned)."""
    if frame.empty:
        return "_(no rows)_"
    header = [_cell(c) for c in frame.columns]
    align = ["---:" if _numeric(frame[c]) else ":---" for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


@dataclass
class Table:
    """A table of the report: ``data`` the numbers (CSV), ``display`` the formatted cells
    (Markdown and LaTeX), ``caption`` what the numbers are (Markdown, with `code` spans).

    ``best_of`` maps a display column to the data column of its value (higher is better): in
    LaTeX the best cells of that column are bold, per setting where ``data`` has one.
    ``latex_cells`` replaces a display column's cells in LaTeX where they say more there (a
    gain with its verdict), so the Markdown stays as it is.
    """

    data: pd.DataFrame
    display: pd.DataFrame
    caption: str
    best_of: dict[str, str] = field(default_factory=dict)
    latex_cells: dict[str, list[str]] = field(default_factory=dict)

    def to_markdown(self) -> str:
        return f"{to_markdown(self.display)}\n\n_{self.caption}_"

    def latex_rows(self) -> list[list[str]]:
        """The LaTeX table's cells as plain text, before escaping: the display's, with
        :attr:`latex_cells` in place of their columns."""
        columns = {c: self.latex_cells.get(c) or [cell_text(v) for v in self.display[c]]
                   for c in self.display.columns}
        return [[columns[c][i] for c in self.display.columns] for i in range(len(self.display))]

    def bold(self) -> list[list[bool]]:
        """Per row and display column, whether LaTeX sets the cell in bold (:attr:`best_of`)."""
        groups = self.data["setting"].tolist() if "setting" in self.data else None
        best = {column: latex.best_cells(self.data[value], groups, DIGITS)
                for column, value in self.best_of.items()
                if column in self.display and value in self.data}
        return latex.bold_grid(list(self.display.columns), best, len(self.display))

    def to_latex(self, stem: str) -> str:
        """A booktabs ``table`` float: the caption, ``\\label{tab:<stem>}`` and the tabular."""
        bold = self.bold()
        caption = self.caption
        if any(any(row) for row in bold):
            where = " within a setting" if "setting" in self.data else ""
            caption += (f" Bold: the highest mean of a column{where} at the digits shown "
                        f"(ties all bold).")
        align = "".join("r" if _numeric(self.display[c]) or c in self.best_of else "l"
                        for c in self.display.columns)
        body = latex.tabular([cell_text(c) for c in self.display.columns], self.latex_rows(),
                             align, bold)
        return latex.table_float(body, caption, latex.label_of(stem)) + "\n"

    def save(self, folder: str | Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.csv`` (the numbers), ``stem.md`` (table and caption) and ``stem.tex``
        (booktabs LaTeX, :meth:`to_latex`); return the CSV and Markdown paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        csv, md = folder / f"{stem}.csv", folder / f"{stem}.md"
        self.data.to_csv(csv, index=False)
        md.write_text(self.to_markdown() + "\n")
        (folder / f"{stem}.tex").write_text(self.to_latex(stem), encoding="utf-8")
        return csv, md


def text_column(values: pd.Series) -> list[str]:
    """Config values as text: floats compactly (1e+06, 0.05), missing as '?'."""
    return [fmt_value(v) for v in values]
