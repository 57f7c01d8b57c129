"""What a pool gets: its clients' row numbers, with the dataset shipped apart, once."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import torch

from ray_lips.config import validate_config
from ray_lips.core.run import build_payloads
from ray_lips.data import load_dataset
from ray_lips.pools.payload import GatheredShards


def _config(clients: int = 400) -> dict:
    return {
        "name": "payload", "model": "smallcnn",
        "data": {"dataset": "synthetic", "clients": clients, "train_per_client": 20,
                 "test_per_client": 10,
                 "synthetic": {"shape": [1, 12, 12], "classes": 10, "train_size": 1000,
                               "test_size": 500}},
        "train": {"eval_test_samples": 0},
        "resources": {"pools": 2},
    }


def test_a_payload_carries_row_numbers_and_its_pool_gathers_the_same_samples():
    cfg = validate_config(_config())
    dataset = load_dataset(cfg.data)
    payloads = build_payloads(cfg, dataset, [list(range(200)), list(range(200, 400))])
    payload = payloads[1]
    assert payloads[0].dataset is payload.dataset  # one dataset for every pool
    rows_only = pickle.dumps(replace(payload, dataset=None))
    # 200 clients x 30 row numbers of 8 bytes, and no samples (4,000 train rows of 576 bytes)
    assert len(rows_only) < 200 * 30 * 8 + 20_000

    back = pickle.loads(rows_only)
    shards = GatheredShards(back.data, payload.dataset, torch.device("cpu"))
    assert list(shards) == list(range(200, 400)) and len(shards) == 200
    x_train = dataset.x_train.numpy()
    for client in (200, 311, 399):
        shard = shards[client]
        k = client - 200
        rows = back.data.train_rows[20 * k: 20 * (k + 1)]
        assert np.array_equal(shard.x_train.numpy(), x_train[rows])
        assert np.array_equal(shard.y_train.numpy(), dataset.y_train.numpy()[rows])
        assert shard.x_train.shape == (20, 1, 12, 12) and shard.x_test.shape[0] == 10


def test_shards_gathered_from_read_only_shared_memory_are_ordinary_tensors():
    cfg = validate_config(_config(clients=4))
    payload = build_payloads(cfg, load_dataset(cfg.data), [[0, 1, 2, 3]])[0]
    dataset = payload.dataset
    for name in ("x_train", "y_train", "x_test", "y_test"):  # as Ray's object store maps it
        getattr(dataset, name).setflags(write=False)
    shard = GatheredShards(payload.data, dataset, torch.device("cpu"))[2]
    shard.x_train += 1  # a gathered shard is the pool's own copy
    original = dataset.x_train[payload.data.train_rows[40:60]]
    assert not np.array_equal(shard.x_train.numpy(), original)
