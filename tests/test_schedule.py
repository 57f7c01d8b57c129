import math

import pytest

from ray_lips.algorithms.handouts.schedule import density_at, linear_density, triggered_density


def test_sparsity_rounds_start_at_zero_and_repeat_every_period():
    densities = [density_at(r, 20, 0.5, 5) for r in range(20)]
    sparse = [r for r, d in enumerate(densities) if d < 1.0]
    assert sparse == [0, 5, 10, 15]
    assert all(densities[r] == 1.0 for r in range(20) if r % 5)


def test_linear_schedule_fades_to_dense_by_the_last_round():
    rounds, d0 = 300, 0.5
    assert density_at(0, rounds, 0.5, 5) == pytest.approx(d0)
    assert density_at(150, rounds, 0.5, 5) == pytest.approx(d0 + (1 - d0) * 150 / 300)
    values = [density_at(r, rounds, 0.5, 5) for r in range(0, rounds, 5)]
    assert values == sorted(values)
    assert density_at(rounds, rounds, 0.5, 5) == 1.0


def test_constant_schedule_keeps_initial_density():
    values = [density_at(r, 100, 0.7, 10, "constant") for r in range(0, 100, 10)]
    assert values == pytest.approx([0.3] * 10)


def test_cosine_schedule_climbs_from_d0_to_dense_along_a_half_cosine():
    rounds, d0 = 100, 0.3
    sparse = {r: density_at(r, rounds, 0.7, 10, "cosine") for r in range(rounds)}
    assert [r for r, d in sparse.items() if d < 1.0] == list(range(0, rounds, 10))
    assert sparse[0] == pytest.approx(d0)
    assert sparse[50] == pytest.approx(d0 + (1 - d0) / 2)  # half-way: half the climb
    assert sparse[20] == pytest.approx(d0 + (1 - d0) * (1 - math.cos(math.pi * 0.2)) / 2)
    values = [sparse[r] for r in range(0, rounds, 10)]
    assert values == sorted(values)
    # slower than linear in the first half, faster in the second
    assert sparse[20] < density_at(20, rounds, 0.7, 10) and sparse[80] > density_at(80, rounds,
                                                                                      0.7, 10)
    assert density_at(rounds, rounds, 0.7, 10, "cosine") == 1.0


def test_step_schedule_keeps_d0_until_the_step_round_then_is_dense():
    values = [density_at(r, 20, 0.5, 2, "step", step_round=7) for r in range(20)]
    assert [r for r, d in enumerate(values) if d < 1.0] == [0, 2, 4, 6]
    assert {values[r] for r in (0, 2, 4, 6)} == {0.5}
    # default: dense from half the run
    default = [density_at(r, 20, 0.5, 2, "step") for r in range(20)]
    assert [r for r, d in enumerate(default) if d < 1.0] == [0, 2, 4, 6, 8]


def test_triggered_density_is_the_linear_schedules_when_the_trigger_fires():
    for r in (0, 3, 7, 299):
        assert triggered_density(r, 300, 0.5, True) == linear_density(r, 300, 0.5)
        assert triggered_density(r, 300, 0.5, False) == 1.0
    assert [linear_density(r, 300, 0.5) for r in range(0, 300, 5)] == [
        density_at(r, 300, 0.5, 5) for r in range(0, 300, 5)]


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="lips.schedule"):
        density_at(0, 10, 0.5, 5, "exponential")
    with pytest.raises(ValueError, match="decided by the driver's trigger"):
        density_at(0, 10, 0.5, 5, "inertia")
