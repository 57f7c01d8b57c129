"""What each algorithm declares for the reports (its family, its local work per round) and the
layer inertia a run measures for an algorithm that averages a body but has no global model."""

from __future__ import annotations

import copy

import pytest
import torch

from ray_lips.algorithms import registry
from ray_lips.algorithms.base import (
    FAMILIES,
    GLOBAL_BODY,
    GLOBAL_MODEL,
    PERSONAL_MODELS,
    Algorithm,
    LocalSettings,
)
from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun
from ray_lips.models import build_model, head_parameter_names

SETTINGS = LocalSettings(epochs=3, batch_size=20, lr=0.05, momentum=0.9, weight_decay=0.0)


def _work(name: str, **options):
    cls = registry.algorithm_class(name)
    return cls.local_work(cls.Options(**options), SETTINGS)


def test_every_algorithm_is_in_the_family_of_what_its_clients_predict_with():
    families = {name: cls.family for name, cls in registry.builtin().items()}
    assert set(families.values()) <= set(FAMILIES)
    assert {name for name, f in families.items() if f == PERSONAL_MODELS} == {"ditto", "local"}
    assert {name for name, f in families.items() if f == GLOBAL_BODY} == {
        "fedbn", "fedper", "fedrep", "fedrod", "fedcac"}
    assert families["fedavg"] == families["fedbabu"] == GLOBAL_MODEL


def test_local_work_counts_every_epoch_a_round_trains():
    assert str(_work("fedavg")) == "3"
    assert _work("fedprox").epochs == _work("scaffold").epochs == _work("feddyn").epochs == 3
    assert str(_work("ditto")) == "6 (3 global + 3 personal)"
    assert str(_work("ditto", personal_epochs=1)) == "4 (3 global + 1 personal)"
    assert str(_work("fedrep")) == "13 (10 head + 3 body)"
    assert str(_work("fedrep", head_epochs=2, body_epochs=1)) == "3 (2 head + 1 body)"
    assert str(_work("moon")) == "3 (+2 forward passes of frozen models)"
    assert str(_work("moon", mu=0.0)) == "3"  # mu = 0 is FedAvg: no contrastive forwards
    assert str(_work("fedcac")) == "3"  # FedAvg's epochs; the mask costs no pass


def test_a_users_algorithm_gets_fedavgs_family_and_work():
    class Mine(Algorithm):
        name = "mine"

    assert Mine.family == GLOBAL_MODEL
    assert Mine.local_work(Mine.Options(), SETTINGS).epochs == SETTINGS.epochs
    assert Mine.measures_body()


def _layers_after_two_rounds(tiny_config: dict, tmp_path, algorithm: str) -> list[dict]:
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm=algorithm, handout="dense")
    tree["train"].update(rounds=2, local_epochs=1)
    run = FederatedRun(validate_config(tree), tmp_path / algorithm)
    try:
        for _ in range(2):
            run.run_round()
        return run.layers_rows
    finally:
        run.close()


@pytest.mark.parametrize("algorithm", ["fedbn", "fedrep"])
def test_inertia_is_measured_on_the_averaged_entries_only(algorithm, tiny_config, tmp_path):
    torch.set_num_threads(1)
    rows = _layers_after_two_rounds(tiny_config, tmp_path, algorithm)
    model = build_model("smallcnn", (1, 8, 8), 10)
    layers = {row["layer"] for row in rows}
    kinds = {row["kind"] for row in rows}
    assert rows and {row["round"] for row in rows} == {0, 1}
    assert all(row["rel_update"] > 0 for row in rows)  # every measured entry is averaged
    if algorithm == "fedbn":
        assert "bn" not in kinds and "conv" in kinds
    else:
        head = {name.rsplit(".", 1)[0] for name in head_parameter_names(model)}
        assert layers and not layers & head


@pytest.mark.parametrize("algorithm", ["fedper", "local"])
def test_no_inertia_without_a_global_model_or_a_sparsifiable_body(algorithm, tiny_config,
                                                                  tmp_path):
    torch.set_num_threads(1)
    assert _layers_after_two_rounds(tiny_config, tmp_path, algorithm) == []
