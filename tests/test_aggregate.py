import pytest
import torch
from torch import nn

from ray_lips.core.aggregate import (
    FRACTION_BITS,
    DivergenceError,
    add_client,
    add_sums,
    to_state,
)

GRID = 2.0**-FRACTION_BITS
FLOAT32_ROUNDING = 2.0**-24  # relative: the average is returned in the states' dtype


def _grid_bound(clients: int) -> float:
    """How far the exact fixed-point average may be from the float64 one: each client's
    weighted term is rounded to the nearest multiple of the grid (half a step each), plus a
    half step of slack for the float64 reference's own rounding."""
    return (clients + 1) * GRID / 2


def _average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """What the driver does with one pool's clients: the weighted fixed-point sum, as tensors."""
    acc = None
    for state, weight in zip(states, weights, strict=True):
        acc = add_client(acc, state, weight / sum(weights))
    return to_state(add_sums([acc]), states[0])


def _bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    model.train()
    model(torch.randn(8, 1, 4, 4) * (seed + 1))  # move BN running statistics
    return model


def test_fedavg_weights_parameters_and_batchnorm_buffers_by_sample_count():
    states = [_bn_model(s).state_dict() for s in range(3)]
    weights = [10, 30, 60]
    avg = _average(states, weights)
    for name in states[0]:
        if states[0][name].dtype.is_floating_point:
            pairs = zip(states, weights, strict=True)
            expected = sum(w * s[name].double() for s, w in pairs) / 100
            torch.testing.assert_close(avg[name].double(), expected, rtol=FLOAT32_ROUNDING,
                                       atol=_grid_bound(len(states)), msg=name)
            assert avg[name].dtype == states[0][name].dtype
    assert "1.running_mean" in avg and "1.running_var" in avg
    assert avg["1.num_batches_tracked"].dtype == torch.int64
    assert int(avg["1.num_batches_tracked"]) == 1


def test_partial_sums_in_any_grouping_give_bit_identical_averages():
    torch.manual_seed(0)
    states = [{"w": torch.randn(1000) * 10 ** torch.randint(-6, 2, (1000,))} for _ in range(7)]
    weights = [3, 9, 1, 4, 7, 2, 5]
    total = sum(weights)

    def grouped(groups):
        parts = []
        for group in groups:
            acc = None
            for i in group:
                acc = add_client(acc, states[i], weights[i] / total)
            parts.append(acc)
        return to_state(add_sums(parts), states[0])["w"]

    one = grouped([range(7)])
    assert torch.equal(one, grouped([[0, 1, 2], [3, 4, 5, 6]]))
    assert torch.equal(one, grouped([[6], [2, 0], [5, 3, 1, 4]]))
    naive = sum(w * s["w"].double() for s, w in zip(states, weights, strict=False)) / total
    torch.testing.assert_close(one.double(), naive, rtol=FLOAT32_ROUNDING,
                               atol=_grid_bound(len(states)))


def test_nan_weights_are_reported_as_divergence():
    with pytest.raises(DivergenceError, match="client 3"):
        add_client(None, {"w": torch.tensor([1.0, float("nan")])}, 0.5, client=3)
