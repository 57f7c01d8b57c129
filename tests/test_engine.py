"""The training path in one process, without Ray: determinism, resume, results on disk."""

import copy

import pandas as pd
import pytest

from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.core.run_folder import RunWriter

TABLE_COLUMNS = {
    "rounds.parquet": {"round", "density", "acc_before", "acc_after", "acc_global",
                       "train_loss", "seconds"},
    "layers.parquet": {"round", "layer", "rel_update", "cos_to_ref", "l2_to_ref"},
    "clients.parquet": {"client", "acc_final", "acc_finetune", "acc_finetune_bnrecal"},
}


def _tables(run_dir):
    return {name: pd.read_parquet(run_dir / name) for name in TABLE_COLUMNS}


def _without_timing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in ("seconds",) if c in frame])


def test_a_run_writes_its_files_with_the_documented_columns(tmp_path, tiny_config):
    summary = run_local(validate_config(tiny_config), tmp_path)
    tables = _tables(tmp_path)
    for name, columns in TABLE_COLUMNS.items():
        assert columns <= set(tables[name].columns), name
    rounds = tables["rounds.parquet"]
    assert rounds["round"].tolist() == list(range(6))
    assert rounds["density"].tolist() == pytest.approx([0.5, 1, 0.5 + 0.5 * 2 / 6, 1,
                                                        0.5 + 0.5 * 4 / 6, 1])
    assert len(tables["clients.parquet"]) == 6
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "model_final.pt").exists()
    assert RunWriter(tmp_path).read_status()["status"] == "finished"
    window = rounds["acc_global"].tail(3).mean()
    assert summary["acc_global_window"] == pytest.approx(window)
    layers = tables["layers.parquet"]
    assert layers.loc[layers["round"] < 2, "cos_to_ref"].isna().all()
    assert layers.loc[layers["round"] == 2, "cos_to_ref"].to_numpy() == pytest.approx(1.0)


def test_sparse_handout_lowers_accuracy_after_aggregation_only_in_sparse_rounds(
        tmp_path, tiny_config):
    run_local(validate_config(tiny_config), tmp_path)
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    dense = rounds[rounds["density"] == 1.0]
    assert (dense["acc_after"] == dense["acc_global"]).all()
    sparse = rounds[rounds["density"] < 1.0]
    assert (sparse["acc_after"] != sparse["acc_global"]).any()


def test_same_numbers_with_one_or_three_pools(tmp_path, tiny_config):
    frames = []
    for pools in (1, 3):
        cfg = copy.deepcopy(tiny_config)
        cfg["resources"]["pools"] = pools
        run_local(validate_config(cfg), tmp_path / f"p{pools}")
        frames.append({k: _without_timing(v) for k, v in _tables(tmp_path / f"p{pools}").items()})
    for name in TABLE_COLUMNS:
        pd.testing.assert_frame_equal(frames[0][name], frames[1][name], check_exact=True)


def test_resume_after_a_stop_ends_with_the_same_numbers(tmp_path, tiny_config):
    tiny_config["train"]["rounds"] = 8
    tiny_config["train"]["checkpoint_every"] = 3  # checkpoints after rounds 2 (sparse) and 5
    cfg = validate_config(tiny_config)
    run_local(cfg, tmp_path / "straight")

    run = FederatedRun(cfg, tmp_path / "stopped")
    for _ in range(5):  # the process dies after round 4; the last checkpoint is after round 2
        run.run_round()
    run.close()
    del run
    resumed = FederatedRun(cfg, tmp_path / "stopped")
    assert resumed.round == 3
    while not resumed.done:
        resumed.run_round()
    resumed.finish()

    straight, stopped = _tables(tmp_path / "straight"), _tables(tmp_path / "stopped")
    for name in TABLE_COLUMNS:
        pd.testing.assert_frame_equal(_without_timing(straight[name]),
                                      _without_timing(stopped[name]), check_exact=True)


def test_partial_participation_samples_the_configured_share(tmp_path, tiny_config):
    tiny_config["train"]["participation"] = 0.5
    run_local(validate_config(tiny_config), tmp_path)
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    assert (rounds["participants"] == 3).all()
    assert rounds["acc_after"].notna().all()
