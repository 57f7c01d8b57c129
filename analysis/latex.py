"""A report table as booktabs LaTeX, written by hand (no jinja2, no LaTeX installation).

The output is a ``table`` float holding the caption, a ``\\label`` and a ``tabular`` with
``\\toprule``/``\\midrule``/``\\bottomrule``; a document needs ``\\usepackage{booktabs}``.
Cells are the report's own formatted text with LaTeX's special characters escaped and
``±`` set as ``$\\pm$``; the best cells are bold (:func:`best_cells` says which).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import pandas as pd

# Characters LaTeX reads as commands or that its default (OT1) text font sets as other glyphs.
ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}", "±": r"$\pm$",
    "\n": " ",
}
NO_ROWS = r"\emph{(no rows)}"


def escape(text: str) -> str:
    """Plain text as LaTeX text: special characters escaped, ``±`` as ``$\\pm$``."""
    return "".join(ESCAPES.get(char, char) for char in text)


def caption_text(caption: str) -> str:
    """A Markdown caption as LaTeX: ```code``` spans as ``\\texttt``, the rest escaped."""
    parts = caption.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans, just text
        return escape(caption)
    return "".join(rf"\texttt{{{escape(part)}}}" if i % 2 else escape(part)
                   for i, part in enumerate(parts))


def label_of(stem: str) -> str:
    """The ``\\label`` of a table from its file stem: ``not_finished`` -> ``tab:not-finished``."""
    return "tab:" + (re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-") or "table")


def best_cells(values: pd.Series, groups: Sequence[object] | None = None,
               digits: int = 3) -> list[bool]:
    """Which rows hold the highest value of their group, compared as shown (``digits``
    decimals), so equal cells are all best. Rows without a value are never best; a group
    without any value has no best row. ``groups`` None: one group."""
    shown = [round(float(v), digits) if pd.notna(v) and math.isfinite(float(v)) else None
             for v in values]
    keys = list(groups) if groups is not None else [None] * len(shown)
    top: dict[object, float] = {}
    for key, value in zip(keys, shown, strict=True):
        if value is not None and (key not in top or value > top[key]):
            top[key] = value
    return [value is not None and value == top[key]
            for key, value in zip(keys, shown, strict=True)]


def tabular(header: Sequence[str], rows: Sequence[Sequence[str]], align: str,
            bold: Sequence[Sequence[bool]] | None = None) -> str:
    """A booktabs ``tabular`` of plain-text cells (escaped here); ``bold[i][j]`` sets cell
    (i, j) in bold. No rows: one italic "(no rows)" line under the header."""
    if not header:
        return "\n".join([r"\begin{tabular}{l}", r"\toprule", NO_ROWS + r" \\",
                          r"\bottomrule", r"\end{tabular}"])
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        cells = [escape(c) for c in row]
        if bold is not None:
            cells = [rf"\textbf{{{c}}}" if b and c else c
                     for c, b in zip(cells, bold[i], strict=True)]
        lines.append(" & ".join(cells) + r" \\")
    if not rows:
        lines.append(rf"\multicolumn{{{len(header)}}}{{l}}{{{NO_ROWS}}} \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def table_float(body: str, caption: str, label: str) -> str:
    """``body`` in a ``table`` environment with its caption (Markdown, see
    :func:`caption_text`) above it and the label."""
    return "\n".join([r"\begin{table}[htbp]", r"\centering",
                      rf"\caption{{{caption_text(caption)}}}", rf"\label{{{label}}}", body,
                      r"\end{table}"])


def bold_grid(columns: Sequence[str], best: Mapping[str, Sequence[bool]],
              rows: int) -> list[list[bool]]:
    """Per row, per column: bold or not, from the best rows of the columns in ``best``."""
    return [[bool(best[c][i]) if c in best else False for c in columns] for i in range(rows)]
