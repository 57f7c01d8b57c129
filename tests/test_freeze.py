"""``handout: freeze``: stalled layers stop training for ``freeze.rounds`` rounds, on the inertia
signal LIPS uses (:mod:`ray_lips.core.freeze`); its known answers, composition and
reproducibility."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch
from same_runs import assert_same_tables, with_pools
from test_algorithm_gaps import _close, _in_float64

from ray_lips.algorithms.base import MODEL, Phase, TrainJob
from ray_lips.config import ConfigError, validate_config
from ray_lips.core.freeze import LayerFreezer
from ray_lips.core.inertia import InertiaTrigger
from ray_lips.core.run import FederatedRun, build_payloads, initial_model, run_local
from ray_lips.core.run_folder import LAYERS_FILE, ROUNDS_FILE
from ray_lips.pools.client_pool import ClientPool
from ray_lips.pools.messages import TrainRequest
from ray_lips.pools.payload import PackedShards

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FREEZE_COLUMNS = ("frozen_layers", "freeze_fired", "inertia_ratio", "frozen")


def _freeze(tiny: dict, when: str = "inertia", rounds: int = 2, **lips) -> dict:
    tree = copy.deepcopy(tiny)
    tree.update(algorithm="fedavg", handout="freeze", freeze={"when": when, "rounds": rounds})
    tree["lips"].update(lips)
    return tree


# ----- config ------------------------------------------------------------------------------
def test_freeze_keys_and_their_defaults(tiny_config):
    cfg = validate_config(_freeze(tiny_config))
    assert cfg.method == "fedavg+freeze"
    assert validate_config({**tiny_config, "algorithm": "fedavg"}).freeze.model_dump() == {
        "when": "inertia", "rounds": 5}
    for key, value in (("when", "sometimes"), ("rounds", 0)):
        bad = _freeze(tiny_config)
        bad["freeze"][key] = value
        with pytest.raises(ConfigError, match=f"freeze.{key}"):
            validate_config(bad)


@pytest.mark.parametrize("algorithm", ["ditto", "local", "fedper", "fedpart"])
def test_freeze_with_an_algorithm_without_a_global_body_is_a_config_error(tiny_config,
                                                                          algorithm):
    tree = {**_freeze(tiny_config), "algorithm": algorithm}
    with pytest.raises(ConfigError, match=rf"handout: 'freeze' cannot be combined with "
                                          rf"algorithm: '{algorithm}'.*sparse_handout"):
        validate_config(tree)


@pytest.mark.parametrize("algorithm", ["fedrep", "fedbabu", "scaffold", "feddyn"])
def test_freeze_composes_with_algorithms_that_hand_out_a_global_body(tiny_config, algorithm):
    assert validate_config({**_freeze(tiny_config), "algorithm": algorithm}).handout == "freeze"


# ----- the decision on its own -------------------------------------------------------------
def _rows(updates: dict[int, dict[str, float]], frozen: dict[int, set[str]] | None = None):
    return [{"round": r, "layer": name, "rel_update": value,
             "frozen": name in (frozen or {}).get(r, set())}
            for r, layers in updates.items() for name, value in layers.items()]


def test_a_layer_stalls_below_the_trigger_times_its_own_reference_signal():
    trigger = InertiaTrigger(window=2, trigger=0.5, min_gap=1, ref_round=1)
    freezer = LayerFreezer(["a", "b"], "period", rounds=3, period=2, trigger=trigger)
    freezer.observe(_rows({0: {"a": 4.0, "b": 4.0}, 1: {"a": 2.0, "b": 2.0},
                           2: {"a": 1.0, "b": 2.0}, 3: {"a": 0.5, "b": 2.0}}))
    # S_a(3) = 0.75 < 0.5 x S_a(1) = 1.5; S_b(3) = 2 is not
    assert freezer.stalled(3) == ("a",)
    assert freezer.stalled(0) == ()  # before the reference round nothing stalls
    decision = freezer.after_round(2)  # period 2: fires; S_a(2) = 1.5 is not below 1.5
    assert decision.fired and decision.ratio is None and decision.stalled == ()
    assert not freezer.after_round(3).fired  # 3 % 2 != 0
    freezer.observe(_rows({4: {"a": 0.5, "b": 2.0}}))
    assert freezer.after_round(4).stalled == ("a",)
    assert [freezer.frozen_in(r) for r in (4, 5, 7, 8)] == [(), ("a",), ("a",), ()]


def test_a_frozen_layer_is_not_refrozen_until_its_window_holds_rounds_it_trained():
    trigger = InertiaTrigger(window=2, trigger=0.5, min_gap=1, ref_round=0)
    freezer = LayerFreezer(["a"], "period", rounds=1, period=1, trigger=trigger)
    freezer.observe(_rows({0: {"a": 4.0}, 1: {"a": 1.0}, 2: {"a": 0.5}}))
    assert freezer.after_round(2).stalled == ("a",)  # frozen in round 3
    freezer.observe(_rows({3: {"a": 0.0}}, frozen={3: {"a"}}))
    assert freezer.after_round(3).stalled == ()  # still frozen when it fires: left be
    freezer.observe(_rows({4: {"a": 0.1}}))
    assert freezer.after_round(4).stalled == ()  # round 3 is in its window
    freezer.observe(_rows({5: {"a": 0.1}}))
    assert freezer.after_round(5).stalled == ("a",)


def test_the_inertia_trigger_reads_only_the_layers_that_trained():
    trigger = InertiaTrigger(window=1, trigger=0.5, min_gap=1, ref_round=0)
    freezer = LayerFreezer(["a", "b"], "inertia", rounds=5, period=9, trigger=trigger)
    freezer.observe(_rows({0: {"a": 1.0, "b": 1.0}, 1: {"a": 0.0, "b": 0.8}},
                          frozen={1: {"a"}}))
    decision = freezer.after_round(1)
    assert decision.ratio == 0.8 and not decision.fired  # a's frozen zero does not count
    freezer.observe(_rows({2: {"a": 0.0, "b": 0.4}}, frozen={2: {"a"}}))
    decision = freezer.after_round(2)
    assert decision.ratio == 0.4 and decision.fired and decision.stalled == ("b",)


def test_a_job_trains_the_phases_it_asks_for_without_the_frozen_parameters():
    names = ("conv.weight", "conv.bias", "head.weight")
    job = TrainJob(0, {}, frozen=frozenset({"conv.weight"}))
    assert job.plan(3, names) == (Phase(3, ("conv.bias", "head.weight")),)
    phased = TrainJob(0, {}, phases=(Phase(2, ("head.weight",)), Phase(1, None)),
                      frozen=frozenset({"conv.weight"}))
    assert phased.plan(9, names) == (Phase(2, ("head.weight",)),
                                     Phase(1, ("conv.bias", "head.weight")))
    assert TrainJob(0, {}).plan(3, names) == ()  # nothing frozen: the job's own phases
    with pytest.raises(ValueError, match="every parameter a phase"):
        TrainJob(0, {}, phases=(Phase(1, ("conv.weight",)),),
                 frozen=frozenset({"conv.weight"})).plan(1, names)


# ----- training ----------------------------------------------------------------------------
def test_frozen_parameters_do_not_move_in_serial_and_batched_groups(tiny_config):
    """With momentum and weight decay, one at a time and in groups of three (float64): a
    frozen parameter leaves training bit for bit as it came, is not uploaded, and the rest
    trains alike on both paths."""
    tree = _freeze(tiny_config)
    tree["train"].update(batch_size=16, batch_clients=3, weight_decay=0.01, momentum=0.9)
    tree["resources"]["pools"] = 1
    cfg = validate_config(tree)
    from ray_lips.data import load_dataset
    from ray_lips.models import layer_groups

    dataset = load_dataset(cfg.data)
    payload = build_payloads(cfg, dataset, [list(range(cfg.data.clients))])[0]
    payload = replace(payload, data=PackedShards.from_shards(payload.shards), dataset=None)
    model = initial_model(cfg, tuple(dataset.sample_shape), dataset.num_classes).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = next(g for g in layer_groups(model) if g.eligible).param_names
    clients = list(range(cfg.data.clients))
    total = sum(len(s.y_train) for s in payload.shards)
    states, sums = [], []
    for batched in (False, True):
        mode = cfg.to_dict()
        mode["train"]["batched"] = batched
        pool = _in_float64(ClientPool(validate_config(mode), payload))
        assert pool.group_size == (3 if batched else 1)
        pool.set_global(-1, state, 1.0)
        reply = pool.train_round(TrainRequest(0, clients, total, total, False, frozen), {})
        assert not set(frozen) & set(reply.sums[MODEL])
        sums.append(reply.sums[MODEL])
        done = [trained for group in pool.plan_groups(clients) for trained in
                pool.trainer.train([TrainJob(c, state, frozen=frozenset(frozen))
                                    for c in group], 0)]
        for trained in done:
            for name, _ in model.named_parameters():
                assert torch.equal(trained.state[name], state[name]) == (name in frozen), name
        states.append([t.state for t in done])
    for a, b in zip(*states, strict=True):
        _close(a, b, "serial and batched")
    assert sums[0].keys() == sums[1].keys()


# ----- whole runs --------------------------------------------------------------------------
def test_a_trigger_that_never_fires_is_fedavg_bit_for_bit(tiny_config, tmp_path):
    dense = {**copy.deepcopy(tiny_config), "handout": "dense", "algorithm": "fedavg"}
    run_local(dense, tmp_path / "fedavg")
    run_local(_freeze(tiny_config, trigger=0.0), tmp_path / "never")
    rounds = pd.read_parquet(tmp_path / "never" / ROUNDS_FILE)
    assert (rounds["frozen_layers"] == 0).all() and not rounds["freeze_fired"].any()
    assert rounds["inertia_ratio"].notna().any()
    assert not pd.read_parquet(tmp_path / "never" / LAYERS_FILE)["frozen"].any()
    assert "frozen_layers" not in pd.read_parquet(tmp_path / "fedavg" / ROUNDS_FILE)
    assert_same_tables(tmp_path / "fedavg", tmp_path / "never", drop=FREEZE_COLUMNS)


def test_the_period_trigger_fires_on_the_periods_rounds(tiny_config, tmp_path):
    tree = _freeze(tiny_config, when="period", period=3)
    tree["train"]["rounds"] = 7
    run_local(tree, tmp_path / "run")
    rounds = pd.read_parquet(tmp_path / "run" / ROUNDS_FILE)
    assert rounds.loc[rounds["freeze_fired"], "round"].tolist() == [0, 3, 6]
    assert "inertia_ratio" not in rounds  # the period trigger has no ratio


@pytest.fixture(scope="module")
def freezing(tmp_path_factory):
    """A ``when: inertia`` run (one pool, weight decay and momentum on) in which layers freeze
    twice, one freeze across its checkpoint after round 4: its config and folder."""
    from conftest import TINY

    tree = _freeze(TINY, rounds=2, trigger=0.97, window=1, min_gap=2)
    tree["train"].update(rounds=10, inertia_ref_round=1, checkpoint_every=5, weight_decay=0.01)
    tree["resources"]["pools"] = 1
    run_dir = tmp_path_factory.mktemp("freeze") / "one_pool"
    run_local(tree, run_dir)
    return tree, run_dir


def _expected_frozen(layers: pd.DataFrame, lips: dict, ref: int, rounds: int) -> dict[int, set]:
    """The layers frozen in each round, from the rows' ``rel_update`` alone (the module's
    rule, written out)."""
    eligible = layers[layers["eligible"]]
    rel = eligible.pivot(index="round", columns="layer", values="rel_update")
    window, trigger, gap = lips["window"], lips["trigger"], lips["min_gap"]
    through: dict[str, int] = {}
    frozen_at: dict[int, set] = {}
    last = None

    def rounds_of(r):
        return range(max(0, r - window + 1), r + 1)

    def u(r):
        trained = [rel.at[r, c] for c in rel.columns if c not in frozen_at[r]]
        return sum(trained) / len(trained) if trained else math.nan

    for r in rel.index:
        frozen_at[r] = {c for c, t in through.items() if t >= r}
        if r < ref:
            continue
        ratio = (sum(u(k) for k in rounds_of(r)) / window) / (sum(u(k) for k in rounds_of(ref))
                                                               / window)
        if not (ratio < trigger and (last is None or r - last >= gap)):
            continue
        last = r
        for c in rel.columns:
            if any(c in frozen_at[k] for k in rounds_of(r)):
                continue
            own = sum(rel.at[k, c] for k in rounds_of(r)) / window
            if own < trigger * sum(rel.at[k, c] for k in rounds_of(ref)) / window:
                through[c] = r + rounds
    return frozen_at


def test_the_frozen_layers_are_those_the_rule_picks_from_the_layer_rows(freezing):
    tree, run_dir = freezing
    layers = pd.read_parquet(run_dir / LAYERS_FILE)
    rounds = pd.read_parquet(run_dir / ROUNDS_FILE)
    expected = _expected_frozen(layers, tree["lips"], 1, tree["freeze"]["rounds"])
    recorded = {r: set(layers.loc[(layers["round"] == r) & layers["frozen"], "layer"])
                for r in rounds["round"]}
    assert recorded == expected
    assert sum(bool(s) for s in expected.values()) >= 4  # it froze, more than once
    assert rounds["frozen_layers"].tolist() == [len(expected[r]) for r in rounds["round"]]
    assert (layers.loc[layers["frozen"], "rel_update"] == 0.0).all()
    assert not layers.loc[layers["frozen"], "eligible"].eq(False).any()


def test_frozen_layers_keep_their_global_entries_bit_for_bit(freezing, tmp_path):
    tree, run_dir = freezing
    layers = pd.read_parquet(run_dir / LAYERS_FILE)
    frozen = layers[layers["frozen"]]
    layer = frozen["layer"].iloc[0]
    spell = sorted(frozen.loc[frozen["layer"] == layer, "round"])[:2]  # its first freeze
    run = FederatedRun(validate_config(tree), tmp_path / "run")
    before = None
    try:
        while run.round <= spell[-1]:
            if run.round == spell[0]:
                before = {k: v.clone() for k, v in run.global_state.items()}
            run.run_round()
    finally:
        run.close()
    for name, value in run.global_state.items():
        unchanged = torch.equal(value, before[name])
        if name.startswith(f"{layer}."):
            assert unchanged, name
        elif value.is_floating_point() and not name.endswith(("running_mean", "running_var")):
            assert not unchanged, name  # the other layers trained


def test_a_freeze_run_has_the_same_tables_with_one_pool_or_three(freezing, tmp_path):
    tree, run_dir = freezing
    run_local(with_pools(tree, 3), tmp_path / "three")
    assert_same_tables(run_dir, tmp_path / "three")


@pytest.mark.slow
def test_a_freeze_run_on_ray_pool_actors_has_the_in_process_tables(ray_local, freezing, tmp_path):
    """What is frozen travels to the pool actors with each round's request: two actors end
    with the one-pool in-process run's tables, freezes included."""
    from ray_lips.cluster.driver import run_on_ray

    tree, run_dir = freezing
    cfg = validate_config(with_pools(tree, 2))
    run_on_ray([("freeze", cfg, tmp_path / "ray")])
    assert pd.read_parquet(tmp_path / "ray" / ROUNDS_FILE)["frozen_layers"].gt(0).any()
    assert_same_tables(run_dir, tmp_path / "ray")


def test_an_interrupted_freeze_run_resumes_to_the_same_tables(freezing, tmp_path):
    tree, straight = freezing
    layers = pd.read_parquet(straight / LAYERS_FILE)
    assert layers.loc[(layers["round"] == 5), "frozen"].any()  # a freeze across round 4's
    cfg = validate_config(with_pools(tree, 2))
    run = FederatedRun(cfg, tmp_path / "stopped")
    for _ in range(7):  # a checkpoint after round 4; rounds 5 and 6 are lost
        run.run_round()
    run.close()
    del run
    resumed = FederatedRun(cfg, tmp_path / "stopped")
    assert resumed.round == 5 and resumed.freezer.frozen_in(5)
    while not resumed.done:
        resumed.run_round()
    resumed.finish()
    resumed.close()
    assert_same_tables(straight, tmp_path / "stopped")


def test_freeze_composes_with_an_algorithm_that_trains_in_phases(tiny_config, tmp_path):
    """FedRep's body phase trains without the frozen layers (its head phase is untouched)."""
    tree = _freeze(tiny_config, when="period", period=1, trigger=1e9)
    tree.update(algorithm="fedrep", fedrep={"head_epochs": 1})
    tree["train"].update(rounds=4, inertia_ref_round=0)
    run_local(tree, tmp_path / "run")
    layers = pd.read_parquet(tmp_path / "run" / LAYERS_FILE)
    frozen = layers[layers["frozen"]]
    # every eligible layer stalls after round 0 and is frozen in rounds 1 and 2; its 3-round
    # window holds frozen rounds until round 5, so it is not frozen again in this run
    assert sorted(set(frozen["round"])) == [1, 2]
    assert set(frozen["layer"]) == set(layers.loc[layers["eligible"], "layer"])
    assert (frozen["rel_update"] == 0.0).all()


# ----- records and the report --------------------------------------------------------------
def test_the_report_lists_a_freeze_run_as_its_own_method_against_dense_fedavg(tiny_config,
                                                                              tmp_path):
    from analysis import figures
    from analysis.loaders import load_runs
    from analysis.methods import label_methods
    from analysis.report import build_report

    tiny_config["train"].update(rounds=4, inertia_ref_round=0)
    for name, tree in (("dense", {**copy.deepcopy(tiny_config), "algorithm": "fedavg",
                                  "handout": "dense"}),
                       ("lips", copy.deepcopy(tiny_config)),
                       ("freeze", _freeze(tiny_config, when="period"))):
        run_local({**tree, "name": name}, tmp_path / "runs" / name)
    runs = load_runs(tmp_path / "runs").set_index("name")
    assert runs.loc["freeze", "method"] == "fedavg+freeze"
    assert runs.loc["freeze", "base_method"] == "fedavg"
    assert runs.loc["lips", "method"] == "fedavg+lips s=0.5 T=2"
    assert runs["setting"].nunique() == 1  # the freeze section is the method's, not a setting
    other = {**runs.loc["freeze"].to_dict(), "lips.trigger": 0.3}  # a knob its trigger reads
    assert label_methods([runs.loc["freeze"].to_dict(), other])[1].label == (
        "fedavg+freeze trigger=0.3")
    text = build_report(tmp_path / "runs", tmp_path / "report").read_text()
    assert "fedavg+freeze" in text
    fired = pd.read_parquet(tmp_path / "runs" / "freeze" / ROUNDS_FILE)
    fired = fired.loc[fired["freeze_fired"], "round"].tolist()
    assert fired == [0, 2]
    fig_path = figures.inertia_figure([tmp_path / "runs" / "freeze"], tmp_path / "inertia.png")
    assert fig_path.stat().st_size > 0
    layers = pd.read_parquet(tmp_path / "runs" / "freeze" / LAYERS_FILE)
    fig = figures.inertia_panels_figure([("freeze", layers)], sparse={"freeze": fired},
                                        mark_labels={"freeze": figures.FREEZE_LABEL})
    marks = [line for ax in fig.axes for line in ax.get_lines()
             if figures.FREEZE_LABEL in str(line.get_label())]
    assert len(marks) == 2 and all(list(line.get_xdata()) == fired for line in marks)


def test_the_freeze_sweep_compares_four_methods_on_the_demos_settings():
    from pathlib import Path

    from ray_lips.cluster.sweep_spec import load_spec
    from ray_lips.config import load_config

    sweeps = Path(__file__).resolve().parents[1] / "sweeps"
    spec = load_spec(sweeps / "freeze_vs_lips_mnist1d.yaml")
    configs = list(spec.trial_configs())
    assert spec.total_trials == len(configs) == 12
    assert {c.seed for c in configs} == {0, 1, 2}
    methods = {(c.handout, c.lips.schedule if c.handout == "lips" else None) for c in configs}
    assert methods == {("dense", None), ("lips", "linear"), ("lips", "inertia"),
                       ("freeze", None)}
    demo = load_config(sweeps / "demo.yaml")
    for cfg in configs:
        assert cfg.algorithm == "fedavg" and cfg.freeze.when == "inertia"
        assert (cfg.data, cfg.model) == (demo.data, demo.model)
        assert cfg.lips.sparsity == demo.lips.sparsity and cfg.lips.period == demo.lips.period
        for key in ("rounds", "local_epochs", "batch_size", "lr", "momentum", "finetune_epochs"):
            assert getattr(cfg.train, key) == getattr(demo.train, key), key
