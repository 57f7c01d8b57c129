"""The LIPS density schedule."""

from __future__ import annotations


def density_at(round_idx: int, rounds: int, sparsity: float, period: int,
               schedule: str = "linear") -> float:
    """Fraction of eligible weights kept in the hand-out after round ``round_idx``.

    Sparsity rounds are those with ``round_idx % period == 0`` (round 0 included). With the
    ``linear`` schedule the density grows from d0 = 1 - sparsity to 1 by the last round,
    d_r = min(1, d0 + (1 - d0) * r / R); ``constant`` keeps d0. Other rounds are dense (1.0).
    """
    if round_idx % period != 0:
        return 1.0
    d0 = 1.0 - sparsity
    if schedule == "constant":
        return d0
    if schedule == "linear":
        return min(1.0, d0 + (1.0 - d0) * round_idx / rounds)
    raise ValueError(f"lips.schedule: unknown schedule {schedule!r}")
