"""The LIPS density schedules: the density of the hand-out after each round.

Four schedules are periodic: sparsity rounds are those with ``r % period == 0`` (round 0
included), every other round is dense (1.0). On a sparsity round, with d0 = 1 - sparsity and R
rounds:

- ``linear`` (the reference): d_r = min(1, d0 + (1 - d0) * r / R), fading to dense by the end;
- ``constant``: d0;
- ``cosine``: d_r = min(1, d0 + (1 - d0) * (1 - cos(pi * r / R)) / 2), the same climb from d0 to 1
  along a half cosine (slow at first and at the end, fastest half-way);
- ``step``: d0 while r < ``step_round`` (default R // 2), dense from then on.

The fifth, ``inertia``, has no clock: the driver hands out a sparse copy when its inertia trigger
fires (:mod:`ray_lips.core.inertia`), with the linear schedule's density for that round
(:func:`triggered_density`).
"""

from __future__ import annotations

import math

PERIODIC_SCHEDULES = ("linear", "constant", "cosine", "step")
SCHEDULES = (*PERIODIC_SCHEDULES, "inertia")


def linear_density(round_idx: int, rounds: int, sparsity: float) -> float:
    """The reference's density after round ``round_idx``: d0 + (1 - d0) * r / R, at most 1."""
    d0 = 1.0 - sparsity
    return min(1.0, d0 + (1.0 - d0) * round_idx / rounds)


def step_round_of(step_round: int | None, rounds: int) -> int:
    """The first dense round of the ``step`` schedule: ``step_round``, or half the run."""
    return rounds // 2 if step_round is None else step_round


def density_at(round_idx: int, rounds: int, sparsity: float, period: int,
               schedule: str = "linear", step_round: int | None = None) -> float:
    """Fraction of eligible weights kept in the hand-out after round ``round_idx`` under one of
    the periodic schedules (module docstring); 1.0 (dense) off the sparsity rounds."""
    if schedule not in PERIODIC_SCHEDULES:
        hint = (" (it is decided by the driver's trigger, see triggered_density)"
                if schedule == "inertia" else "")
        raise ValueError(f"lips.schedule: {schedule!r} is not a periodic schedule{hint}; "
                         f"expected one of {', '.join(PERIODIC_SCHEDULES)}")
    if round_idx % period != 0:
        return 1.0
    d0 = 1.0 - sparsity
    if schedule == "constant":
        return d0
    if schedule == "linear":
        return linear_density(round_idx, rounds, sparsity)
    if schedule == "cosine":
        return min(1.0, d0 + (1.0 - d0) * (1.0 - math.cos(math.pi * round_idx / rounds)) / 2.0)
    return d0 if round_idx < step_round_of(step_round, rounds) else 1.0


def triggered_density(round_idx: int, rounds: int, sparsity: float, fired: bool) -> float:
    """The ``inertia`` schedule's density after round ``round_idx``: the linear schedule's
    density for that round when the trigger fired, else dense."""
    return linear_density(round_idx, rounds, sparsity) if fired else 1.0
