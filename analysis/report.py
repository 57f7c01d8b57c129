"""One Markdown report for a run or a sweep: tables inline, figures linked, CSVs beside it.

Layout of the output folder::

    report.md                 the report
    tables/*.csv, *.md, *.tex every table (numbers as CSV, formatted as Markdown and as a
                              booktabs LaTeX table, see :mod:`analysis.latex`)
    figures/*.png             curves, gain heat maps, inertia heat maps

Rows are methods (algorithm, its knobs, hand-out; see :mod:`analysis.methods`), and gains and
paired comparisons are against the baseline named by ``baseline``: ``own`` (the same algorithm
and knobs with the dense hand-out) or ``fedavg`` (plain dense FedAvg). The report says which.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from analysis import figures
from analysis.loaders import RunFrames, load
from analysis.methods import check_baseline, label_sort_key
from analysis.paired import ALPHA, MIN_SEEDS, paired_table
from analysis.tables import (
    FINETUNE_COLUMNS,
    Table,
    baseline_description,
    best_table,
    final_table,
    final_windows,
    metric_description,
    metric_mean_column,
    value_column,
)
from analysis.traffic import traffic_section

METRIC_MEANING = {
    "acc_global": "the dense global model after aggregation, scored on each client's own test "
                  "set and averaged over clients (missing for algorithms without a global "
                  "model: FedPer, local-only)",
    "acc_after": "the model each client holds after the hand-out (its personal model for "
                 "FedPer, Ditto and local-only; the sparsified copy in a LIPS sparsity round), "
                 "scored on the client's own test set and averaged over clients",
    "acc_before": "each client's locally trained model before aggregation, on its own test set",
    "acc_test": "the global model on a balanced subset of the dataset's test split (missing "
                "for algorithms without a global model)",
}
# Inertia panels per setting: every method up to this many; beyond, each method without a
# hand-out plus the best LIPS hand-out on top of each algorithm.
MAX_INERTIA_PANELS = 12


class NoRunsError(FileNotFoundError):
    """No run directory below the paths given."""


def default_out(paths: Sequence[str | Path]) -> Path:
    """``DIR/report`` for one DIR; for several, a ``report`` folder in their common parent."""
    resolved = [Path(p).expanduser().resolve() for p in paths]
    if len(resolved) == 1:
        return resolved[0] / "report"
    return Path(os.path.commonpath(resolved)) / "report"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:80] or "all"


def _unique_slugs(settings: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for setting in settings:
        slug, i = _slug(setting), 2
        while slug in out.values():
            slug, i = f"{_slug(setting)}_{i}", i + 1
        out[setting] = slug
    return out


def _duration(seconds: float) -> str:
    if not pd.notna(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


# ----- the sections ----------------------------------------------------------------------------
def how_to_read(frames: RunFrames, metric: str, windowed: bool, baseline: str = "own") -> str:
    windows = final_windows(frames.runs)
    window = _one(windows)
    what = METRIC_MEANING.get(metric, f"the runs column `{metric}`")
    if windowed and metric in METRIC_MEANING:
        span = (f"the last {window} evaluated rounds" if window else
                f"the last `train.final_window` evaluated rounds (it differs between runs: "
                f"{', '.join(map(str, windows))})")
        final = (f"The final value of a run is the mean of `{metric}` over {span} "
                 f"(`train.final_window`), not the last round: with strong label skew accuracy "
                 f"can swing by several points from one round to the next.")
    else:
        final = f"The final value of a run is `{value_column(metric, windowed)}`."
    return "\n".join([
        "## How to read this", "",
        f"- **Metric**: `{metric}`, {what}. {final}",
        "- **mean ± std** is over seeds (sample std); **n** is the number of seeds behind a cell. "
        "Only finished runs count; the others are listed at the end with their reason.",
        "- **Method**: the algorithm, in parentheses the knobs of its own config section that "
        "differ between the runs (e.g. `fedprox(mu=0.01)`), then `+lips s=.. T=..` for the "
        "LIPS hand-out (plus schedule/scorer when those differ). Every knob that tells two "
        "methods apart is in the label, in every table and figure.",
        "- **Family**: what a method's clients predict with: one *global model*; a *global "
        "body, personal parts* (an averaged body with layers of their own); *personal models*. "
        "Rows are grouped by family within a setting.",
        "- **Local work**: a participant's local training per round, in local epochs (passes "
        "over its training data, each a forward and a backward pass); in parentheses what "
        "differs, e.g. `2 (1 global + 1 personal)` for Ditto, `11 (10 head + 1 body)` for "
        "FedRep (each phase trains part of the model), extra forward passes for MOON. A method "
        "that trains more than FedAvg is not compared at equal cost.",
        f"- **Baseline**: {baseline_description(baseline)}. "
        + ("Methods without a hand-out are baselines themselves and have no gain. "
           if baseline == "own" else "FedAvg itself has no gain. ")
        + "The other choice is `ray-lips report --baseline "
        + ("fedavg`." if baseline == "own" else "own`."),
        "- **Gain** is the method's mean minus its baseline's mean in the same setting (same "
        "dataset, model, data and training settings; only the method differs). `-` marks a "
        "baseline, or a metric the algorithm does not have (a missing value, never zero).",
        "- **Paired**: the same seed gives a method and its baseline the same partition, initial "
        "model and batch order, so each seed yields one difference method - baseline. *wins* "
        "counts seeds where the method is ahead; *p* is a paired t-test (and a Wilcoxon "
        f"signed-rank test). A difference is called a gain or a loss only when p < {ALPHA} over "
        f"at least {MIN_SEEDS} paired seeds; otherwise it is marked **within noise**.",
        "- **Fine-tune** shows both scores: `acc_finetune` (BatchNorm statistics as local "
        "fine-tuning left them, the reference's number) and `acc_finetune_bnrecal` (statistics "
        "recomputed on the client's own training data, weights unchanged). They can disagree by "
        "several points; neither is picked silently.",
    ])


def runs_overview(runs: pd.DataFrame, column: str) -> Table:
    """Every run: method, seed, status, progress, its final value and wall time."""
    rank = {m: i for i, m in enumerate(sorted(set(runs["method"].astype(str)),
                                              key=label_sort_key))}
    ordered = (runs.assign(_rank=[rank[str(m)] for m in runs["method"]])
               .sort_values(["setting", "_rank", "seed", "run_id"], na_position="last")
               .drop(columns="_rank"))
    settings = ordered["setting"].nunique() > 1
    shown = pd.DataFrame({
        "run": ordered["run_id"],
        **({"setting": ordered["setting"]} if settings else {}),
        "method": ordered["method"],
        "seed": ordered["seed"].astype("string").fillna("-") if "seed" in ordered else "-",
        "status": ordered["status"],
        "rounds": [f"{int(d)}/{int(t)}" if pd.notna(t) else str(d)
                   for d, t in zip(ordered["rounds_done"], ordered["rounds_total"], strict=True)],
        column: [f"{v:.4f}" if pd.notna(v) else "-" for v in ordered.get(column, pd.Series())],
        "wall time": [_duration(s) for s in ordered["elapsed_s"]],
    })
    keep = ["run_id", "path", "setting", "method", "base_method", "algorithm", "handout",
            "sparsity", "period", "seed",
            "status", "error", "rounds_done", "rounds_total", column, *FINETUNE_COLUMNS,
            "elapsed_s", "seconds_per_round"]
    data = ordered[[c for c in keep if c in ordered]]
    return Table(data.reset_index(drop=True), shown.reset_index(drop=True),
                 f"All {len(runs)} runs found.")


def not_finished(runs: pd.DataFrame) -> Table:
    rows = runs[runs["status"] != "finished"].sort_values("run_id")
    shown = pd.DataFrame({
        "run": rows["run_id"], "method": rows["method"],
        "seed": rows["seed"].astype("string").fillna("-") if "seed" in rows else "-",
        "status": rows["status"],
        "rounds": [f"{int(d)}/{int(t)}" if pd.notna(t) else str(d)
                   for d, t in zip(rows["rounds_done"], rows["rounds_total"], strict=True)],
        "reason": [e if isinstance(e, str) and e else "-" for e in rows["error"]],
        "last update": [t.strftime("%Y-%m-%d %H:%M") if pd.notna(t) else "-"
                        for t in rows["updated"]],
    })
    return Table(rows[["run_id", "path", "method", "status", "error", "rounds_done",
                       "rounds_total"]].reset_index(drop=True), shown.reset_index(drop=True),
                 "Runs left out of the tables and figures: still running (or stopped without a "
                 "final status, e.g. by an early-stopping scheduler), failed, diverged, "
                 "interrupted, damaged, or a duplicate of a newer run of the same method, "
                 "setting and seed (each seed counts once).")


def _inertia_methods(final: Table, setting: str) -> list[str]:
    """Every method of the setting; when there are more than :data:`MAX_INERTIA_PANELS`, each
    method without a hand-out plus the best of each hand-out (by mean; LIPS, freeze) on top of
    each algorithm."""
    data = final.data[final.data["setting"] == setting]
    methods = data["method"].tolist()
    if len(methods) <= MAX_INERTIA_PANELS:
        return methods
    mean_col = metric_mean_column(data)
    chosen = data[data["handout"] == "dense"]["method"].tolist()
    handed = data[data["handout"] != "dense"].dropna(subset=[mean_col])
    for _, group in handed.groupby(["base_method", "handout"], sort=False):
        chosen.append(group.loc[group[mean_col].idxmax(), "method"])
    return [m for m in methods if m in chosen]


def _one(values: list[int]) -> int | None:
    return values[0] if len(values) == 1 else None


def _link(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


# ----- the report ------------------------------------------------------------------------------
def build_report(paths: str | Path | Sequence[str | Path], out: str | Path | None = None,
                 metric: str = "acc_global", windowed: bool = True,
                 baseline: str = "own") -> Path:
    """Load the runs below ``paths``, write tables, figures and ``report.md``; return its path.

    ``baseline`` is what gains and paired comparisons are against: ``own`` (the same algorithm
    and knobs with the dense hand-out) or ``fedavg`` (plain dense FedAvg).
    """
    check_baseline(baseline)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    frames = load(paths)
    if frames.runs.empty:
        raise NoRunsError(f"no runs (folders with config.yaml and status.json) under: "
                          f"{', '.join(str(p) for p in paths)}")
    out = Path(out).expanduser().resolve() if out is not None else default_out(paths)
    fig_dir, table_dir = out / "figures", out / "tables"
    for folder in (fig_dir, table_dir):
        folder.mkdir(parents=True, exist_ok=True)
    column = value_column(metric, windowed)
    runs = frames.runs
    counts = runs["status"].value_counts()
    final = final_table(runs, metric, windowed, baseline=baseline)
    paired = paired_table(runs, [metric, *FINETUNE_COLUMNS], windowed, baseline=baseline)
    best = best_table(final)
    overview = runs_overview(runs, column)
    pending = not_finished(runs)
    for table, stem in ((final, "final"), (paired, "paired"), (best, "best"),
                        (overview, "runs"), (pending, "not_finished")):
        table.save(table_dir, stem)

    sources = ", ".join(f"`{Path(p).expanduser().resolve()}`" for p in paths)
    status_line = ", ".join(f"{n} {s}" for s, n in counts.items())
    lines = [
        f"# ray-lips report: {', '.join(Path(p).resolve().name for p in paths)}", "",
        f"{len(runs)} runs ({status_line}) found under {sources}; written "
        f"{time.strftime('%Y-%m-%d %H:%M')}. "
        f"Final metric: {metric_description(metric, windowed, _one(final_windows(runs)))}. "
        f"Methods: {len(final.data['method'].unique())}; gains against "
        f"{baseline_description(baseline)}.",
        "",
        how_to_read(frames, metric, windowed, baseline), "",
        "## Final accuracy", "", final.to_markdown(), "",
        "## Paired comparisons (method - baseline, per seed)", "",
        paired.to_markdown() if len(paired.data) else
        "_No pairs: a paired comparison needs finished runs of a method and of its baseline "
        "with the same seed in the same setting._", "",
        "## Best method per setting and baseline", "",
        best.to_markdown() if len(best.data) else
        "_No finished method with a finished baseline._", "",
    ]
    lines += _figure_sections(frames, final, metric, windowed, out, fig_dir)
    lines += traffic_section(frames.rounds, metric, fig_dir, table_dir, lambda p: _link(p, out))
    lines += ["## Runs not finished", "",
              pending.to_markdown() if len(pending.data) else "_All runs finished._", "",
              "## All runs", "", overview.to_markdown(), "",
              "## Files", "",
              "Every table is also in `tables/` as CSV (numbers) and Markdown: " +
              ", ".join(f"[{p.name}]({_link(p, out)})" for p in sorted(table_dir.glob("*.csv"))),
              "",
              "The same tables as booktabs LaTeX, each a `table` with its caption and a label "
              "(`tab:final`, `tab:paired`, ...) for `\\input` (needs `\\usepackage{booktabs}`): " +
              ", ".join(f"[{p.name}]({_link(p, out)})" for p in sorted(table_dir.glob("*.tex"))),
              ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _figure_sections(frames: RunFrames, final: Table, metric: str, windowed: bool, out: Path,
                     fig_dir: Path) -> list[str]:
    lines = ["## Gain heat map (sparsity x period)", ""]
    heat = figures.gain_heatmap_figure(final)
    if heat is None:
        lines += ["_No gain to map: needs finished LIPS runs and finished runs of their "
                  "baseline in one setting._", ""]
    else:
        path = figures.save(heat, fig_dir / "gain_heatmap.png")
        lines += [f"![gain heat map]({_link(path, out)})", "",
                  "_One panel per algorithm the LIPS hand-out is on top of. Colour and number: "
                  "the LIPS method's mean - its baseline's mean; * = supported by the paired "
                  "test._", ""]
    lines += ["## Accuracy versus round", ""]
    done = frames.runs[frames.runs["status"] == "finished"]
    windows = {s: int(w.max()) for s, w in done.groupby("setting")["final_window"]}
    curves = figures.curves_figure(frames.rounds, metric, windows=windows if windowed else None)
    drawn_methods = set(figures.curve_stats(frames.rounds, metric)["method"])
    no_values = [m for m in final.data["method"].unique()
                 if m not in drawn_methods and m in set(done["method"])]
    if curves is None:
        lines += [f"_No evaluated rounds of finished runs for `{metric}`._", ""]
    else:
        path = figures.save(curves, fig_dir / f"curves_{metric}.png")
        lines += [f"![{metric} versus round]({_link(path, out)})", "",
                  "_Line: mean over seeds; band: ± one std over seeds; grey: the rounds the "
                  "windowed final value averages._" if windowed else
                  "_Line: mean over seeds; band: ± one std over seeds._", ""]
    if no_values:
        lines += [f"_No `{metric}` values (so no line) for: "
                  f"{', '.join(f'`{m}`' for m in no_values)}._", ""]
    lines += ["## Layer-wise inertia", "",
              "Relative update ||w_l(r) - w_l(r-1)|| / ||w_l(r-1)|| of each layer of the global "
              "model per round (log colour scale, shared by the panels of one figure; mean over "
              "seeds), one panel per method. Layers in model order; * marks the middle layers "
              "LIPS sparsifies. Inertia shows as dark middle-layer rows in FedAvg's late "
              "rounds.", ""]
    slugs = _unique_slugs(sorted(frames.runs["setting"].unique()))
    layers = frames.layers
    finished_layers = layers[layers["status"] == "finished"] if "status" in layers else layers
    if "rel_update" in finished_layers:
        finished_layers = finished_layers[finished_layers["rel_update"].notna()]
    drawn = 0
    for setting, slug in slugs.items():
        methods = _inertia_methods(final, setting)
        fig = figures.setting_inertia_figure(frames.layers, setting, methods,
                                             rounds=frames.rounds)
        if fig is None:
            continue
        path = figures.save(fig, fig_dir / f"inertia_{slug}.png")
        lines += [f"![inertia {setting}]({_link(path, out)})", ""]
        with_layers = set(finished_layers[finished_layers["setting"] == setting]["method"])
        here = final.data[final.data["setting"] == setting]
        left_out = [m for m in here["method"] if m not in methods]
        without = [m for m in methods if m not in with_layers and here.loc[
            here["method"] == m, "seeds"].sum() > 0]
        if without:
            lines += [f"_No layer metrics for: {', '.join(f'`{m}`' for m in without)}._", ""]
        if left_out:
            lines += [f"_Not drawn (more than {MAX_INERTIA_PANELS} methods; the best hand-out "
                      f"per algorithm is shown): {', '.join(f'`{m}`' for m in left_out)}._", ""]
        drawn += 1
    if not drawn:
        lines += ["_No layer metrics from finished runs._", ""]
    return lines
