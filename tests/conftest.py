"""Shared fixtures: tiny configs and one local Ray instance for the whole session."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "clients": 6,
             "train_per_client": 40, "test_per_client": 20},
    "model": "smallcnn",
    "train": {"rounds": 6, "local_epochs": 2, "batch_size": 20, "lr": 0.05, "eval_every": 1,
              "finetune_epochs": 1, "checkpoint_every": 3, "final_window": 3},
    "algorithm": "lips",
    "lips": {"sparsity": 0.5, "period": 2, "schedule": "linear", "scorer": "sensitivity"},
    "resources": {"pools": 2, "cpus_per_pool": 1, "gpus_per_pool": 0},
}


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, restored after: numbers compared exactly must come
    from the same kernels in the same order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config() -> dict:
    """A config that trains in a second or two on sklearn digits."""
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for every test that needs it (never joins another cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
