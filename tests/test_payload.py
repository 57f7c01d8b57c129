"""What the driver ships to a pool: every client's data, once, in a few buffers."""

from __future__ import annotations

import pickle

import torch

from ray_lips.config import validate_config
from ray_lips.data import load_dataset
from ray_lips.engine.experiment import build_payloads


def test_pickled_payload_carries_each_clients_data_once_and_exactly():
    cfg = validate_config({
        "name": "payload", "model": "smallcnn",
        "data": {"dataset": "synthetic", "clients": 400, "train_per_client": 20,
                 "test_per_client": 10,
                 "synthetic": {"shape": [1, 12, 12], "classes": 10, "train_size": 1000,
                               "test_size": 500}},
        "train": {"eval_test_samples": 0},
        "resources": {"pools": 2},
    })
    payloads = build_payloads(cfg, load_dataset(cfg.data), [list(range(200)),
                                                            list(range(200, 400))])
    payload = payloads[1]
    data_bytes = sum(t.numel() * t.element_size() for s in payload.shards
                     for t in (s.x_train, s.y_train, s.x_test, s.y_test))
    blob = pickle.dumps(payload)
    # 200 clients sampled with overlap from 1,000 images: the shards hold 4,000 train rows;
    # shipped once each, not once per client view of a shared buffer
    assert data_bytes < len(blob) < 1.1 * data_bytes

    back = pickle.loads(blob)
    assert [s.client for s in back.shards] == list(range(200, 400))
    for sent, got in zip(payload.shards, back.shards, strict=True):
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(sent, name), getattr(got, name))
        assert got.x_train.shape == (20, 1, 12, 12) and got.x_test.shape[0] == 10
