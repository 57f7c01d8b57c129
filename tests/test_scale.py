"""Many clients, few participants: a round trains and keeps state for its participants only.

Memory and time per round are measured in benchmarks/bench_scale.py, not asserted here.
"""

from __future__ import annotations

import torch

from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun

CLIENTS, PARTICIPATION = 2000, 0.01


def scale_config(clients: int = CLIENTS, participation: float = PARTICIPATION) -> dict:
    return {
        "name": "scale", "seed": 0, "model": "smallcnn", "algorithm": "lips",
        "data": {"dataset": "synthetic", "partition": "dirichlet", "alpha": 0.1,
                 "clients": clients, "train_per_client": 20, "test_per_client": 10,
                 "synthetic": {"shape": [1, 12, 12], "classes": 10, "train_size": 5000,
                              "test_size": 1000}},
        "train": {"rounds": 4, "local_epochs": 1, "batch_size": 50, "participation": participation,
                  "eval_every": 1, "eval_test_samples": 200, "checkpoint_every": 2,
                  "finetune_epochs": 0},
        "lips": {"sparsity": 0.5, "period": 2},
        "resources": {"pools": 2, "cpus_per_pool": 1},
    }


def test_rounds_with_2000_clients_train_only_their_participants(tmp_path):
    """The shape of benchmarks/bench_scale.py (10,000 clients of 1x28x28), scaled down."""
    cfg = validate_config(scale_config())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a pool actor with one CPU; robust on a busy machine
    run = FederatedRun(cfg, tmp_path)
    try:
        pools = run.pools.pools
        assert sum(len(p.shards) for p in pools) == CLIENTS
        for round_idx in range(3):
            row = run.run_round()
            assert row["round"] == round_idx and row["participants"] == 20
            assert row["acc_after"] == row["acc_after"]  # evaluated (not NaN)
            # per-client state kept between rounds: only this round's participants' gradients
            assert sum(len(p.store.clients("lips.grad")) for p in pools) == 20
        assert run.round == 3 and len(run.rounds_rows) == 3
    finally:
        run.close()
        torch.set_num_threads(threads)
