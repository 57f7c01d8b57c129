"""A run folder is data: its checkpoints load as tensors and plain values, never as code."""

from __future__ import annotations

import pickle

import pytest
import torch

from ray_lips.config import validate_config
from ray_lips.engine.experiment import FederatedRun, run_local
from ray_lips.results import CheckpointError, RunWriter


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
