"""A run folder is data: its checkpoints load as tensors and plain values, never as code."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest
import torch

from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.core.run_folder import CheckpointError, RunWriter


class _Payload:
    """Unpickling this runs ``open(path, "w")``: what a crafted checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_real_checkpoints_of_every_kind_load(tmp_path, tiny_config):
    for algorithm, handout in (("fedavg", "lips"), ("scaffold", "lips"), ("ditto", "dense")):
        tree = {**tiny_config, "algorithm": algorithm, "handout": handout}
        tree["train"] = {**tiny_config["train"], "rounds": 2, "checkpoint_every": 1}
        run_local(validate_config(tree), tmp_path / algorithm)
        checkpoint = RunWriter(tmp_path / algorithm).load_checkpoint()
        assert checkpoint["next_round"] == 2 and checkpoint["global_state"]


def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path, tiny_config):
    tiny_config["train"].update(rounds=4, checkpoint_every=2)
    cfg = validate_config(tiny_config)
    run = FederatedRun(cfg, tmp_path / "run")
    run.run_round()
    run.close()
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "run" / "checkpoints" / "round_00003.pt"
    torch.save({"next_round": 4, "evil": _Payload(str(marker))}, crafted, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused to load"):
        FederatedRun(cfg, tmp_path / "run")
    assert not marker.exists()


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_config):
    tiny_config["train"].update(rounds=4, checkpoint_every=1, local_epochs=1)
    cfg = validate_config(tiny_config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_local(cfg, tmp_path / "straight")
        run = FederatedRun(cfg, tmp_path / "cut")
        for _ in range(3):
            run.run_round()
        run.close()
        newest = tmp_path / "cut" / "checkpoints" / "round_00002.pt"
        newest.write_bytes(newest.read_bytes()[:1000])  # a disk that filled up mid-write
        with pytest.warns(UserWarning, match="round_00002.pt .*resuming from round_00001.pt"):
            resumed = FederatedRun(cfg, tmp_path / "cut")
        assert resumed.round == 2
        resumed.close()
        with pytest.warns(UserWarning, match="damaged checkpoint"):
            run_local(cfg, tmp_path / "cut")  # the damaged file is replaced as it goes
    finally:
        torch.set_num_threads(threads)
    for name in ("rounds.parquet", "layers.parquet", "clients.parquet"):
        a = pd.read_parquet(tmp_path / "straight" / name).drop(columns="seconds", errors="ignore")
        b = pd.read_parquet(tmp_path / "cut" / name).drop(columns="seconds", errors="ignore")
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_an_empty_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_config):
    """A full disk can leave the newest file with no bytes at all (torch's error then has no
    message): it is skipped like a half-written one."""
    tiny_config["train"].update(rounds=4, checkpoint_every=1, local_epochs=1)
    cfg = validate_config(tiny_config)
    run = FederatedRun(cfg, tmp_path / "run")
    for _ in range(3):
        run.run_round()
    run.close()
    (tmp_path / "run" / "checkpoints" / "round_00002.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"round_00002.pt \(EOFError\); resuming from "
                                         r"round_00001.pt"):
        resumed = FederatedRun(cfg, tmp_path / "run")
    assert resumed.round == 2
    resumed.close()
