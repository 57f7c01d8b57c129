"""Tables, paired statistics and figures on real runs, checked against the frames and scipy."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_loaders import METHODS, SEEDS, shared_sweep

from analysis import figures
from analysis.frames import Table, to_markdown
from analysis.loaders import load
from analysis.paired import paired_stats, paired_table, verdict
from analysis.tables import best_table, final_table, gain_grid

SETTING = "digits/smallcnn lr=0.05"


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return load(shared_sweep(tmp_path_factory))


@pytest.fixture(scope="module")
def final(frames) -> Table:
    return final_table(frames.runs)


def _windowed_from_rounds(frames, metric: str) -> pd.DataFrame:
    """Per finished run: mean of the last final_window evaluated rounds, from the rounds frame."""
    rounds = frames.rounds[(frames.rounds["status"] == "finished") & frames.rounds["evaluated"]]
    rows = []
    for run_id, group in rounds.groupby("run_id"):
        window = int(frames.runs.set_index("run_id").loc[run_id, "train.final_window"])
        tail = group.sort_values("round")[metric].dropna().to_numpy()[-window:]
        rows.append({"run_id": run_id, "method": group["method"].iloc[0],
                     "seed": group["seed"].iloc[0], "value": tail.mean()})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("metric", ["acc_global", "acc_after"])
def test_final_table_numbers_are_recomputed_from_the_rounds_frame(frames, metric):
    table = final_table(frames.runs, metric=metric)
    data = table.data.set_index(["setting", "method"])
    values = _windowed_from_rounds(frames, metric)
    expected = values.groupby("method")["value"].agg(["mean", "std", "count"])
    assert len(expected) == len(METHODS)
    for method, row in expected.iterrows():
        cell = data.loc[(SETTING, method)]
        assert cell[f"{metric}_window_mean"] == pytest.approx(row["mean"])
        assert cell[f"{metric}_window_std"] == pytest.approx(row["std"])  # ddof 1, as pandas
        assert cell["seeds"] == row["count"] == len(SEEDS)
    fedavg = expected.loc["fedavg", "mean"]
    for method in expected.index.drop("fedavg"):
        assert data.loc[(SETTING, method), "gain"] == pytest.approx(
            expected.loc[method, "mean"] - fedavg)
    assert np.isnan(data.loc[(SETTING, "fedavg"), "gain"])
    assert f"`{metric}` averaged over the last 3 evaluated rounds (windowed)" in table.caption


def test_final_table_shows_both_finetune_scores_and_dashes_for_fedavg(frames, final):
    clients = frames.clients[frames.clients["status"] == "finished"]
    per_run = clients.groupby(["method", "run_id"])[["acc_finetune", "acc_finetune_bnrecal"]]
    by_method = per_run.mean().groupby("method").mean()
    data = final.data.set_index(["setting", "method"])
    for method, row in by_method.iterrows():
        assert data.loc[(SETTING, method), "acc_finetune_mean"] == pytest.approx(
            row["acc_finetune"])
        assert data.loc[(SETTING, method), "acc_finetune_bnrecal_mean"] == pytest.approx(
            row["acc_finetune_bnrecal"])
    shown = final.display
    assert {"acc_finetune", "acc_finetune_bnrecal", "method", "baseline", "gain",
            "n"} <= set(shown.columns)
    fedavg = shown[(shown["method"] == "fedavg") & (shown["n"] == 3)].iloc[0]
    assert (fedavg["baseline"], fedavg["gain"]) == ("-", "-")  # a baseline has no gain
    lips = shown[shown["method"] == "fedavg+lips s=0.5 T=2"].iloc[0]
    assert lips["baseline"] == "fedavg" and lips["gain"].startswith(("+", "-0"))
    assert " ± " in fedavg["acc_global_window"]


def test_unfinished_runs_stay_out_of_the_numbers_but_show_up(final):
    data = final.data.set_index(["setting", "method"])
    # trial_running, trial_killed and trial_failed have the config of fedavg+lips s=0.5 T=2
    # seed 0: counted, not averaged
    assert data.loc[(SETTING, "fedavg+lips s=0.5 T=2"), "not_finished"] == 3
    assert data.loc[(SETTING, "fedavg+lips s=0.5 T=2"), "seeds"] == 3
    diverged = data.loc[("digits/smallcnn lr=1e+06", "fedavg")]
    assert diverged["seeds"] == 0 and diverged["not_finished"] == 1
    assert "not finished" in final.display.columns
    # the orphan Tune trial has no config.yaml: it is listed with the runs, not as a cell
    assert len(final.data) == len(METHODS) + 1


def test_last_round_values_on_request(frames):
    table = final_table(frames.runs, windowed=False)
    done = frames.runs[frames.runs["status"] == "finished"]
    expected = done.groupby("method")["acc_global_last"].mean()
    data = table.data.set_index(["setting", "method"])
    for method, value in expected.items():
        assert data.loc[(SETTING, method), "acc_global_last_mean"] == pytest.approx(value)
    assert "at the last evaluated round" in table.caption


def test_paired_statistics_match_scipy_on_the_same_numbers(frames):
    table = paired_table(frames.runs)
    values = _windowed_from_rounds(frames, "acc_global").pivot_table(
        index="seed", columns="method", values="value")
    assert len(table.data) == len(METHODS) - 1
    for _, row in table.data.iterrows():
        lips, base = values[row["method"]].to_numpy(), values["fedavg"].to_numpy()
        diff = lips - base
        assert row["n"] == len(SEEDS)
        assert row["diff_mean"] == pytest.approx(diff.mean())
        assert row["diff_std"] == pytest.approx(diff.std(ddof=1))
        assert row["wins"] == int((diff > 0).sum())
        expected_t = stats.ttest_rel(lips, base).pvalue
        assert row["p_ttest"] == pytest.approx(expected_t, nan_ok=True)
        if np.any(diff != 0):
            assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(lips, base).pvalue)
        assert row["verdict"] == verdict(row["diff_mean"], row["p_ttest"], row["n"])


def test_verdict_needs_three_seeds_and_p_below_alpha():
    lips, base = [0.90, 0.91, 0.92, 0.93], [0.80, 0.80, 0.82, 0.82]
    out = paired_stats(lips, base)
    assert out["p_ttest"] < 0.05 and out["wins"] == 4
    assert verdict(out["diff_mean"], out["p_ttest"], out["n"]) == "gain"
    flipped = paired_stats(base, lips)
    assert verdict(flipped["diff_mean"], flipped["p_ttest"], flipped["n"]) == "loss"
    two = paired_stats(lips[:2], base[:2])
    assert verdict(two["diff_mean"], 0.001, two["n"]) == "within noise"  # too few seeds
    one = paired_stats(lips[:1], base[:1])
    assert np.isnan(one["p_ttest"]) and np.isnan(one["diff_std"]) and one["n"] == 1
    noisy = paired_stats([0.9, 0.7, 0.85], [0.8, 0.8, 0.8])
    assert verdict(noisy["diff_mean"], noisy["p_ttest"], noisy["n"]) == "within noise"


def test_within_noise_is_marked_not_called_a_gain(frames):
    runs = frames.runs
    two_seeds = runs[runs["seed"] != 2]  # at most two paired seeds: never a gain
    table = final_table(two_seeds)
    lips = table.display[table.display["method"].str.startswith("fedavg+lips")]
    assert len(lips) == len(METHODS) - 1
    assert lips["gain"].str.endswith("(within noise)").all()
    assert set(paired_table(two_seeds).data["verdict"]) == {"within noise"}


def test_best_table_picks_the_highest_lips_mean(final):
    best = best_table(final)
    lips = final.data[(final.data["setting"] == SETTING) & (final.data["handout"] == "lips")]
    top = lips.loc[lips["acc_global_window_mean"].idxmax()]
    row = best.data.set_index("setting").loc[SETTING]
    assert row["method"] == top["method"]
    fedavg = final.data[(final.data["setting"] == SETTING) & (final.data["method"] == "fedavg")]
    assert row["baseline"] == "fedavg"
    assert row["baseline_mean"] == pytest.approx(fedavg["acc_global_window_mean"].iloc[0])
    assert row["candidates"] == 3
    assert "optimistic" in best.caption


def test_markdown_and_csv_export(final, tmp_path):
    md = to_markdown(pd.DataFrame({"name": ["a|b", "c"], "value": [1.5, np.nan]}))
    lines = md.splitlines()
    assert lines[0] == "| name | value |" and lines[1] == "| :--- | ---: |"
    assert lines[2] == "| a\\|b | 1.5 |" and lines[3] == "| c |  |"
    assert to_markdown(pd.DataFrame()) == "_(no rows)_"
    csv, mdfile = final.save(tmp_path, "final")
    back = pd.read_csv(csv)
    assert len(back) == len(final.data)
    np.testing.assert_allclose(back["acc_global_window_mean"], final.data["acc_global_window_mean"])
    text = mdfile.read_text()
    assert text.count("\n| digits | smallcnn |") == len(final.display)
    assert final.caption in text


def _png_ok(path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image[..., :3].std() > 0.05


def test_curves_have_one_line_and_band_per_method(frames, tmp_path):
    fig = figures.curves_figure(frames.rounds, "acc_global", windows={SETTING: 3})
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 1  # one finished setting
    ax = axes[0]
    assert ax.get_title() == SETTING and ax.get_xlabel() == "round"
    assert ax.get_ylabel().startswith("acc_global")
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["fedavg (n=3)", "fedavg+lips s=0.5 T=2 (n=3)",
                      "fedavg+lips s=0.5 T=3 (n=3)", "fedavg+lips s=0.7 T=2 (n=3)"]
    assert len(ax.collections) == len(METHODS)  # the bands
    shaded = [p for p in ax.patches if p.get_label() == "final window (3 rounds)"]
    assert len(shaded) == 1 and shaded[0].get_x() == pytest.approx(2.5)  # rounds 3, 4, 5
    fedavg = ax.get_lines()[0]
    expected = (frames.rounds[(frames.rounds["method"] == "fedavg")
                              & (frames.rounds["status"] == "finished")]
                .groupby("round")["acc_global"].mean())
    np.testing.assert_allclose(fedavg.get_ydata(), expected.to_numpy())
    _png_ok(figures.save(fig, tmp_path / "curves.png"))


def test_gain_heat_map_is_sparsity_by_period(final, tmp_path):
    fig = figures.gain_heatmap_figure(final)
    ax = next(ax for ax in fig.axes if ax.images)
    grid = gain_grid(final, SETTING)
    assert ax.images[0].get_array().shape == (2, 2) == grid.shape
    assert list(grid.index) == [0.5, 0.7] and list(grid.columns) == [2, 3]
    texts = [t.get_text() for t in ax.texts]
    assert "not run" in texts  # sparsity 0.7 with period 3 was not in the sweep
    assert f"{grid.loc[0.5, 2]:+.3f}" in {t.rstrip('*') for t in texts}
    assert ax.get_xlabel() == "period T" and ax.get_ylabel() == "sparsity"
    _png_ok(figures.save(fig, tmp_path / "gain.png"))


def test_inertia_figure_of_a_comparison(frames, tmp_path):
    runs = frames.runs.set_index("run_id")
    dirs = [runs.loc["trial_fedavg_s0.5_T2_seed0", "path"],
            runs.loc["trial_lips_s0.5_T2_seed0", "path"]]
    out = figures.inertia_figure(dirs, tmp_path / "inertia.png")
    assert out == tmp_path / "inertia.png"
    _png_ok(out)


def test_inertia_heat_maps_are_layers_by_rounds_on_one_colour_scale(frames):
    methods = ["fedavg", "fedavg+lips s=0.5 T=2"]
    fig = figures.setting_inertia_figure(frames.layers, SETTING, methods)
    heat = [ax for ax in fig.axes if ax.images]
    one_run = frames.layers[frames.layers["run_id"] == "trial_fedavg_s0.5_T2_seed0"]
    layers, rounds = one_run["layer"].nunique(), one_run["round"].nunique()
    assert len(heat) == 2
    assert [ax.get_title() for ax in heat] == ["fedavg (mean of 3 seeds)",
                                               "fedavg+lips s=0.5 T=2 (mean of 3 seeds)"]
    for ax in heat:
        assert ax.images[0].get_array().shape == (layers, rounds)
    norms = [ax.images[0].norm for ax in heat]
    assert norms[0].vmin == norms[1].vmin and norms[0].vmax == norms[1].vmax
    assert type(norms[0]).__name__ == "LogNorm"
    # layers in model order, eligible ones starred and coloured
    order = one_run.drop_duplicates("layer_index").sort_values("layer_index")
    ticks = heat[0].get_yticklabels()
    assert [t.get_text().lstrip("* ").split(" (")[0] for t in ticks] == list(order["layer"])
    starred = [t.get_text().startswith("* ") for t in ticks]
    assert starred == list(order["eligible"]) and any(starred)
    # the mean over seeds is what is drawn
    lips = frames.layers[(frames.layers["method"] == "fedavg+lips s=0.5 T=2")
                         & (frames.layers["status"] == "finished")]
    expected = lips.pivot_table(index="layer_index", columns="round", values="rel_update",
                                aggfunc="mean").to_numpy()
    np.testing.assert_allclose(np.ma.filled(heat[1].images[0].get_array(), np.nan), expected)
    line_ax = next(ax for ax in fig.axes if ax.get_ylabel().startswith("mean rel"))
    assert line_ax.get_yscale() == "log" and len(line_ax.get_lines()) == 2
    eligible = lips[lips["eligible"]].groupby(["round", "run_id"])["rel_update"].mean()
    np.testing.assert_allclose(line_ax.get_lines()[1].get_ydata(),
                               eligible.groupby("round").mean().to_numpy())
