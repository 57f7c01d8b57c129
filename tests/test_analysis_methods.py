"""Analysis by method: labels, baselines and reports over synthetic run folders of every algorithm.

The folders are written the way a run writes them (``config.yaml``, ``status.json`` and the
three Parquet tables) with numbers chosen here, so every gain and paired statistic the analysis
reports can be checked against a value computed in the test.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from scipy import stats

from analysis import figures
from analysis.loaders import load
from analysis.methods import (
    Method,
    baseline_labels,
    check_baseline,
    label_methods,
    label_sort_key,
    method_of,
    normalise,
    varying_knobs,
)
from analysis.paired import paired_frame, paired_table
from analysis.report import build_report
from analysis.tables import best_table, final_table, gain_grid
from ray_lips.cli.report import report

SEEDS = (0, 1, 2)
ROUNDS, WINDOW = 4, 2
# per seed, the windowed acc_global a run ends on (None: the algorithm has no global model)
MIXED = {  # label -> (algorithm, handout, section knobs, acc_global per seed)
    "fedavg": ("fedavg", "dense", {}, (0.60, 0.62, 0.64)),
    "fedavg+lips s=0.5 T=5": ("fedavg", "lips", {}, (0.63, 0.66, 0.66)),
    "fedprox(mu=0.01)": ("fedprox", "dense", {"fedprox.mu": 0.01}, (0.61, 0.60, 0.65)),
    "fedprox(mu=0.01)+lips s=0.5 T=5": ("fedprox", "lips", {"fedprox.mu": 0.01},
                                        (0.66, 0.66, 0.705)),
    "fedprox(mu=0.1)": ("fedprox", "dense", {"fedprox.mu": 0.1}, (0.55, 0.57, 0.56)),
    "fedprox(mu=0.1)+lips s=0.5 T=5": ("fedprox", "lips", {"fedprox.mu": 0.1},
                                       (0.54, 0.58, 0.56)),
    "scaffold": ("scaffold", "dense", {}, (0.70, 0.69, 0.71)),
    "scaffold+lips s=0.5 T=5": ("scaffold", "lips", {}, (0.71, 0.69, 0.69)),
    "fedper": ("fedper", "dense", {}, None),
    "ditto": ("ditto", "dense", {}, (0.58, 0.59, 0.60)),
    "local": ("local", "dense", {}, None),
}
ORDER = list(MIXED)  # the order the tables sort methods in: by family, then algorithm
FAMILY = {label: {"fedper": "global body, personal parts", "ditto": "personal models",
                  "local": "personal models"}.get(algorithm, "global model")
          for label, (algorithm, *_) in MIXED.items()}
AFTER_SHIFT = 0.1  # acc_after = acc_global + shift (personal models: a value of their own)
PERSONAL_AFTER = {"fedper": (0.80, 0.82, 0.81), "local": (0.75, 0.74, 0.78)}


# ----- writing run folders ----------------------------------------------------------------------
def resolved_config(seed: int, algorithm: str, handout: str | None = "dense",
                    knobs: dict | None = None) -> dict:
    """A resolved config as the new schema writes it: every section, with defaults."""
    cfg = {
        "name": "mixed", "seed": seed, "output": "runs",
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "clients": 4,
                 "train_per_client": 20, "test_per_client": 10},
        "model": "smallcnn",
        "train": {"rounds": ROUNDS, "local_epochs": 1, "batch_size": 20, "lr": 0.05,
                  "eval_every": 1, "finetune_epochs": 1, "checkpoint_every": 2,
                  "final_window": WINDOW},
        "algorithm": algorithm, "handout": handout,
        "lips": {"sparsity": 0.5, "period": 5, "schedule": "linear", "scorer": "sensitivity"},
        "fedprox": {"mu": 0.01}, "scaffold": {"server_lr": 1.0},
        "fedper": {"personal_layers": ["fc"]}, "ditto": {"lam": 0.1, "personal_epochs": 1},
        "resources": {"pools": 1, "cpus_per_pool": 1, "gpus_per_pool": 0},
    }
    if handout is None:  # a legacy folder: no handout key, no sections of the new algorithms
        for key in ("handout", "fedprox", "scaffold", "fedper", "ditto"):
            del cfg[key]
    for key, value in (knobs or {}).items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def write_run(folder: Path, cfg: dict, acc_global: float | None, acc_after: float,
              layers: bool = True) -> Path:
    """config.yaml, status.json and the Parquet tables of one finished run.

    acc_global climbs to its final value and stays there for the last WINDOW rounds, so the
    windowed value is exactly ``acc_global``; NaN throughout for ``None``.
    """
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (folder / "status.json").write_text(json.dumps(
        {"status": "finished", "round": ROUNDS, "rounds": ROUNDS, "elapsed_s": 2.0,
         "updated": time.time()}))
    climb = (-0.2, -0.1, 0.0, 0.0)
    rows = []
    for r, step in zip(range(1, ROUNDS + 1), climb, strict=True):
        glob = math.nan if acc_global is None else acc_global + step
        rows.append({"round": r, "evaluated": True, "train_loss": 1.0 / r,
                     "acc_before": acc_after - 0.3 + step, "acc_after": acc_after + step,
                     "acc_global": glob, "acc_test": glob, "seconds": 0.5})
    pd.DataFrame(rows).to_parquet(folder / "rounds.parquet", index=False)
    if layers:
        layer_rows = [
            {"round": r, "layer": name, "layer_index": i, "kind": kind, "eligible": eligible,
             "numel": 10, "rel_update": 0.1 / (r + i) * (1.5 if cfg["seed"] else 1.0)}
            for r in range(1, ROUNDS + 1)
            for i, (name, kind, eligible) in enumerate(
                (("conv1", "conv", False), ("conv2", "conv", True), ("fc", "linear", False)))]
        pd.DataFrame(layer_rows).to_parquet(folder / "layers.parquet", index=False)
    pd.DataFrame({"client": range(4), "acc_final": acc_after,
                  "acc_finetune": acc_after + 0.01, "acc_finetune_bnrecal": acc_after + 0.02}
                 ).to_parquet(folder / "clients.parquet", index=False)
    return folder


def after_values(label: str) -> tuple[float, ...]:
    if label in PERSONAL_AFTER:
        return PERSONAL_AFTER[label]
    return tuple(v + AFTER_SHIFT for v in MIXED[label][3])


def build_mixed(root: Path) -> Path:
    sweep = root / "mixed"
    for n, (label, (algorithm, handout, knobs, values)) in enumerate(MIXED.items()):
        for seed in SEEDS:
            cfg = resolved_config(seed, algorithm, handout, knobs)
            if algorithm == "fedavg":  # a knob of a section fedavg does not use: no label
                cfg["scaffold"]["server_lr"] = 0.5
            write_run(sweep / f"trial_{n:02d}_seed{seed}", cfg,
                      None if values is None else values[seed], after_values(label)[seed],
                      layers=algorithm != "local")
    return sweep


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return build_mixed(tmp_path_factory.mktemp("methods"))


@pytest.fixture(scope="module")
def frames(mixed):
    return load(mixed)


def mean_of(label: str, metric: str = "acc_global") -> float:
    values = MIXED[label][3] if metric == "acc_global" else after_values(label)
    return math.nan if values is None else float(np.mean(values))


# ----- methods.py on its own --------------------------------------------------------------------
def test_normalise_reads_legacy_and_new_configs():
    assert normalise({"algorithm": "lips"}) == ("fedavg", "lips")
    assert normalise({"algorithm": "lips", "handout": "dense"}) == ("fedavg", "lips")
    assert normalise({"algorithm": "fedavg"}) == ("fedavg", "dense")
    assert normalise({"algorithm": "fedprox", "handout": "lips"}) == ("fedprox", "lips")
    assert normalise({"algorithm": "local", "handout": math.nan}) == ("local", "dense")
    assert normalise({}) == ("?", "dense")


def test_labels_name_only_the_knobs_that_differ_within_an_algorithm():
    def flat(algorithm, handout="dense", **knobs):
        cfg = {"algorithm": algorithm, "handout": handout, "lips.sparsity": 0.7,
               "lips.period": 5, "lips.scorer": "sensitivity", "fedprox.mu": 0.01,
               "ditto.lam": 0.1, "ditto.personal_epochs": 1, "fedper.personal_layers": ("fc",)}
        cfg.update({k.replace("__", "."): v for k, v in knobs.items()})
        return cfg

    configs = [flat("fedavg", fedprox__mu=0.5), flat("fedavg", "lips"),
               flat("fedprox", fedprox__mu=0.01), flat("fedprox", "lips", fedprox__mu=0.1),
               flat("ditto", ditto__lam=1.0, ditto__personal_epochs=2), flat("ditto"),
               flat("fedper", fedper__personal_layers=("fc", "head"))]
    assert varying_knobs(configs) == {"fedprox.mu", "ditto.lam", "ditto.personal_epochs"}
    labels = [m.label for m in label_methods(configs)]
    assert labels == ["fedavg", "fedavg+lips s=0.7 T=5", "fedprox(mu=0.01)",
                      "fedprox(mu=0.1)+lips s=0.7 T=5", "ditto(lam=1, personal_epochs=2)",
                      "ditto(lam=0.1, personal_epochs=1)", "fedper"]
    shown = {"fedper.personal_layers", "lips.scorer"}
    assert method_of(configs[-1], shown).label == "fedper(personal_layers=[fc,head])"
    assert method_of(configs[1], shown).label == "fedavg+lips s=0.7 T=5 scorer=sensitivity"


def test_a_method_knows_its_baseline():
    lips = method_of({"algorithm": "fedprox", "handout": "lips", "fedprox.mu": 0.01,
                      "lips.sparsity": 0.7, "lips.period": 5}, {"fedprox.mu"})
    assert lips == Method("fedprox", "lips", "fedprox(mu=0.01)+lips s=0.7 T=5",
                          "fedprox(mu=0.01)")
    assert lips.baseline() == "fedprox(mu=0.01)" and lips.baseline("fedavg") == "fedavg"
    dense = method_of({"algorithm": "fedprox", "fedprox.mu": 0.01}, {"fedprox.mu"})
    assert dense.baseline("own") is None and dense.baseline("fedavg") == "fedavg"
    assert method_of({"algorithm": "fedavg"}).baseline("fedavg") is None
    legacy = method_of({"algorithm": "lips", "lips.sparsity": 0.5, "lips.period": 2})
    assert legacy.label == "fedavg+lips s=0.5 T=2" and legacy.baseline() == "fedavg"
    with pytest.raises(ValueError, match="own, fedavg"):
        check_baseline("fedprox")


def test_label_order_is_algorithm_then_dense_then_knobs_by_value():
    labels = ["local", "fedavg+lips s=0.5 T=10", "fedprox(mu=0.1)", "fedavg",
              "fedavg+lips s=0.5 T=5", "fedprox(mu=0.01)+lips s=0.5 T=5", "fedprox(mu=0.01)"]
    assert sorted(labels, key=label_sort_key) == [
        "fedavg", "fedavg+lips s=0.5 T=5", "fedavg+lips s=0.5 T=10", "fedprox(mu=0.01)",
        "fedprox(mu=0.01)+lips s=0.5 T=5", "fedprox(mu=0.1)", "local"]


# ----- the runs frame ---------------------------------------------------------------------------
def test_every_run_gets_its_method_and_the_setting_ignores_method_sections(frames):
    runs = frames.runs
    assert len(runs) == len(MIXED) * len(SEEDS)
    assert set(runs["setting"]) == {"digits/smallcnn"}
    assert sorted(runs["method"].unique(), key=ORDER.index) == ORDER
    for label, (algorithm, handout, _, _) in MIXED.items():
        rows = runs[runs["method"] == label]
        assert len(rows) == len(SEEDS), label
        assert set(rows["algorithm"]) == {algorithm} and set(rows["handout"]) == {handout}
        assert set(rows["base_method"]) == {label.split("+")[0]}
        if handout == "lips":
            assert set(rows["sparsity"]) == {0.5} and set(rows["period"]) == {5.0}
        else:
            assert rows[["sparsity", "period"]].isna().all().all()
    # metrics an algorithm does not have are NaN, not zero
    no_global = runs[runs["algorithm"].isin(["fedper", "local"])]
    assert no_global[["acc_global_window", "acc_test_window"]].isna().all().all()
    assert no_global["acc_after_window"].notna().all()
    for name in ("rounds", "layers", "clients"):
        assert {"method", "base_method", "algorithm", "handout"} <= set(getattr(frames, name))
    assert "local" not in set(frames.layers["method"])


def test_baseline_labels_of_the_runs_frame(frames):
    runs = frames.runs.drop_duplicates("method").set_index("method")
    own = baseline_labels(runs.reset_index(), "own").set_axis(runs.index)
    assert own["fedprox(mu=0.1)+lips s=0.5 T=5"] == "fedprox(mu=0.1)"
    assert own["scaffold+lips s=0.5 T=5"] == "scaffold"
    assert own[[m for m in ORDER if "+" not in m]].isna().all()
    vs_fedavg = baseline_labels(runs.reset_index(), "fedavg").set_axis(runs.index)
    assert pd.isna(vs_fedavg["fedavg"])
    assert (vs_fedavg.drop("fedavg") == "fedavg").all()


# ----- tables -----------------------------------------------------------------------------------
def test_final_table_has_one_row_per_method_and_own_baseline_gains(frames):
    table = final_table(frames.runs)
    data = table.data
    assert list(data["method"]) == ORDER
    assert list(data["family"]) == [FAMILY[m] for m in ORDER]
    assert dict(zip(data["method"], data["local_work"], strict=True)) == {
        m: "2 (1 global + 1 personal)" if m == "ditto" else "1" for m in ORDER}
    assert (data["seeds"] == len(SEEDS)).all()
    by = data.set_index("method")
    for label in ORDER:
        assert by.loc[label, "acc_global_window_mean"] == pytest.approx(
            mean_of(label), nan_ok=True)
        if "+" in label:
            base = label.split("+")[0]
            assert by.loc[label, "baseline"] == base
            assert by.loc[label, "gain"] == pytest.approx(mean_of(label) - mean_of(base))
        else:  # a dense method is its own baseline: no gain row
            assert pd.isna(by.loc[label, "baseline"]) and np.isnan(by.loc[label, "gain"])
    shown = table.display.set_index("method")
    assert shown.loc["fedper", "acc_global_window"] == "-"
    assert shown.loc["local", "gain"] == "-"
    gain = mean_of("fedprox(mu=0.01)+lips s=0.5 T=5") - mean_of("fedprox(mu=0.01)")
    assert shown.loc["fedprox(mu=0.01)+lips s=0.5 T=5", "gain"] == f"{gain:+.3f}"  # a gain
    assert "`--baseline own`" in table.caption
    assert not table.display.drop(columns=["n"]).duplicated().any()


def test_paired_comparisons_pair_each_lips_method_with_its_own_dense_twin(frames):
    paired = paired_frame(frames.runs).set_index("method")
    lips = [m for m in ORDER if "+" in m]
    assert sorted(paired.index, key=ORDER.index) == lips
    for label in lips:
        base = label.split("+")[0]
        ours, theirs = np.array(MIXED[label][3]), np.array(MIXED[base][3])
        row = paired.loc[label]
        assert row["baseline"] == base and row["n"] == len(SEEDS)
        assert row["diff_mean"] == pytest.approx((ours - theirs).mean())
        assert row["wins"] == int((ours - theirs > 0).sum())
        assert row["p_ttest"] == pytest.approx(stats.ttest_rel(ours, theirs).pvalue,
                                               nan_ok=True)
    assert paired.loc["fedprox(mu=0.01)+lips s=0.5 T=5", "verdict"] == "gain"
    shown = paired_table(frames.runs).display
    assert list(shown.columns[:4]) == ["dataset", "model", "method", "baseline"]
    assert "method - baseline" in shown.columns


def test_baseline_fedavg_compares_every_method_with_fedavg(frames):
    table = final_table(frames.runs, baseline="fedavg")
    by = table.data.set_index("method")
    fedavg = mean_of("fedavg")
    assert pd.isna(by.loc["fedavg", "baseline"])
    for label in ORDER[1:]:
        assert by.loc[label, "baseline"] == "fedavg"
        assert by.loc[label, "gain"] == pytest.approx(mean_of(label) - fedavg, nan_ok=True)
    assert np.isnan(by.loc["local", "gain"]) and np.isnan(by.loc["fedper", "gain"])
    shown = table.display.set_index("method")
    assert shown.loc["local", "gain"] == "-" and shown.loc["fedavg", "gain"] == "-"
    assert "`--baseline fedavg`" in table.caption
    # on acc_after the personal models have values, so they get gains and pairs too
    after = final_table(frames.runs, metric="acc_after", baseline="fedavg").data
    after = after.set_index("method")
    for label in ("local", "fedper", "ditto"):
        assert after.loc[label, "gain"] == pytest.approx(
            mean_of(label, "acc_after") - mean_of("fedavg", "acc_after"))
    pairs = paired_frame(frames.runs, "acc_after", baseline="fedavg").set_index("method")
    assert set(pairs.index) == set(ORDER[1:])
    assert pairs.loc["local", "diff_mean"] == pytest.approx(
        np.mean(np.subtract(PERSONAL_AFTER["local"], after_values("fedavg"))))
    # acc_global: local and fedper have no value, so no pair (and no crash)
    assert {"local", "fedper"}.isdisjoint(paired_frame(frames.runs, baseline="fedavg")["method"])


def test_best_table_and_gain_grids_per_algorithm(frames):
    final = final_table(frames.runs)
    best = best_table(final).data.set_index("baseline")
    assert set(best.index) == {"fedavg", "fedprox(mu=0.01)", "fedprox(mu=0.1)", "scaffold"}
    assert best.loc["fedprox(mu=0.01)", "method"] == "fedprox(mu=0.01)+lips s=0.5 T=5"
    assert (best["candidates"] == 1).all()
    grid = gain_grid(final, "digits/smallcnn", "fedprox(mu=0.1)")
    assert grid.shape == (1, 1) and grid.iloc[0, 0] == pytest.approx(
        mean_of("fedprox(mu=0.1)+lips s=0.5 T=5") - mean_of("fedprox(mu=0.1)"))
    versus_fedavg = best_table(final_table(frames.runs, baseline="fedavg")).data
    assert len(versus_fedavg) == 1
    top = max((m for m in ORDER[1:] if MIXED[m][3]), key=mean_of)
    assert versus_fedavg["method"].iloc[0] == top == "scaffold"
    assert versus_fedavg["candidates"].iloc[0] == len(ORDER) - 3  # all but fedavg, fedper, local


# ----- figures ----------------------------------------------------------------------------------
def test_curves_show_every_method_with_values(frames):
    fig = figures.curves_figure(frames.rounds, "acc_global")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == [f"{m} (n=3)" for m in ORDER if m not in ("fedper", "local")]
    styles = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert styles["fedavg (n=3)"] == "-" and styles["scaffold+lips s=0.5 T=5 (n=3)"] == "--"
    colours = [tuple(line.get_color()) if not isinstance(line.get_color(), str)
               else line.get_color() for line in fig.axes[0].get_lines()]
    assert len(set(colours)) == len(colours)  # nine methods, nine colours
    after = figures.curves_figure(frames.rounds, "acc_after")
    assert len(after.axes[0].get_lines()) == len(ORDER)


def test_inertia_figure_has_a_panel_per_method_with_layers(frames):
    fig = figures.setting_inertia_figure(frames.layers, "digits/smallcnn")
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.images]
    assert titles == [f"{m} (mean of 3 seeds)" for m in ORDER if m != "local"]
    line_ax = next(ax for ax in fig.axes if ax.get_ylabel().startswith("mean rel"))
    assert len(line_ax.get_lines()) == len(ORDER) - 1
    fedavg_lips = next(line for line in line_ax.get_lines()
                       if line.get_label().startswith("fedavg+lips"))
    assert fedavg_lips.get_color() != "black"  # only plain FedAvg is black


def test_gain_heat_map_has_a_panel_per_algorithm_under_lips(frames):
    fig = figures.gain_heatmap_figure(final_table(frames.runs))
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.images]
    assert len(titles) == 4
    assert any(t.startswith("gain of fedprox(mu=0.1)+lips over fedprox(mu=0.1)") for t in titles)


# ----- reports ----------------------------------------------------------------------------------
def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_end_to_end_with_methods_that_have_no_global_model(mixed, tmp_path):
    path = build_report(mixed, out=tmp_path / "own")
    text = path.read_text()
    final = _section(text, "Final accuracy")
    rows = [line for line in final.splitlines() if line.startswith("| digits |")]
    assert [line.split(" | ")[2] for line in rows] == [FAMILY[m] for m in ORDER]
    assert [line.split(" | ")[3] for line in rows] == ORDER
    assert re.search(r"\| personal models \| local \| 1 \| 3 \| - \| - \| - \|", final)
    assert "| personal models | ditto | 2 (1 global + 1 personal) | 3 |" in final
    paired = _section(text, "Paired comparisons (method - baseline, per seed)")
    assert "| fedprox(mu=0.1)+lips s=0.5 T=5 | fedprox(mu=0.1) | acc_global_window | 3 |" in paired
    every = _section(text, "All runs")
    for label in ORDER:
        assert f"| {label} |" in every, label
    curves = _section(text, "Accuracy versus round")
    assert "No `acc_global` values (so no line) for: `fedper`, `local`" in curves
    inertia = _section(text, "Layer-wise inertia")
    assert "No layer metrics for: `local`" in inertia and "figures/inertia_" in inertia
    assert "`--baseline own`" in _section(text, "How to read this")
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (path.parent / link).is_file(), link


def test_report_cli_with_baseline_fedavg(mixed, tmp_path):
    result = CliRunner().invoke(report, [str(mixed), "--out", str(tmp_path / "r"),
                                         "--baseline", "fedavg", "--metric", "acc_after"])
    assert result.exit_code == 0, result.output
    text = Path(result.output.strip().splitlines()[-1]).read_text()
    assert "plain FedAvg with the dense hand-out (`--baseline fedavg`)" in text
    final = _section(text, "Final accuracy")
    gain = mean_of("local", "acc_after") - mean_of("fedavg", "acc_after")
    assert re.search(r"\| local \| 1 \| 3 \| [0-9.]+ ± [0-9.]+ \| fedavg \| "
                     + re.escape(f"{gain:+.3f}"), final)
    assert "| global model | fedavg | 1 | 3 |" in final
    bad = CliRunner().invoke(report, [str(mixed), "--baseline", "fedprox"])
    assert bad.exit_code == 2 and "fedprox" in bad.output


# ----- a scorer sweep: every table names the scorer -----------------------------------------------
@pytest.fixture(scope="module")
def scorer_sweep(tmp_path_factory) -> Path:
    """Legacy folders (``algorithm: lips``, no handout key) of FedAvg and two LIPS scorers."""
    root = tmp_path_factory.mktemp("scorers") / "sweep"
    values = {"fedavg": (0.60, 0.61, 0.62), "magnitude": (0.62, 0.60, 0.66),
              "sensitivity": (0.64, 0.63, 0.65)}
    for name, accs in values.items():
        for seed in SEEDS:
            cfg = resolved_config(seed, "fedavg" if name == "fedavg" else "lips", None,
                                  {"lips.sparsity": 0.7, "lips.period": 5})
            if name != "fedavg":
                cfg["lips"]["scorer"] = name
            write_run(root / f"{name}_seed{seed}", cfg, accs[seed], accs[seed] + 0.1)
    return root


def test_a_scorer_sweep_gives_distinct_labels_in_every_table(scorer_sweep, tmp_path):
    frames = load(scorer_sweep)
    expected = ["fedavg", "fedavg+lips s=0.7 T=5 scorer=magnitude",
                "fedavg+lips s=0.7 T=5 scorer=sensitivity"]
    final = final_table(frames.runs)
    assert list(final.display["method"]) == expected
    assert not final.display.drop(columns=["n"]).duplicated().any()
    assert final.data.set_index("method").loc[expected[1], "gain"] == pytest.approx(
        np.mean((0.62, 0.60, 0.66)) - np.mean((0.60, 0.61, 0.62)))
    assert list(paired_table(frames.runs).display["method"]) == expected[1:]
    best = best_table(final).display
    assert list(best["best method"]) == [expected[2]]
    text = build_report(scorer_sweep, out=tmp_path / "r").read_text()
    for title in ("Final accuracy", "Paired comparisons (method - baseline, per seed)",
                  "All runs"):
        section = _section(text, title)
        for label in expected[1:]:
            assert f"| {label} |" in section, (title, label)
        assert "| lips | 0.7 | 5 |" not in section


def test_many_methods_draw_each_dense_one_and_the_best_hand_out_per_algorithm(tmp_path):
    from analysis.report import MAX_INERTIA_PANELS, _inertia_methods

    sweep = tmp_path / "grid"
    grid = [(s, t) for s in (0.3, 0.5, 0.7) for t in (2, 5)]
    for algorithm in ("fedavg", "fedprox"):
        write_run(sweep / f"{algorithm}_dense", resolved_config(0, algorithm), 0.6, 0.7)
        for i, (sparsity, period) in enumerate(grid):
            cfg = resolved_config(0, algorithm, "lips",
                                  {"lips.sparsity": sparsity, "lips.period": period})
            best = 0.1 if (algorithm, sparsity, period) in (("fedavg", 0.5, 5),
                                                            ("fedprox", 0.3, 2)) else 0.0
            write_run(sweep / f"{algorithm}_lips{i}", cfg, 0.6 + 0.001 * i + best, 0.7)
    final = final_table(load(sweep).runs)
    assert len(final.data) == 14 > MAX_INERTIA_PANELS
    assert _inertia_methods(final, "digits/smallcnn") == [
        "fedavg", "fedavg+lips s=0.5 T=5", "fedprox", "fedprox+lips s=0.3 T=2"]
    text = build_report(sweep, out=tmp_path / "r").read_text()
    assert "Not drawn (more than 12 methods" in _section(text, "Layer-wise inertia")
