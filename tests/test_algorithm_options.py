"""The knobs of FedPer (``personal_layers``, ``local_bn``) and FedProx (``anchor``) do what
the README says."""

from __future__ import annotations

import copy

import pytest
import torch

from ray_lips.algorithms.fedper import FedPer
from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.models import MODEL_NAMES, build_model, layer_groups
from ray_lips.pools.messages import TrainRequest
from ray_lips.training.spec import LocalSettings

SETTINGS = LocalSettings(epochs=1, batch_size=20, lr=0.05, momentum=0.9, weight_decay=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _config(tiny_config: dict, algorithm: str, handout: str = "dense", **sections) -> dict:
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm=algorithm, handout=handout, **sections)
    tree["train"].update(rounds=2, local_epochs=1, finetune_epochs=0, checkpoint_every=2)
    return tree


def _entries(model, modules) -> set[str]:
    return {k for k in model.state_dict() if k.startswith(tuple(f"{m}." for m in modules))}


# ----- FedPer: personal_layers -----------------------------------------------------------------
def test_fedper_personal_layers_counts_weight_layers_from_the_end():
    """On resnet8_1d, ``personal_layers: 2`` is the last two Conv/Linear layers (with the
    BatchNorm registered after the first of them), not ``fc`` and a shortcut BatchNorm."""
    model = build_model("resnet8_1d", (1, 40), 10)
    groups = layer_groups(model)
    weights = [g for g in groups if g.kind in ("conv", "linear")]
    fedper = FedPer(FedPer.Options(personal_layers=2), SETTINGS, model)
    personal = set(fedper.personal)
    last_two = [g.name for g in weights[-2:]]
    assert last_two == ["layer3.0.downsample.0", "fc"]  # a block registers its shortcut last
    assert _entries(model, last_two) <= personal
    assert not _entries(model, [weights[-3].name]) & personal  # the third last stays shared
    first = groups.index(weights[-2])
    assert personal == _entries(model, [g.name for g in groups[first:]])
    bn = [g.name for g in groups if g.kind == "bn"]
    assert [b for b in bn if _entries(model, [b]) & personal] == ["layer3.0.downsample.1"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fedper_default_keeps_exactly_the_classifier(name):
    model = build_model(name, (1, 40) if name.endswith("_1d") else (3, 16, 16), 10)
    classifier = [g for g in layer_groups(model) if g.kind == "linear"][-1]
    fedper = FedPer(FedPer.Options(), SETTINGS, model)
    assert set(fedper.personal) == _entries(model, [classifier.name])


# ----- FedPer: local_bn ------------------------------------------------------------------------
def test_fedper_local_bn_keeps_batchnorm_on_each_client(tmp_path, tiny_config):
    cfg = validate_config(_config(tiny_config, "fedper", fedper={"local_bn": True}))
    run = FederatedRun(cfg, tmp_path / "run")
    start = run.global_state
    pool = run.pools.pools[0]
    bn = {k for k in pool.algorithm.personal
          if k.startswith(tuple(f"{g.name}." for g in run.groups if g.kind == "bn"))}
    assert any(k.endswith("running_mean") for k in bn)
    run.run_round()
    held = {c: p.algorithm.held_state(p.view(), c) for p in run.pools.pools for c in p.clients()}
    clients = sorted(held)
    for key in run.global_state:
        values = [held[c][key] for c in clients]
        if key in bn:
            assert torch.equal(run.global_state[key], start[key]), key  # never averaged
            if key.endswith("running_mean"):
                assert not torch.equal(values[0], values[1]), key
                average = torch.stack(values).mean(0)
                assert not torch.allclose(run.global_state[key], average), key
        elif key not in pool.algorithm.personal:  # the body without BatchNorm: shared
            assert all(torch.equal(run.global_state[key], v) for v in values), key
    run.close()


def test_fedper_local_bn_off_is_the_default(tmp_path, tiny_config):
    cfg = validate_config(_config(tiny_config, "fedper", fedper={"local_bn": False}))
    default = validate_config(_config(tiny_config, "fedper"))
    assert cfg.fedper == default.fedper
    run = FederatedRun(cfg, tmp_path / "run")
    assert not [k for k in run.pools.pools[0].algorithm.personal if "running" in k
                and not k.startswith("classifier.")]
    run.close()


# ----- FedProx: anchor -------------------------------------------------------------------------
def _regrowth(tmp_path, tiny_config, anchor: str) -> float:
    """Round 1 of FedProx (mu 1) with LIPS after the sparsity round 0: of the zeroed weights'
    distance to the global model, the share each client's training closed (mean over
    clients)."""
    tree = _config(tiny_config, "fedprox", "lips", fedprox={"mu": 1.0, "anchor": anchor})
    tree["lips"].update(sparsity=0.7, period=2)
    tree["train"].update(local_epochs=2)
    run = FederatedRun(validate_config(tree), tmp_path / anchor)
    run.run_round()  # round 0: the hand-out after it is sparse
    shares = []
    for pool in run.pools.pools:
        clients = pool.clients()
        total = sum(pool.samples(c) for c in clients)
        this_round = pool.client_round(TrainRequest(1, clients, total, total, False), {})
        for client in clients:
            handed, dense = pool.handed(client), pool.global_state
            zeroed = {k: (handed[k] == 0) & (dense[k] != 0) for k in pool.eligible}
            assert sum(int(z.sum()) for z in zeroed.values()) > 0
            (update,) = pool.algorithm.train(this_round, [client])
            trained = update.parts["model"][0]
            gap = sum(float((dense[k][z] ** 2).sum()) for k, z in zeroed.items()) ** 0.5
            left = sum(float(((trained[k] - dense[k])[z] ** 2).sum())
                       for k, z in zeroed.items()) ** 0.5
            shares.append(1 - left / gap)
    run.close()
    return sum(shares) / len(shares)


def test_fedprox_global_anchor_regrows_more_of_the_zeroed_weights(tmp_path, tiny_config):
    handed = _regrowth(tmp_path, tiny_config, "handed")
    dense = _regrowth(tmp_path, tiny_config, "global")
    assert dense > 1.5 * handed and dense > 0, (handed, dense)


def test_fedprox_anchors_are_the_same_with_the_dense_handout(tmp_path, tiny_config):
    """Without LIPS the handed model is the global one: both anchors give the same numbers."""
    for anchor in ("handed", "global"):
        run_local(validate_config(_config(tiny_config, "fedprox",
                                          fedprox={"mu": 0.5, "anchor": anchor})),
                  tmp_path / anchor)
    a = torch.load(tmp_path / "handed" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "global" / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedprox_anchor_is_named_in_the_method_label():
    from analysis.methods import label_methods

    runs = [{"algorithm": "fedprox", "handout": "dense", "fedprox.mu": 0.01,
             "fedprox.anchor": anchor} for anchor in ("handed", "global")]
    assert [m.label for m in label_methods(runs)] == ["fedprox(anchor=handed)",
                                                      "fedprox(anchor=global)"]
