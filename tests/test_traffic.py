"""Communication accounting: the bytes each client downloads (the model it is handed, a LIPS
sparse copy as kept values plus a bitmap) and uploads (the parts it returns), per round."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from analysis.traffic import accuracy_traffic_figure, traffic_rounds, traffic_table
from ray_lips.algorithms.handouts.sparsify import keep_count, sparsify_state
from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun, sample_participants
from ray_lips.core.traffic import (
    parts_bytes,
    round_traffic,
    sparse_copy_bytes,
    sparse_tensor_bytes,
    state_bytes,
)
from ray_lips.models import build_model, eligible_parameter_names
from ray_lips.pools.messages import HandoutRequest, TrainRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----- the pure functions -----------------------------------------------------------------------
def test_dense_state_counts_numel_times_element_size_of_every_entry():
    state = {"w": torch.zeros(3, 5), "h": torch.zeros(7, dtype=torch.float16),
             "n": torch.tensor(4, dtype=torch.int64)}
    assert state_bytes(state) == 15 * 4 + 7 * 2 + 8
    assert state_bytes(state, skip={"h"}) == 15 * 4 + 8
    model = build_model("resnet8", (3, 32, 32), 10)
    assert state_bytes(model.state_dict()) == sum(
        t.numel() * t.element_size() for t in model.state_dict().values())


def test_sparse_float32_tensor_counts_kept_values_plus_a_bitmap_when_smaller():
    numel, density = 1000, 0.3
    kept = keep_count(numel, density)
    assert kept == math.floor(density * numel)
    assert sparse_tensor_bytes(numel, 4, kept) == kept * 4 + math.ceil(numel / 8) == 1325
    assert sparse_tensor_bytes(9, 4, 4) == 4 * 4 + 2  # bitmap rounded up
    # where values plus bitmap are not smaller, the tensor goes dense
    assert sparse_tensor_bytes(64, 2, 63) == 64 * 2
    assert sparse_tensor_bytes(8, 4, 8) == 32


def test_sparse_copy_of_a_model_counts_exactly_what_the_lips_mask_keeps():
    torch.manual_seed(0)
    model = build_model("resnet8", (3, 32, 32), 10)
    state = model.state_dict()
    eligible = eligible_parameter_names(model)
    density = 0.4
    grads = {n: torch.randn_like(state[n]) for n in eligible}
    copy_ = sparsify_state(state, eligible, density, "sensitivity", grads)
    kept = {n: int((copy_[n] != 0).sum()) for n in eligible}
    assert kept == {n: keep_count(state[n].numel(), density) for n in eligible}
    expected = sum(min(t.numel() * 4, kept[n] * 4 + math.ceil(t.numel() / 8)) if n in kept
                   else t.numel() * t.element_size() for n, t in state.items())
    assert sparse_copy_bytes(state, kept) == expected < state_bytes(state)


def test_upload_counts_every_tensor_of_every_part():
    parts = {"model": ({"a": torch.zeros(10), "b": torch.zeros(2, 2, dtype=torch.float64)}, 3.0),
             "control": ({"a": torch.zeros(10)}, 1.0)}
    assert parts_bytes(parts) == 40 + 32 + 40
    assert parts_bytes({}) == 0


def test_round_totals_do_not_depend_on_how_rows_are_split_between_pools():
    train = [{"client": c, "up_bytes": 100 + c} for c in range(6)]
    handed = [{"client": c, "down_bytes": 50 + c, "down_bytes_dense": 90} for c in range(6)]
    whole = round_traffic(train, handed)
    split = round_traffic(train[3:] + train[:3], handed[4:] + handed[:4])
    assert whole == split == {"down_bytes": 315, "up_bytes": 615, "down_bytes_dense": 540,
                              "down_bytes_client": 52.5, "up_bytes_client": 102.5}
    empty = round_traffic([], [])
    assert empty["down_bytes"] == 0 and math.isnan(empty["down_bytes_client"])


# ----- what the pools report -------------------------------------------------------------------
def _config(tiny_config: dict, pools: int, handout: str = "lips",
            participation: float = 1.0) -> dict:
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm="fedavg", handout=handout)
    tree["train"].update(rounds=4, local_epochs=1, finetune_epochs=0, checkpoint_every=4,
                         participation=participation)
    tree["lips"].update(sparsity=0.5, period=2)
    tree["resources"]["pools"] = pools
    return tree


def _round_with_traffic(run: FederatedRun) -> tuple[dict[str, float], list[dict]]:
    """One round as the driver runs it, with the hand-out's receivers named: its traffic
    columns and the receivers' rows."""
    cfg, r = run.cfg, run.round
    participants = sample_participants(cfg, r)
    total = sum(run.samples[c] for c in participants)
    trained = run.pools.train_round(
        [TrainRequest(r, p, total, sum(run.samples.values()), False)
         for p in run._split(participants)], run.algorithm.server_message(run.server_state))
    new_state, run.server_state = run.algorithm.aggregate(
        run.global_state, run._averages([t.sums for t in trained]), run.server_state)
    receivers = (list(range(cfg.data.clients)) if cfg.train.participation >= 1.0
                 else participants)
    density = run.density(r)
    handed = run.pools.handout([HandoutRequest(r, density, [], False, receivers=c)
                                for c in run._split(receivers)], new_state)
    run.global_state = new_state
    run.round += 1
    rows = [t for h in handed for t in h.traffic]
    return round_traffic([row for t in trained for row in t.clients], rows), rows


def test_traffic_is_the_same_with_one_pool_and_three(tmp_path, tiny_config):
    columns = {}
    for pools in (1, 3):
        run = FederatedRun(validate_config(_config(tiny_config, pools)), tmp_path / f"p{pools}")
        try:
            columns[pools] = [_round_with_traffic(run)[0] for _ in range(3)]
        finally:
            run.close()
    assert columns[1] == columns[3]
    dense = columns[1][1]["down_bytes_dense"]
    # rounds 0 and 2 hand out sparse copies (period 2), round 1 the dense model
    assert columns[1][0]["down_bytes"] < dense and columns[1][2]["down_bytes"] < dense
    assert columns[1][1]["down_bytes"] == dense
    assert columns[1][0]["down_bytes"] < columns[1][2]["down_bytes"]  # density rises



@pytest.mark.parametrize("algorithm", ["fedper", "fedrep"])
def test_entries_a_client_keeps_are_neither_downloaded_nor_uploaded(
        algorithm, tmp_path, tiny_config):
    """FedPer's and FedRep's heads never travel: each client's download and upload in a dense
    round is the model less its local entries."""
    tree = _config(tiny_config, 2, handout="dense")
    tree["algorithm"] = algorithm
    run = FederatedRun(validate_config(tree), tmp_path / "r")
    try:
        local = run.pools.pools[0].algorithm.local
        body_bytes = state_bytes({k: v for k, v in run.global_state.items() if k not in local})
        totals, rows = _round_with_traffic(run)
    finally:
        run.close()
    assert local and body_bytes < state_bytes(run.global_state)
    assert all(r["down_bytes"] == r["down_bytes_dense"] == body_bytes for r in rows)
    assert totals["up_bytes"] == run.cfg.data.clients * body_bytes

def test_dense_rounds_hand_every_client_the_whole_model_and_uploads_are_its_parts(
        tmp_path, tiny_config):
    run = FederatedRun(validate_config(_config(tiny_config, 2, handout="dense")), tmp_path / "r")
    try:
        model_bytes = state_bytes(run.global_state)
        assert model_bytes == sum(t.numel() * t.element_size()
                                  for t in run.global_state.values())
        totals, rows = _round_with_traffic(run)
    finally:
        run.close()
    clients = run.cfg.data.clients
    assert sorted(r["client"] for r in rows) == list(range(clients))
    assert all(r["down_bytes"] == r["down_bytes_dense"] == model_bytes for r in rows)
    assert totals["down_bytes"] == totals["down_bytes_dense"] == clients * model_bytes
    assert totals["up_bytes"] == clients * model_bytes  # FedAvg returns the whole model


def test_clients_without_a_gradient_in_a_sparsity_round_count_the_dense_model(
        tmp_path, tiny_config):
    run = FederatedRun(validate_config(_config(tiny_config, 2, participation=0.5)),
                       tmp_path / "r")
    try:
        _totals, rows = _round_with_traffic(run)  # round 0: sparse for its participants
        trained = {r["client"] for r in rows}
        everyone = {c: row for pool in run.pools.pools
                    for row in pool.downloads(pool.clients()) for c in [row["client"]]}
    finally:
        run.close()
    dense = state_bytes(run.global_state)
    assert len(trained) == 3
    for client, row in everyone.items():
        assert row["down_bytes_dense"] == dense
        assert (row["down_bytes"] < dense) == (client in trained), client


# ----- the report's side ----------------------------------------------------------------------
def _rounds_frame() -> pd.DataFrame:
    rows = []
    for method, down in (("fedavg", 100), ("fedavg+lips s=0.5 T=2", 60)):
        for seed in (0, 1):
            for r in range(3):
                rows.append({"run_id": f"{method}-{seed}", "setting": "digits", "method": method,
                             "seed": seed, "status": "finished", "round": r, "evaluated": True,
                             "acc_global": 0.5 + 0.1 * r + 0.01 * seed, "down_bytes": down,
                             "up_bytes": 100, "down_bytes_dense": 100})
    return pd.DataFrame(rows)


def test_report_traffic_table_totals_and_cumulative_figure():
    rounds = _rounds_frame()
    cumulative = traffic_rounds(rounds)
    lips = cumulative[cumulative["run_id"] == "fedavg+lips s=0.5 T=2-0"]
    assert lips["cumulative_bytes"].tolist() == [160, 320, 480]
    table = traffic_table(rounds)
    data = table.data.set_index("method")
    assert data.loc["fedavg", "down_total"] == 300 and data.loc["fedavg", "seeds"] == 2
    assert data.loc["fedavg+lips s=0.5 T=2", "down_per_round"] == 60
    assert data.loc["fedavg+lips s=0.5 T=2", "down_saved"] == pytest.approx(0.4)
    assert data.loc["fedavg", "down_saved"] == 0
    assert list(table.data["method"]) == ["fedavg", "fedavg+lips s=0.5 T=2"]
    assert accuracy_traffic_figure(rounds) is not None
    old = rounds.drop(columns=["down_bytes", "up_bytes", "down_bytes_dense"])
    assert accuracy_traffic_figure(old) is None and traffic_table(old).data.empty


# ----- comparing revisions whose tables gained columns ----------------------------------------
def _check_same_numbers():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "check_same_numbers.py"
    spec = importlib.util.spec_from_file_location("check_same_numbers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_revisions_compare_on_common_columns_and_name_the_others(tmp_path):
    compare = _check_same_numbers().compare
    base = pd.DataFrame({"round": [0, 1], "acc_global": [0.5, 0.625], "seconds": [1.0, 2.0]})
    base.to_parquet(tmp_path / "old.parquet")
    base.assign(seconds=[3.0, 4.0], down_bytes=[10, 20]).to_parquet(tmp_path / "new.parquet")
    found = compare(tmp_path / "old.parquet", tmp_path / "new.parquet")
    assert found.same and found.added == ("down_bytes",) and found.removed == ()
    assert found.columns_note() == "+1 column (down_bytes)"
    base.assign(acc_global=[0.5, 0.6250001]).to_parquet(tmp_path / "moved.parquet")
    moved = compare(tmp_path / "old.parquet", tmp_path / "moved.parquet")
    assert not moved.same and moved.columns_note() == ""
    base.drop(columns="seconds").to_parquet(tmp_path / "a.parquet")
    base.drop(columns="seconds").to_parquet(tmp_path / "b.parquet")
    assert compare(tmp_path / "a.parquet", tmp_path / "b.parquet").same


def test_report_section_writes_the_table_and_the_figure(tmp_path):
    from analysis.traffic import traffic_section

    lines = traffic_section(_rounds_frame(), "acc_global", tmp_path / "figures",
                            tmp_path / "tables", lambda p: p.name)
    assert lines[0] == "## Communication"
    assert (tmp_path / "tables" / "traffic.tex").is_file()
    assert (tmp_path / "figures" / "acc_global_vs_traffic.png").is_file()
    assert "![acc_global versus cumulative traffic](acc_global_vs_traffic.png)" in lines
