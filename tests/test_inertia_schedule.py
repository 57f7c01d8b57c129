"""``lips.schedule: inertia`` (sparse hand-outs when the measured inertia says the model has
stalled), its known answers, and the ``cosine``/``step`` schedules' config keys."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from same_runs import assert_same_tables, with_pools

from analysis import figures
from ray_lips.algorithms.handouts.schedule import linear_density
from ray_lips.config import ConfigError, validate_config
from ray_lips.core.inertia import InertiaTrigger, eligible_update
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.core.run_folder import LAYERS_FILE, ROUNDS_FILE


def _inertia(tiny: dict, **lips) -> dict:
    tiny["lips"].update(schedule="inertia", **lips)
    return tiny


# ----- the trigger on its own ------------------------------------------------------------
def _rows(updates: dict[int, list[tuple[bool, float]]]) -> list[dict]:
    return [{"round": r, "eligible": eligible, "rel_update": value}
            for r, layers in updates.items() for eligible, value in layers]


def test_the_signal_averages_the_eligible_layers_relative_update():
    rows = _rows({0: [(False, 9.0), (True, 0.2), (True, 0.4)], 1: [(True, 0.1), (False, 5.0)]})
    assert eligible_update(rows) == pytest.approx({0: 0.3, 1: 0.1})


def test_the_ratio_compares_the_windowed_signal_with_its_value_at_the_reference_round():
    trigger = InertiaTrigger(window=2, trigger=0.5, min_gap=3, ref_round=1)
    updates = {0: 4.0, 1: 2.0, 2: 1.0, 3: 0.5, 4: 0.5}
    assert math.isnan(trigger.ratio(updates, 0))  # before the reference round
    assert trigger.ratio(updates, 1) == 1.0
    assert trigger.ratio(updates, 3) == pytest.approx((1.0 + 0.5) / 2 / ((4.0 + 2.0) / 2))
    assert math.isnan(InertiaTrigger(2, 0.5, 3, 1).ratio({0: 0.0, 1: 0.0, 2: 1.0}, 2))


def test_the_trigger_fires_below_its_threshold_and_rests_min_gap_rounds():
    trigger = InertiaTrigger(window=3, trigger=0.5, min_gap=3, ref_round=2)
    assert trigger.fires(0.4, 10, None)
    assert not trigger.fires(0.5, 10, None)  # strictly below
    assert not trigger.fires(math.nan, 10, None)
    assert not trigger.fires(0.1, 10, 8)  # two rounds after the last sparse hand-out
    assert trigger.fires(0.1, 11, 8)


def test_new_lips_keys_are_validated(tiny_config):
    for key, value in (("window", 0), ("trigger", -0.1), ("min_gap", 0), ("step_round", 0),
                       ("schedule", "exponential")):
        bad = {**tiny_config, "lips": {**tiny_config["lips"], key: value}}
        with pytest.raises(ValueError, match=key):
            validate_config(bad)
    cfg = validate_config(_inertia(tiny_config))
    assert (cfg.lips.window, cfg.lips.trigger, cfg.lips.min_gap) == (3, 0.5, None)
    assert cfg.lips.gap == cfg.lips.period  # min_gap null: the period


def test_a_step_round_outside_the_run_stops_it_before_training(tiny_config, tmp_path):
    tiny_config["lips"].update(schedule="step", step_round=tiny_config["train"]["rounds"])
    with pytest.raises(ConfigError, match="lips.step_round: 6 is not before train.rounds"):
        run_local(tiny_config, tmp_path / "run")


# ----- known answers ---------------------------------------------------------------------
def test_a_trigger_that_never_fires_is_fedavg_bit_for_bit(tiny_config, tmp_path):
    dense = {**tiny_config, "handout": "dense", "algorithm": "fedavg"}
    run_local(dense, tmp_path / "fedavg")
    run_local(_inertia(tiny_config, trigger=0.0), tmp_path / "never")
    rounds = pd.read_parquet(tmp_path / "never" / ROUNDS_FILE)
    assert (rounds["density"] == 1.0).all() and rounds["inertia_ratio"].notna().any()
    assert "inertia_ratio" not in pd.read_parquet(tmp_path / "fedavg" / ROUNDS_FILE)
    assert_same_tables(tmp_path / "fedavg", tmp_path / "never", drop=("inertia_ratio",))


def test_a_trigger_that_always_fires_is_the_periodic_schedule_bit_for_bit(tiny_config,
                                                                           tmp_path):
    tiny_config["train"].update(rounds=7, inertia_ref_round=0)
    tiny_config["lips"].update(period=3)
    run_local(tiny_config, tmp_path / "linear")
    run_local(_inertia(tiny_config, trigger=1e9, min_gap=3), tmp_path / "always")
    rounds = pd.read_parquet(tmp_path / "always" / ROUNDS_FILE)
    assert rounds.loc[rounds["density"] < 1.0, "round"].tolist() == [0, 3, 6]
    assert "inertia_ratio" not in pd.read_parquet(tmp_path / "linear" / ROUNDS_FILE)
    assert_same_tables(tmp_path / "linear", tmp_path / "always", drop=("inertia_ratio",))


@pytest.fixture(scope="module")
def firing(tmp_path_factory):
    """An inertia run whose trigger fires now and then (before and after its first
    checkpoint), with one pool: its config and folder."""
    from conftest import TINY

    tiny = _inertia({**TINY, "lips": dict(TINY["lips"]),
                     "train": {**TINY["train"], "rounds": 9, "checkpoint_every": 3,
                               "inertia_ref_round": 0},
                     "resources": {**TINY["resources"], "pools": 1}},
                    trigger=1.52, window=1, min_gap=2)
    run_dir = tmp_path_factory.mktemp("inertia") / "one_pool"
    run_local(tiny, run_dir)
    return tiny, run_dir


def test_the_trigger_hands_out_sparse_copies_where_the_signal_fell(firing):
    cfg, run_dir = firing
    rounds = pd.read_parquet(run_dir / ROUNDS_FILE)
    layers = pd.read_parquet(run_dir / LAYERS_FILE)
    lips = cfg["lips"]
    trigger = InertiaTrigger(lips["window"], lips["trigger"], lips["min_gap"], 0)
    updates = eligible_update(layers.to_dict("records"))
    sparse = rounds.loc[rounds["density"] < 1.0, "round"].tolist()
    assert sparse and sparse != list(range(0, 9, 2))  # fired, and not on the clock
    assert all(b - a >= 2 for a, b in zip(sparse, sparse[1:], strict=False))
    last = None
    for row in rounds.itertuples():
        assert row.inertia_ratio == trigger.ratio(updates, row.round)  # the recorded value
        fired = trigger.fires(row.inertia_ratio, row.round, last)
        assert (row.density < 1.0) == fired, row.round
        if fired:
            assert row.density == linear_density(row.round, 9, lips["sparsity"])
            last = row.round


def test_an_inertia_run_has_the_same_tables_with_one_pool_or_three(firing, tmp_path):
    cfg, run_dir = firing
    three = with_pools(cfg, 3)
    run_local(three, tmp_path / "three")
    assert_same_tables(run_dir, tmp_path / "three")


def test_an_interrupted_inertia_run_resumes_to_the_same_tables(firing, tmp_path):
    tiny, straight = firing
    cfg = validate_config(with_pools(tiny, 2))
    sparse = pd.read_parquet(straight / ROUNDS_FILE).query("density < 1")["round"].tolist()
    assert any(r < 6 for r in sparse) and any(r >= 6 for r in sparse)
    run = FederatedRun(cfg, tmp_path / "stopped")
    for _ in range(7):  # checkpoints after rounds 2 and 5; round 6 is lost
        run.run_round()
    run.close()
    del run
    resumed = FederatedRun(cfg, tmp_path / "stopped")
    assert resumed.round == 6
    assert resumed.last_sparse == max(r for r in sparse if r < 6)
    while not resumed.done:
        resumed.run_round()
    resumed.finish()
    resumed.close()
    assert_same_tables(straight, tmp_path / "stopped")


def test_the_inertia_figure_marks_the_sparse_rounds(firing, tmp_path):
    _, run_dir = firing
    sparse = pd.read_parquet(run_dir / ROUNDS_FILE).query("density < 1")["round"].tolist()
    frames_layers = pd.read_parquet(run_dir / LAYERS_FILE)
    fig = figures.inertia_panels_figure([("lips", frames_layers)], sparse={"lips": sparse})
    marks = [line for ax in fig.axes for line in ax.get_lines()
             if figures.SPARSE_LABEL in str(line.get_label())]
    assert len(marks) == 2  # above the heat map and on the line below
    assert all(list(line.get_xdata()) == sparse for line in marks)
    out = figures.inertia_figure([run_dir], tmp_path / "inertia.png")
    assert out.stat().st_size > 0
