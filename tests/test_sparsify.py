import pytest
import torch
from torch import nn

from ray_lips.algorithms.handouts.sparsify import keep_count, sparsify_state, top_k_mask
from ray_lips.models import build_model, eligible_parameter_names


@pytest.fixture(autouse=True)
def seeded():
    """Every random tensor here comes from a fixed seed: a test's outcome never depends on
    which values an unseeded draw happened to give."""
    torch.manual_seed(1234)


def test_keeps_exactly_floor_density_numel_entries_ranked_by_abs_grad_times_weight():
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, -0.1, 4.0]])
    g = torch.tensor([[10.0, 1.5, 0.1], [-4.0, 50.0, 0.0]])
    # |g*w| = [[10, 3, 0.3], [2, 5, 0]]: the top three are distinct
    out = sparsify_state({"conv.weight": w}, ["conv.weight"], 0.5, "sensitivity",
                         {"conv.weight": g.half()})
    kept = out["conv.weight"] != 0
    assert int(kept.sum()) == keep_count(6, 0.5) == 3
    assert kept.tolist() == [[True, True, False], [False, True, False]]
    # kept entries keep their exact global values
    assert torch.equal(out["conv.weight"][kept], w[kept])


def test_floor_of_density_times_numel():
    assert keep_count(10, 0.55) == 5
    assert keep_count(7, 0.5) == 3
    mask = top_k_mask(torch.arange(7.0), 3)
    assert mask.tolist() == [False] * 4 + [True] * 3


def test_only_eligible_layers_change_stem_classifier_and_batchnorm_untouched():
    torch.manual_seed(0)
    model = build_model("resnet8", (3, 32, 32), 10)
    state = model.state_dict()
    eligible = eligible_parameter_names(model)
    grads = {n: torch.randn_like(state[n]) for n in eligible}
    out = sparsify_state(state, eligible, 0.3, "sensitivity", grads)
    stem = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert f"{stem}.weight" not in eligible
    for name, tensor in state.items():
        if name in eligible:
            zeros = int((out[name] == 0).sum())
            assert zeros == tensor.numel() - keep_count(tensor.numel(), 0.3), name
        else:
            assert out[name] is tensor, name  # shared, not copied or changed
    bn_and_fc = [n for n in state if n.startswith(("bn1", "fc")) or ".bn" in n]
    assert bn_and_fc and not set(bn_and_fc) & set(eligible)


def test_density_one_is_the_global_model():
    state = {"w": torch.randn(4, 4)}
    assert sparsify_state(state, ["w"], 1.0, "sensitivity", {"w": torch.randn(4, 4)})["w"] \
        is state["w"]


def test_masks_are_client_specific_through_the_gradient():
    w = torch.randn(50)
    a = sparsify_state({"w": w}, ["w"], 0.5, "sensitivity", {"w": torch.randn(50)})["w"]
    b = sparsify_state({"w": w}, ["w"], 0.5, "sensitivity", {"w": torch.randn(50)})["w"]
    assert not torch.equal(a != 0, b != 0)


def test_other_scorers():
    w = torch.tensor([3.0, -1.0, 0.5, -4.0])
    g = torch.tensor([0.1, 5.0, 0.2, 0.0])
    mag = sparsify_state({"w": w}, ["w"], 0.5, "magnitude")["w"]
    assert (mag != 0).tolist() == [True, False, False, True]
    grad = sparsify_state({"w": w}, ["w"], 0.5, "gradient", {"w": g})["w"]
    assert (grad != 0).tolist() == [False, True, True, False]
    gen1, gen2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    r1 = sparsify_state({"w": torch.randn(100)}, ["w"], 0.5, "random", generator=gen1)["w"]
    assert int((r1 != 0).sum()) == 50
    r2 = sparsify_state({"w": r1 + 10}, ["w"], 0.5, "random", generator=gen2)["w"]
    assert torch.equal(r1 != 0, r2 != 0)  # same generator seed, same random mask


def test_zeros_regrow_when_the_client_trains_densely(tiny_config):
    """Transient sparsity: the next round trains every weight, so the zeroed entries come back."""
    from ray_lips.config import validate_config
    from ray_lips.core.aggregate import to_state
    from ray_lips.core.run import assign_clients, build_payloads, initial_model
    from ray_lips.data import load_dataset
    from ray_lips.pools.client_pool import ClientPool
    from ray_lips.pools.messages import TrainRequest

    cfg = validate_config(tiny_config)
    dataset = load_dataset(cfg.data)
    payload = build_payloads(cfg, dataset, assign_clients(6, 1))[0]
    pool = ClientPool(cfg, payload)
    state = initial_model(cfg, dataset.sample_shape, dataset.num_classes).state_dict()
    pool.set_global(-1, state, 1.0)
    pool.train_round(TrainRequest(0, [0], 40, 240, False), {})  # remembers client 0's gradient
    pool.set_global(0, state, 0.5)  # a sparsity round's hand-out
    handed = pool.handed(0)
    name = pool.eligible[0]
    zeroed = handed[name] == 0
    assert int(zeroed.sum()) == handed[name].numel() - handed[name].numel() // 2
    reply = pool.train_round(TrainRequest(1, [0], 40, 240, False), {})
    trained = to_state(reply.sums["model"], state)[name]  # one client: the sum is its model
    assert float((trained[zeroed] != 0).float().mean()) > 0.99
