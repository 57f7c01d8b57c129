"""The report's LaTeX tables: booktabs ``.tex`` files read back row by row (nothing compiled).

The runs are synthetic folders (see :mod:`test_analysis_methods`) with numbers chosen here: a
supported gain, one within noise, two methods tied for the best mean, a method without a global
model, labels and setting columns with underscores, and two settings (learning rates).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from test_analysis_methods import resolved_config, write_run

from analysis.latex import caption_text, escape, label_of
from analysis.loaders import load
from analysis.report import build_report
from analysis.tables import best_table, final_table

# (algorithm, handout, knobs, train.lr) -> acc_global per seed (None: no global model)
RUNS = {
    ("fedavg", "dense", (), 0.05): (0.60, 0.62, 0.64),
    ("fedavg", "lips", (), 0.05): (0.63, 0.651, 0.67),  # +0.030 every seed: a gain
    ("scaffold", "dense", (("scaffold.server_lr", 1.0),), 0.05): (0.70, 0.69, 0.71),
    ("scaffold", "dense", (("scaffold.server_lr", 0.5),), 0.05): (0.69, 0.70, 0.71),  # a tie
    ("scaffold", "lips", (("scaffold.server_lr", 0.5),), 0.05): (0.71, 0.68, 0.70),  # noise
    ("fedper", "dense", (), 0.05): None,
    ("fedavg", "dense", (), 0.1): (0.50, 0.52, 0.54),  # another setting, lower everywhere
    ("fedavg", "lips", (), 0.1): (0.52, 0.50, 0.55),
}
FEDPER_AFTER = (0.90, 0.92, 0.91)  # fedper's personal models: the best fine-tune scores
STEMS = ("final", "paired", "best", "runs", "not_finished")
SCORES = {"acc_global_window": "acc_global_window_mean",  # display column -> data column
          "acc_finetune": "acc_finetune_mean",
          "acc_finetune_bnrecal": "acc_finetune_bnrecal_mean"}
UNESCAPED = re.compile(r"(?<!\\)[_%#$]")  # & separates cells: checked by the row lengths


def build_runs(root: Path) -> Path:
    folder = root / "runs"
    for n, ((algorithm, handout, knobs, lr), values) in enumerate(RUNS.items()):
        for seed in range(3):
            cfg = resolved_config(seed, algorithm, handout, dict(knobs))
            cfg["train"]["lr"] = lr
            glob = None if values is None else values[seed]
            after = FEDPER_AFTER[seed] if values is None else values[seed] + 0.1
            write_run(folder / f"trial_{n:02d}_seed{seed}", cfg, glob, after)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return build_runs(tmp_path_factory.mktemp("latex"))


@pytest.fixture(scope="module")
def tables(runs, tmp_path_factory) -> Path:
    return build_report(runs, out=tmp_path_factory.mktemp("report")).parent / "tables"


def tex(text: str) -> str:
    """The LaTeX of a display cell, for the characters these cells hold."""
    assert not set(text) & set("\\&%$#{}~^<>|"), text
    return text.replace("_", r"\_").replace("±", r"$\pm$")


def parse(text: str) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header cells, body cells (bold marks removed) and which cells were bold."""
    head = text.split("\\toprule\n", 1)[1].split("\\midrule\n", 1)[0]
    body = text.split("\\midrule\n", 1)[1].split("\\bottomrule\n", 1)[0]

    def cells(line: str) -> list[str]:
        assert line.endswith(r" \\"), line
        return [c.strip() for c in re.split(r"(?<!\\)&", line.removesuffix(r" \\"))]

    rows = [cells(line) for line in body.splitlines() if r"\emph{(no rows)}" not in line]
    bold = [[c.startswith(r"\textbf{") and c.endswith("}") for c in row] for row in rows]
    plain = [[c[len(r"\textbf{"):-1] if b else c for c, b in zip(row, marks, strict=True)]
             for row, marks in zip(rows, bold, strict=True)]
    return cells(head.strip()), plain, bold


def markdown_rows(path: Path) -> int:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return max(len(lines) - 2, 0)  # header and alignment lines


def test_every_table_is_a_balanced_booktabs_table_beside_its_markdown(tables):
    for stem in STEMS:
        text = (tables / f"{stem}.tex").read_text()
        assert (tables / f"{stem}.md").is_file() and (tables / f"{stem}.csv").is_file()
        order = [text.index(mark) for mark in (
            r"\begin{table}", r"\caption{", r"\label{", r"\begin{tabular}{", r"\toprule",
            r"\midrule", r"\bottomrule", r"\end{tabular}", r"\end{table}")]
        assert order == sorted(order), stem
        for env in ("table", "tabular"):
            assert text.count(rf"\begin{{{env}}}") == text.count(rf"\end{{{env}}}") == 1
        unescaped = re.sub(r"\\[{}$]", "", text)
        assert unescaped.count("{") == unescaped.count("}"), stem
        assert unescaped.count("$") % 2 == 0, stem
        plain = re.sub(r"\\label\{[^}]*\}", "", text).replace(r"$\pm$", "")
        assert not UNESCAPED.search(plain), stem
        assert rf"\label{{{label_of(stem)}}}" in text
        _, rows, _ = parse(text)
        assert len(rows) == markdown_rows(tables / f"{stem}.md"), stem
        columns = re.search(r"\\begin\{tabular\}\{([lr]+)\}", text).group(1)
        assert all(len(row) == len(columns) for row in rows), stem
    assert r"\label{tab:not-finished}" in (tables / "not_finished.tex").read_text()


def test_final_table_cells_are_the_reports_with_each_gain_naming_its_verdict(runs, tables):
    table = final_table(load(runs).runs)
    header, rows, _ = parse((tables / "final.tex").read_text())
    assert header == [tex(c) for c in table.display.columns]
    assert len(rows) == len(table.display) == len(RUNS)
    verdicts = table.data["verdict"].tolist()
    for row, (_, shown), verdict in zip(rows, table.display.iterrows(), verdicts, strict=True):
        expected = [tex(str(v)) for v in shown]
        gain = list(table.display.columns).index("gain")
        if verdict in ("gain", "loss"):  # the Markdown leaves a supported gain unmarked
            expected[gain] += f" ({verdict})"
        assert row == expected
    gains = dict(zip(zip(table.display["lr"], table.display["method"], strict=True),
                     (r[gain] for r in rows), strict=True))
    assert gains["0.05", "fedavg+lips s=0.5 T=5"] == "+0.030 (gain)"
    assert gains["0.1", "fedavg+lips s=0.5 T=5"] == "+0.003 (within noise)"
    assert gains["0.05", "scaffold(server_lr=0.5)+lips s=0.5 T=5"] == "-0.003 (within noise)"
    assert gains["0.05", "fedavg"] == "-"
    md = (tables / "final.md").read_text()
    assert "(gain)" not in md and "| +0.030 |" in md


def test_bold_marks_exactly_the_best_mean_of_each_column_per_setting(runs, tables):
    table = final_table(load(runs).runs)
    data, columns = table.data, list(table.display.columns)
    _, rows, bold = parse((tables / "final.tex").read_text())
    for name, value in SCORES.items():
        j = columns.index(name)
        shown = data[value].round(3)
        best = shown == shown.groupby(data["setting"]).transform("max")  # NaN: never best
        assert [marks[j] for marks in bold] == best.tolist(), name
    assert sum(sum(marks) for marks in bold) == sum(
        (data[v].round(3) == data[v].round(3).groupby(data["setting"]).transform("max")).sum()
        for v in SCORES.values())  # nothing else is bold
    methods = table.display["method"].tolist()
    acc = columns.index("acc_global_window")
    lr = table.display["lr"].tolist()
    bold_acc = {(lr[i], methods[i]) for i, marks in enumerate(bold) if marks[acc]}
    assert bold_acc == {("0.05", "scaffold(server_lr=1)"), ("0.05", "scaffold(server_lr=0.5)"),
                        ("0.1", "fedavg+lips s=0.5 T=5")}  # a tie: both bold; one per setting
    fedper = methods.index("fedper")
    assert rows[fedper][acc] == "-" and not bold[fedper][acc]  # no value: never best
    assert bold[fedper][columns.index("acc_finetune")]
    assert "Bold: the highest mean" in (tables / "final.tex").read_text()
    assert r"\textbf" not in (tables / "paired.tex").read_text()


def test_labels_and_settings_with_underscores_are_escaped(tables):
    text = (tables / "final.tex").read_text()
    assert r"scaffold(server\_lr=0.5)+lips s=0.5 T=5" in text
    assert "server_lr" not in text
    assert r"acc\_finetune\_bnrecal" in text
    runs_tex = (tables / "runs.tex").read_text()
    assert r"trial\_03\_seed0" in runs_tex and "trial_03" not in runs_tex
    assert r"\caption{\texttt{acc\_global} averaged" in text


def test_best_table_bolds_the_best_method_and_names_verdicts(runs):
    final = final_table(load(runs).runs)
    best = best_table(final)
    latex = best.to_latex("best")
    _, rows, bold = parse(latex)
    columns = list(best.display.columns)
    acc = columns.index("acc_global_window")
    means = best.data["acc_global_window_mean"].round(3)
    assert [marks[acc] for marks in bold] == (
        means == means.groupby(best.data["setting"]).transform("max")).tolist()
    assert any(r.endswith(("(gain)", "(loss)", "(within noise)")) for row in rows for r in row)


def test_escape_every_special_character():
    assert escape("a_b 50% & #1 $x {y} ~z ^w \\v <p> |q| ±") == (
        r"a\_b 50\% \& \#1 \$x \{y\} \textasciitilde{}z \textasciicircum{}w \textbackslash{}v "
        r"\textless{}p\textgreater{} \textbar{}q\textbar{} $\pm$")
    assert caption_text("`acc_global` over `--baseline own`, 5%") == (
        r"\texttt{acc\_global} over \texttt{--baseline own}, 5\%")
    assert caption_text("an odd ` tick_") == r"an odd ` tick\_"
    assert label_of("final") == "tab:final" and label_of("not_finished") == "tab:not-finished"


def test_an_empty_table_is_still_a_table(tmp_path):
    from analysis.frames import Table

    empty = Table(pd.DataFrame(), pd.DataFrame(), "Nothing.")
    empty.save(tmp_path, "best")
    text = (tmp_path / "best.tex").read_text()
    assert r"\emph{(no rows)}" in text and text.count(r"\end{tabular}") == 1
    assert (tmp_path / "best.md").read_text() == "_(no rows)_\n\n_Nothing._\n"
