"""``ray-lips report``: the Markdown report of a sweep or a run, in-process and as a command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from test_loaders import UNFINISHED, shared_sweep

from analysis.loaders import find_runs, load_runs
from analysis.report import NoRunsError, build_report
from analysis.tables import final_table
from ray_lips.cli.report import report

LINK = re.compile(r"\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return shared_sweep(tmp_path_factory)


@pytest.fixture(scope="module")
def built(sweep, tmp_path_factory) -> Path:
    return build_report(sweep, out=tmp_path_factory.mktemp("report"))


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_holds_the_final_table_rows(sweep, built):
    text = built.read_text()
    table = final_table(load_runs(sweep))
    section = _section(text, "Final accuracy")
    for _, row in table.display.iterrows():
        cells = " | ".join(str(v) for v in row.to_numpy())
        assert f"| {cells} |" in section
    # FedAvg is the baseline: no baseline and no gain of its own
    assert re.search(r"\| global model \| fedavg \| 1 \| 3 \| [0-9.]+ ± [0-9.]+ \| - \| - \|",
                     section)
    assert ("| family | method | local work | n | acc_global_window | baseline | gain |"
            in section)
    assert "acc_finetune | acc_finetune_bnrecal" in section
    assert "(within noise)" in section  # three tiny seeds: nothing is called a gain


def test_report_explains_itself(built):
    text = built.read_text()
    how = _section(text, "How to read this")
    assert "`acc_global`" in how and "last 3 evaluated rounds" in how
    assert "within noise" in how and "paired t-test" in how and "acc_finetune_bnrecal" in how
    for title in ("Paired comparisons (method - baseline, per seed)",
                  "Best method per setting and baseline",
                  "Gain heat map (sparsity x period)", "Accuracy versus round",
                  "Layer-wise inertia", "Runs not finished", "All runs"):
        assert f"\n## {title}\n" in text, title
    assert "| fedavg+lips s=0.5 T=2 | fedavg | acc_global_window | 3 |" in _section(
        text, "Paired comparisons (method - baseline, per seed)")
    assert "`--baseline own`" in text and "Baseline" in how


def test_every_link_points_at_a_file_and_every_figure_is_linked(built):
    text = built.read_text()
    links = LINK.findall(text)
    assert links
    for link in links:
        assert not Path(link).is_absolute()
        assert (built.parent / link).is_file(), link
    pngs = {p.relative_to(built.parent).as_posix() for p in built.parent.glob("figures/*.png")}
    assert pngs == {link for link in links if link.endswith(".png")}
    assert {"figures/gain_heatmap.png", "figures/curves_acc_global.png"} <= pngs
    assert any(p.startswith("figures/inertia_") for p in pngs)
    final = pd.read_csv(built.parent / "tables" / "final.csv")
    assert "acc_global_window_mean" in final and "acc_finetune_bnrecal_mean" in final


def test_every_table_is_written_as_csv_markdown_and_latex_and_linked(built):
    tables = built.parent / "tables"
    stems = {"final", "paired", "best", "runs", "not_finished", "traffic"}
    for suffix in (".csv", ".md", ".tex"):
        assert {p.stem for p in tables.glob(f"*{suffix}")} == stems, suffix
    files = _section(built.read_text(), "Files")
    assert {link for link in LINK.findall(files) if link.endswith(".tex")} == {
        f"tables/{stem}.tex" for stem in stems}
    final = (tables / "final.tex").read_text()
    assert final.startswith("\\begin{table}") and "\\label{tab:final}" in final
    assert "\\toprule" in final and "$\\pm$" in final and "\\textbf{" in final


def test_unfinished_runs_are_listed_with_their_reason(built):
    section = _section(built.read_text(), "Runs not finished")
    rows = [line for line in section.splitlines() if line.startswith("| trial_")]
    assert len(rows) == len(UNFINISHED)
    for run_id, (status, reason) in UNFINISHED.items():
        line = next(r for r in rows if r.startswith(f"| {run_id} |"))
        assert f"| {status} |" in line
        if reason:
            assert reason in line


def test_a_report_inside_the_sweep_is_not_mistaken_for_a_run(sweep, tmp_path):
    before = find_runs(sweep)
    path = build_report(sweep / "trial_lips_s0.5_T2_seed0")  # a single run, default out
    assert path == sweep / "trial_lips_s0.5_T2_seed0" / "report" / "report.md"
    text = path.read_text()
    assert "1 runs (1 finished)" in text and "_No pairs:" in text
    assert "figures/inertia_" in text
    assert find_runs(sweep) == before
    with pytest.raises(NoRunsError):
        build_report(tmp_path)


def test_cli_in_process_with_metric_and_last_round(sweep, tmp_path):
    result = CliRunner().invoke(report, [str(sweep), "--out", str(tmp_path / "r"),
                                         "--metric", "acc_after", "--last-round"])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip().splitlines()[-1])
    assert path == tmp_path / "r" / "report.md"
    text = path.read_text()
    assert "acc_after_last" in _section(text, "Final accuracy")
    assert "figures/curves_acc_after.png" in text
    empty = CliRunner().invoke(report, [str(tmp_path / "r" / "figures")])
    assert empty.exit_code == 2 and "no runs" in empty.output


def test_cli_as_a_user_runs_it(sweep, tmp_path):
    out = tmp_path / "user"
    done = subprocess.run([sys.executable, "-m", "ray_lips.cli.report", str(sweep), "--out",
                           str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / "report.md")
    assert "## Final accuracy" in (out / "report.md").read_text()


def test_a_finished_run_with_a_truncated_table_is_listed_not_dropped(sweep, tmp_path):
    import shutil

    runs = sorted(p.parent for p in sweep.glob("*/status.json")
                  if '"finished"' in (p.parent / "status.json").read_text())[:2]
    for run in runs:
        shutil.copytree(run, tmp_path / "runs" / run.name)
    damaged = tmp_path / "runs" / runs[0].name / "rounds.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    text = build_report(tmp_path / "runs", out=tmp_path / "report").read_text()
    assert "2 runs (1 damaged, 1 finished)" in text
    line = next(r for r in _section(text, "Runs not finished").splitlines()
                if r.startswith(f"| {runs[0].name} |"))
    assert "| damaged |" in line and "unreadable rounds.parquet" in line


def test_duplicate_runs_of_one_seed_are_listed_and_counted_once(sweep, tmp_path):
    """Three runs of one method, setting and seed: the newest counts, the others are listed as
    duplicates naming it; nothing is averaged (the table's value is the newest run's)."""
    import json
    import shutil

    source = sweep / "trial_fedavg_s0.5_T2_seed0"
    other = sweep / "trial_fedavg_s0.5_T2_seed1"
    copies = [tmp_path / "runs" / f"copy{i}" for i in range(3)]
    for i, run in enumerate(copies):
        shutil.copytree(source, run)
        status = json.loads((run / "status.json").read_text())
        status["updated"] = 1_000 + i  # copy2 is the newest
        (run / "status.json").write_text(json.dumps(status))
    rounds = pd.read_parquet(copies[0] / "rounds.parquet")
    rounds["acc_global"] = 0.0  # an older duplicate with other numbers must not count
    rounds.to_parquet(copies[0] / "rounds.parquet", index=False)
    shutil.copytree(other, tmp_path / "runs" / "seed1")
    runs = load_runs(tmp_path / "runs")
    by_id = runs.set_index("run_id")
    assert by_id.loc["copy2", "status"] == "finished"
    for old in ("copy0", "copy1"):
        assert by_id.loc[old, "status"] == "duplicate" and "copy2" in by_id.loc[old, "error"]
    table = final_table(runs).data
    assert int(table["seeds"].iloc[0]) == 2  # seeds 0 and 1, each once
    expected = (by_id.loc["copy2", "acc_global_window"] + by_id.loc["seed1", "acc_global_window"])
    assert table["acc_global_window_mean"].iloc[0] == pytest.approx(expected / 2)
    text = build_report(tmp_path / "runs", out=tmp_path / "report").read_text()
    listed = _section(text, "Runs not finished")
    assert "| copy0 |" in listed and "| copy1 |" in listed and "duplicate" in listed
