"""MOON, FedBN, FedRep and FedBABU against known answers, end to end on tiny digits runs."""

from __future__ import annotations

import copy

import pytest
import torch
from same_runs import assert_pool_count_and_resume_invariant, assert_same_tables, final_model

from ray_lips.algorithms import build_algorithm
from ray_lips.config import ConfigError, validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.models import batchnorm_entry_names, build_model, head_parameter_names
from ray_lips.training.local import local_train

NO_GLOBAL = ["acc_global", "acc_global_last", "acc_global_window", "acc_test", "acc_test_last",
             "acc_test_window"]

NO_BATCHNORM_NET = '''
from torch import nn


def build(shape, classes):
    return nn.Sequential(nn.Conv2d(shape[0], 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, classes))
'''


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _config(tiny_config: dict, algorithm: str, handout: str = "dense", **sections) -> dict:
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm=algorithm, handout=handout, **sections)
    tree["train"].update(rounds=3, local_epochs=1, finetune_epochs=1, checkpoint_every=2)
    return tree


# ----- MOON -----------------------------------------------------------------------------------
def test_moon_with_mu_zero_is_fedavg_bit_for_bit(tmp_path, tiny_config):
    run_local(validate_config(_config(tiny_config, "fedavg")), tmp_path / "fedavg")
    run_local(validate_config(_config(tiny_config, "moon", moon={"mu": 0.0})), tmp_path / "moon")
    assert_same_tables(tmp_path / "fedavg", tmp_path / "moon")
    a, b = final_model(tmp_path / "fedavg"), final_model(tmp_path / "moon")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_moon_keeps_each_clients_previous_model_as_its_next_negative(tmp_path, tiny_config):
    run = FederatedRun(validate_config(_config(tiny_config, "moon")), tmp_path / "moon")
    try:
        run.run_round()
        pool = run.pools.pools[0]
        client = pool.clients()[0]
        previous = pool.store.get(client, "moon.previous")
        assert previous is not None
        assert not all(torch.equal(previous[k], run.global_state[k].to(previous[k].device))
                       for k in previous)  # its own trained model, not the average
    finally:
        run.close()


# ----- FedBN -----------------------------------------------------------------------------------
def test_fedbn_on_a_model_without_batchnorm_is_fedavg(tmp_path, tiny_config, monkeypatch):
    (tmp_path / "nobn_nets.py").write_text(NO_BATCHNORM_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    for algorithm in ("fedavg", "fedbn"):
        tree = _config(tiny_config, algorithm, model="nobn_nets:build")
        run_local(validate_config(tree), tmp_path / algorithm)
    # the same training, bit for bit; FedBN has no global model to score (nor its inertia)
    assert_same_tables(tmp_path / "fedavg", tmp_path / "fedbn", drop=NO_GLOBAL,
                 tables=("rounds.parquet", "clients.parquet"))
    a, b = final_model(tmp_path / "fedavg"), final_model(tmp_path / "fedbn")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedbn_keeps_batchnorm_local_and_averages_the_rest(tmp_path, tiny_config):
    cfg = validate_config(_config(tiny_config, "fedbn"))
    run = FederatedRun(cfg, tmp_path / "fedbn")
    try:
        initial = {k: v.clone() for k, v in run.global_state.items()}
        bn = batchnorm_entry_names(build_model("smallcnn", (1, 8, 8), 10))
        for _ in range(2):
            run.run_round()
        assert all(torch.equal(run.global_state[k], initial[k]) for k in bn)
        pool = run.pools.pools[0]
        held = [pool.algorithm.held_state(pool.view(), c) for c in pool.clients()]
        conv = "features.3.weight"
        assert all(torch.equal(h[conv], run.global_state[conv].to(h[conv].device))
                   for h in held)
        assert not torch.equal(held[0]["features.1.running_mean"],
                               held[1]["features.1.running_mean"])
    finally:
        run.close()


# ----- FedBABU ---------------------------------------------------------------------------------
def test_fedbabu_keeps_its_initial_head_and_hands_every_client_one_body(tmp_path, tiny_config):
    run = FederatedRun(validate_config(_config(tiny_config, "fedbabu")), tmp_path / "babu")
    try:
        head = head_parameter_names(build_model("smallcnn", (1, 8, 8), 10))
        initial = {k: run.global_state[k].clone() for k in head}
        body_before = run.global_state["features.0.weight"].clone()
        for _ in range(3):
            run.run_round()
            assert all(torch.equal(run.global_state[k], initial[k]) for k in head)
            held = [pool.algorithm.held_state(pool.view(), c)
                    for pool in run.pools.pools for c in pool.clients()]
            for name, value in run.global_state.items():
                assert all(torch.equal(h[name].cpu(), value.cpu()) for h in held)
        assert not torch.equal(run.global_state["features.0.weight"], body_before)
    finally:
        run.close()


def test_fedbabu_trains_its_head_in_the_final_fine_tuning(tmp_path, tiny_config):
    summary = run_local(validate_config(_config(tiny_config, "fedbabu")), tmp_path / "babu")
    assert summary["acc_finetune_mean"] != summary["acc_final_mean"]


# ----- FedRep ----------------------------------------------------------------------------------
def test_fedrep_trains_the_head_then_the_body_each_frozen_in_the_others_phase(tiny_config):
    cfg = validate_config(_config(tiny_config, "fedrep", fedrep={"head_epochs": 2}))
    torch.manual_seed(0)
    model = build_model("smallcnn", (1, 8, 8), 10)
    algorithm = build_algorithm(cfg, model)
    head_phase, body_phase = algorithm.phases
    assert (head_phase.epochs, body_phase.epochs) == (2, cfg.train.local_epochs)
    head = set(head_parameter_names(model))
    assert set(head_phase.trainable) == head
    assert set(body_phase.trainable) == {n for n, _ in model.named_parameters()} - head

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand((40, 1, 8, 8), generator=gen), torch.randint(0, 10, (40,), generator=gen)
    from ray_lips.data.augment import Normalisation
    from ray_lips.training.spec import LocalSettings

    settings = LocalSettings.of(cfg.train)
    norm = Normalisation((0.0,), (1.0,), augment=False)
    gens = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    params = [n for n, _ in model.named_parameters()]
    for phase in (head_phase, body_phase):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        local_train(model, x, y, settings, norm, *gens, phases=(phase,))
        moved = {n for n in params if not torch.equal(before[n], model.state_dict()[n])}
        assert moved == set(phase.trainable)


def test_fedrep_keeps_heads_on_the_clients(tmp_path, tiny_config):
    run = FederatedRun(validate_config(_config(tiny_config, "fedrep")), tmp_path / "rep")
    try:
        initial = {k: v.clone() for k, v in run.global_state.items()}
        run.run_round()
        pool = run.pools.pools[0]
        head = sorted(pool.algorithm.local)
        assert all(torch.equal(run.global_state[k], initial[k]) for k in head)
        held = [pool.algorithm.held_state(pool.view(), c) for c in pool.clients()]
        assert not torch.equal(held[0][head[0]], held[1][head[0]])
        assert not torch.equal(run.global_state["features.0.weight"], initial["features.0.weight"])
    finally:
        run.close()


# ----- every new algorithm --------------------------------------------------------------------
@pytest.mark.parametrize(("algorithm", "handout"), [("moon", "lips"), ("fedbn", "lips"),
                                                    ("fedrep", "lips"), ("fedbabu", "lips"),
                                                    ("fedrod", "lips")])
def test_same_numbers_with_one_or_three_pools_and_after_a_resume_with_the_lips_handout(
        tmp_path, tiny_config, algorithm, handout):
    assert_pool_count_and_resume_invariant(_config(tiny_config, algorithm, handout), tmp_path)


def test_an_algorithm_with_a_head_on_a_model_without_a_classifier_is_a_config_error(
        tmp_path, tiny_config, monkeypatch):
    (tmp_path / "headless_nets.py").write_text(
        "from torch import nn\n\n\ndef build(shape, classes):\n"
        "    return nn.Sequential(nn.Conv2d(shape[0], classes, 3), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = validate_config(_config(tiny_config, "fedrep", model="headless_nets:build"))
    with pytest.raises(ConfigError, match="model: .* no nn.Linear classifier"):
        run_local(cfg, tmp_path / "rep")


# ----- FedPart ---------------------------------------------------------------------------------
def test_fedpart_cycles_through_conv_bn_pairs_after_its_warmup_as_the_reference(tiny_config):
    cfg = validate_config(_config(tiny_config, "fedpart"))
    algorithm = build_algorithm(cfg, build_model("resnet8", (3, 32, 32), 10))
    assert [sorted({n.rsplit(".", 1)[0] for n in params}) for params, _ in algorithm.groups][:2] \
        == [["bn1", "conv1"], ["layer1.0.bn1", "layer1.0.conv1"]]
    assert len(algorithm.groups) == 10  # 9 conv+BN pairs (shortcuts included) and fc
    schedule = [algorithm.group_of(r) for r in range(31)]
    assert schedule[:5] == [None] * 5 and schedule[25:30] == [None] * 5
    assert schedule[5:25] == [g for g in range(10) for _ in range(2)]
    assert schedule[30] == 0


def test_fedpart_with_one_group_of_the_whole_network_is_fedavg_bit_for_bit(tmp_path,
                                                                           tiny_config):
    run_local(validate_config(_config(tiny_config, "fedavg")), tmp_path / "fedavg")
    whole = {"warmup_rounds": 0, "groups": [[""]]}
    run_local(validate_config(_config(tiny_config, "fedpart", fedpart=whole)), tmp_path / "part")
    assert_same_tables(tmp_path / "fedavg", tmp_path / "part")
    a, b = final_model(tmp_path / "fedavg"), final_model(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fedpart_round_trains_and_aggregates_only_its_group(tmp_path, tiny_config):
    cfg = validate_config(_config(tiny_config, "fedpart",
                                  fedpart={"warmup_rounds": 1, "rounds_per_group": 1}))
    run = FederatedRun(cfg, tmp_path / "part")
    try:
        run.run_round()  # the full warm-up round
        entries, groups = list(run.global_state), run.algorithm.groups
        for r in (1, 2):
            before = {k: v.clone() for k, v in run.global_state.items()}
            run.run_round()
            moved = {k for k in entries if not torch.equal(before[k], run.global_state[k])}
            assert moved and moved <= groups[r - 1][1]
            assert set(groups[r - 1][0]) <= moved
    finally:
        run.close()


def test_fedpart_with_the_lips_handout_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="handout: 'lips' cannot be combined with algorithm"):
        validate_config(_config(tiny_config, "fedpart", "lips"))


def test_fedpart_same_numbers_with_one_or_three_pools_and_after_a_resume_through_its_groups(
        tmp_path, tiny_config):
    tree = _config(tiny_config, "fedpart", fedpart={"warmup_rounds": 1, "rounds_per_group": 1})
    assert_pool_count_and_resume_invariant(tree, tmp_path)


# ----- FedRoD ----------------------------------------------------------------------------------
def test_fedrod_steps_the_model_on_the_balanced_softmax_and_the_personal_head_on_the_sum():
    """One full-batch step by hand: the model on CE(g(z) + log n_c), the personal head on
    CE(g(z) + p(z)) with z and g(z) detached."""
    from torch import nn

    from ray_lips.algorithms.fedrod import BalancedWithPersonalHead
    from ray_lips.data.augment import Normalisation
    from ray_lips.models import classifier_layer
    from ray_lips.training.spec import LocalSettings

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand((20, 1, 8, 8), generator=gen), torch.randint(0, 3, (20,), generator=gen)
    counts = tuple(torch.bincount(y, minlength=4).tolist())  # class 3 absent: log 0
    settings = LocalSettings(epochs=1, batch_size=20, lr=0.1, momentum=0.0, weight_decay=0.0)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build_model("smallcnn", (1, 8, 8), 4)

    names = ("classifier.weight", "classifier.bias")
    model = fresh()
    personal_start = {n: torch.randn(model.state_dict()[n].shape, generator=gen) for n in names}
    term = BalancedWithPersonalHead(counts, personal_start, names, settings)
    local_train(model, x, y, settings, Normalisation((0.0,), (1.0,), augment=False),
                torch.Generator().manual_seed(1), torch.Generator().manual_seed(2),
                loss_term=term)

    order = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    by_hand = fresh()
    caught = []
    classifier_layer(by_hand)[1].register_forward_pre_hook(lambda m, a: caught.append(a[0]))
    logits = by_hand(x[order])
    balanced = nn.functional.cross_entropy(logits + torch.tensor(counts).float().log(), y[order])
    balanced.backward()
    for name, param in by_hand.named_parameters():
        torch.testing.assert_close(model.state_dict()[name], param.detach() - 0.1 * param.grad)
    weight, bias = (personal_start[n].clone().requires_grad_(True) for n in names)
    personal = caught[0].detach() @ weight.t() + bias
    nn.functional.cross_entropy(logits.detach() + personal, y[order]).backward()
    head = term.head()
    torch.testing.assert_close(head[names[0]], (weight - 0.1 * weight.grad).detach())
    torch.testing.assert_close(head[names[1]], (bias - 0.1 * bias.grad).detach())


def test_fedrod_keeps_personal_heads_in_the_pools_and_predicts_with_both(tmp_path, tiny_config):
    run = FederatedRun(validate_config(_config(tiny_config, "fedrod")), tmp_path / "rod")
    try:
        model = build_model("smallcnn", (1, 8, 8), 10)
        run.run_round()
        assert set(run.global_state) == set(model.state_dict())  # no second head there
        pool = run.pools.pools[0]
        client = pool.clients()[0]
        personal = pool.store.get(client, "fedrod.head")
        assert set(personal) == set(head_parameter_names(model))
        held = pool.algorithm.held_state(pool.view(), client)
        x = torch.rand((5, 1, 8, 8))
        model.load_state_dict({k: v.cpu() for k, v in pool.handed(client).items()})
        model.eval()
        with torch.no_grad():
            generic = model(x)
            features = torch.flatten(model.avgpool(model.features(x)), 1)
            both = generic + features @ personal["classifier.weight"].cpu().t() \
                + personal["classifier.bias"].cpu()
            model.load_state_dict({k: v.cpu() for k, v in held.items()})
            torch.testing.assert_close(model(x), both)
    finally:
        run.close()
