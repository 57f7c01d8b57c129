"""Loaders on a sweep-like folder of real runs, including the unfinished kinds a sweep leaves."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY

from analysis.loaders import error_reason, find_runs, load, load_runs
from ray_lips.core.run import run_local

SEEDS = (0, 1, 2)
METHODS = (("fedavg", 0.5, 2), ("lips", 0.5, 2), ("lips", 0.7, 2), ("lips", 0.5, 3))
TUNE_ERROR = """Failure # 1 (occurred at 2026-11-29_21-30-00)
ray::ImplicitFunc.train() (pid=1234, ip=127.0.0.1, actor_id=ab12, repr=trainable)
  File "/site-packages/ray/tune/trainable/function_trainable.py", line 261, in _trainable_func
    output = fn()
  File "/work/ray_lips/tune.py", line 50, in trainable
    run.run_round()
RuntimeError: CUDA out of memory on pool 1
"""
UNFINISHED = {  # run_id -> (status, a piece of the reason, or None for no reason)
    "trial_diverged": ("diverged", "DivergenceError"),
    "trial_killed/run": ("running", "RuntimeError: CUDA out of memory on pool 1"),
    "trial_running": ("running", None),
    "trial_failed": ("failed", "MemoryError: host memory exhausted"),
    "trial_orphan": ("failed", "RuntimeError: CUDA out of memory on pool 1"),
}
_BUILT: dict[str, Path] = {}


def small_config(seed: int, algorithm: str, sparsity: float, period: int, **train) -> dict:
    """The tiny digits config, shrunk further: 4 clients, 6 rounds, window 3 (~0.3 s a run)."""
    cfg = copy.deepcopy(TINY)
    cfg["seed"], cfg["algorithm"] = seed, algorithm
    cfg["lips"].update(sparsity=sparsity, period=period)
    cfg["data"].update(clients=4, train_per_client=20, test_per_client=10)
    cfg["train"].update(rounds=6, local_epochs=1, finetune_epochs=1, final_window=3,
                        checkpoint_every=3, eval_test_samples=100, **train)
    cfg["resources"].update(pools=1)
    return cfg


def _tune_files(trial: Path, cfg: dict) -> None:
    trial.mkdir(parents=True, exist_ok=True)
    (trial / "params.json").write_text(json.dumps({"seed": cfg["seed"],
                                                   "algorithm": cfg["algorithm"]}))
    (trial / "progress.csv").write_text("training_iteration\n1\n")


def _set_status(run: Path, **fields) -> None:
    status = json.loads((run / "status.json").read_text())
    status.pop("summary", None)
    status.update(fields)
    (run / "status.json").write_text(json.dumps(status))


def _truncate(run: Path, rounds: int) -> None:
    for name in ("rounds", "layers"):
        table = pd.read_parquet(run / f"{name}.parquet")
        table[table["round"] < rounds].to_parquet(run / f"{name}.parquet", index=False)
    (run / "clients.parquet").unlink()
    (run / "model_final.pt").unlink()


def build_sweep(root: Path) -> Path:
    """A Tune-like sweep of 12 real finished runs (4 methods x 3 seeds) plus five unfinished."""
    sweep = root / "sweep"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: threads only contend on a busy 2-core machine
    try:
        for seed in SEEDS:
            for algorithm, sparsity, period in METHODS:
                cfg = small_config(seed, algorithm, sparsity, period)
                trial = sweep / f"trial_{algorithm}_s{sparsity}_T{period}_seed{seed}"
                _tune_files(trial, cfg)
                run_local(cfg, trial)
        diverged = sweep / "trial_diverged"
        _tune_files(diverged, small_config(0, "fedavg", 0.5, 2))
        (diverged / "error.txt").write_text(TUNE_ERROR)  # status.json's own reason wins
        with pytest.raises(Exception, match="DivergenceError|non-finite"):
            run_local(small_config(0, "fedavg", 0.5, 2, lr=1e6), diverged)
    finally:
        torch.set_num_threads(threads)
    source = sweep / "trial_lips_s0.5_T2_seed0"
    killed = sweep / "trial_killed"  # Tune's files in the trial, the run one level down
    _tune_files(killed, small_config(0, "lips", 0.5, 2))
    (killed / "error.txt").write_text(TUNE_ERROR)
    shutil.copytree(source, killed / "run", ignore=shutil.ignore_patterns("*.json", "*.csv"))
    shutil.copy(source / "status.json", killed / "run" / "status.json")
    _set_status(killed / "run", status="running", round=3)
    _truncate(killed / "run", 3)
    running = sweep / "trial_running"
    shutil.copytree(source, running)
    _set_status(running, status="running", round=4)
    _truncate(running, 4)
    failed = sweep / "trial_failed"
    failed.mkdir()
    shutil.copy(source / "config.yaml", failed / "config.yaml")
    (failed / "status.json").write_text(json.dumps(
        {"status": "failed", "error": "MemoryError: host memory exhausted", "round": 0}))
    orphan = sweep / "trial_orphan"
    _tune_files(orphan, small_config(1, "lips", 0.5, 2))
    (orphan / "error.txt").write_text(TUNE_ERROR)
    return sweep


def shared_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the sweep once per test session, whichever test module asks first."""
    if "sweep" not in _BUILT:
        _BUILT["sweep"] = build_sweep(tmp_path_factory.mktemp("analysis"))
    return _BUILT["sweep"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return shared_sweep(tmp_path_factory)


@pytest.fixture(scope="module")
def frames(sweep):
    return load(sweep)


def test_finds_every_run_once_and_never_a_checkpoint_folder(sweep):
    found = find_runs(sweep)
    assert len(found) == len(SEEDS) * len(METHODS) + len(UNFINISHED)
    assert len(set(found)) == len(found)
    assert not any("checkpoint" in part for path in found for part in path.parts)
    assert find_runs([sweep, sweep / "trial_running"]) == found  # overlapping roots: once each


def test_runs_frame_has_one_row_per_run_with_config_and_metric_columns(frames):
    runs = frames.runs
    assert len(runs) == len(SEEDS) * len(METHODS) + len(UNFINISHED)
    assert runs["run_id"].is_unique
    assert set(runs["run_id"]) >= set(UNFINISHED)  # paths relative to the sweep folder
    for col in ("path", "lips.sparsity", "lips.period", "data.dataset", "model",
                "train.final_window", "seed", "algorithm", "status", "error", "rounds_done",
                "acc_global_last", "acc_global_window", "acc_after_window", "acc_before_window",
                "acc_global_best", "acc_global_best_round", "acc_finetune_mean",
                "acc_finetune_bnrecal_mean", "elapsed_s", "seconds_per_round", "setting",
                "method", "sparsity", "period"):
        assert col in runs, col
    done = runs[runs["status"] == "finished"]
    assert len(done) == len(SEEDS) * len(METHODS)
    # legacy folders: ``algorithm: lips`` is FedAvg with the LIPS hand-out, no handout key dense
    assert set(done["method"]) == {"fedavg", "fedavg+lips s=0.5 T=2", "fedavg+lips s=0.7 T=2",
                                   "fedavg+lips s=0.5 T=3"}
    assert set(done["algorithm"]) == {"fedavg"} and set(done["base_method"]) == {"fedavg"}
    dense = done[done["handout"] == "dense"]
    assert len(dense) == len(SEEDS) and set(dense["method"]) == {"fedavg"}
    assert dense[["sparsity", "period"]].isna().all().all()
    lips = done[done["handout"] == "lips"]
    assert (lips["sparsity"] == lips["lips.sparsity"]).all()
    assert (lips["period"] == lips["lips.period"]).all()
    # the diverged run used another learning rate, so the labels name it
    assert set(done["setting"]) == {"digits/smallcnn lr=0.05"}
    assert runs.set_index("run_id").loc["trial_diverged", "setting"] == "digits/smallcnn lr=1e+06"


def test_metrics_agree_with_the_engine_summary_and_the_rounds_frame(frames):
    done = frames.runs[frames.runs["status"] == "finished"]
    for _, run in done.iterrows():
        summary = json.loads((Path(run["path"]) / "status.json").read_text())["summary"]
        for key in ("acc_global_window", "acc_after_window", "acc_before_window",
                    "acc_global_last", "acc_finetune_mean", "acc_finetune_bnrecal_mean"):
            assert run[key] == pytest.approx(summary[key], nan_ok=True), key
        rounds = frames.rounds[frames.rounds["run_id"] == run["run_id"]].sort_values("round")
        evaluated = rounds[rounds["evaluated"]]["acc_global"].to_numpy()
        assert run["acc_global_window"] == pytest.approx(evaluated[-3:].mean())
        assert run["acc_global_best"] == pytest.approx(evaluated.max())
        best_round = rounds[rounds["evaluated"]]["round"].to_numpy()[evaluated.argmax()]
        assert run["acc_global_best_round"] == best_round
        assert run["rounds_done"] == len(rounds) == 6
        assert run["seconds_per_round"] == pytest.approx(run["elapsed_s"] / 6)


@pytest.mark.parametrize("run_id", sorted(UNFINISHED))
def test_unfinished_runs_load_with_status_and_reason(frames, run_id):
    status, reason = UNFINISHED[run_id]
    run = frames.runs.set_index("run_id").loc[run_id]
    assert run["status"] == status
    if reason is None:
        assert not isinstance(run["error"], str) or not run["error"]
    else:
        assert reason in run["error"]


def test_partial_runs_contribute_their_rows_and_no_more(frames):
    runs = frames.runs.set_index("run_id")
    assert runs.loc["trial_running", "rounds_done"] == 4
    assert runs.loc["trial_killed/run", "rounds_done"] == 3
    assert math.isnan(runs.loc["trial_running", "acc_finetune_mean"])
    assert not runs.loc["trial_failed", "has_rounds"]
    per_run = frames.rounds.groupby("run_id").size()
    assert per_run["trial_running"] == 4 and "trial_failed" not in per_run
    assert "trial_orphan" not in set(frames.layers["run_id"])


def test_child_frames_carry_keys_and_line_up_with_the_files(frames):
    for name in ("rounds", "layers", "clients"):
        table = getattr(frames, name)
        for col in ("run_id", "setting", "method", "base_method", "algorithm", "handout",
                    "sparsity", "period", "seed", "data.dataset", "model", "status"):
            assert col in table, (name, col)
    finished = frames.runs[frames.runs["status"] == "finished"]
    some = finished.iloc[0]
    on_disk = pd.read_parquet(Path(some["path"]) / "layers.parquet")
    mine = frames.layers[frames.layers["run_id"] == some["run_id"]]
    assert len(mine) == len(on_disk)
    np.testing.assert_allclose(mine.sort_values(["round", "layer_index"])["rel_update"],
                               on_disk.sort_values(["round", "layer_index"])["rel_update"])
    assert len(frames.clients[frames.clients["run_id"] == some["run_id"]]) == 4
    # the pandas work the frames are for: a groupby on the carried keys, no merge needed
    means = frames.rounds.groupby(["method", "round"])["acc_global"].mean()
    assert len(means) == 4 * 6


def test_a_single_run_dir_and_several_roots(sweep):
    run = sweep / "trial_fedavg_s0.5_T2_seed0"
    alone = load_runs(run)
    assert list(alone["run_id"]) == [run.name] and alone["status"].iloc[0] == "finished"
    both = load_runs([run, sweep / "trial_running"])
    assert set(both["run_id"]) == {run.name, "trial_running"}
    with pytest.raises(FileNotFoundError):
        load_runs(sweep / "missing")


def test_error_reason_takes_the_exception_line_of_the_latest_failure():
    assert error_reason(TUNE_ERROR) == "RuntimeError: CUDA out of memory on pool 1"
    twice = TUNE_ERROR + TUNE_ERROR.replace("# 1", "# 2").replace(
        "RuntimeError: CUDA out of memory on pool 1",
        "ray.exceptions.RayTaskError(ValueError): bad value: 3")
    assert error_reason(twice) == "ray.exceptions.RayTaskError(ValueError): bad value: 3"
    assert error_reason("The actor died unexpectedly.\n\tclass_name: X") == (
        "The actor died unexpectedly.")
    assert error_reason("") is None
