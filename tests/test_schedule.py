import pytest

from ray_lips.algorithms.handouts.schedule import density_at


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


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="lips.schedule"):
        density_at(0, 10, 0.5, 5, "cosine")
