"""Layer-wise inertia: how far each layer of the global model moves, round by round, and the
trigger of ``lips.schedule: inertia`` built on it.

Every round the driver computes one row per layer group of the global model
(:func:`layer_metrics`, the rows of ``layers.parquet``). The trigger reads two columns of them:

- ``rel_update``, the relative update ||w_l(r) - w_l(r-1)|| / ||w_l(r-1)|| of layer l's
  parameters (its module's own, BatchNorm buffers not included) in round r;
- ``eligible``: the layer is *LIPS-eligible*, i.e. it owns a parameter the hand-out may sparsify
  (:func:`ray_lips.models.eligible_parameter_names`: every convolution but the stem; the same
  names the hand-out is given, so never BatchNorm or the classifier).

With u(r) the mean ``rel_update`` of the eligible layers in round r and w = ``lips.window``, the
*signal* S(r) is the mean of u over rounds max(0, r - w + 1) .. r, and the *ratio* is
S(r) / S(ref), ref = ``train.inertia_ref_round`` (NaN before ref, or where S is undefined).
The hand-out after round r is sparse when ratio < ``lips.trigger`` and either no hand-out was
sparse yet or the last sparse one came at least ``lips.min_gap`` rounds before r (default
``lips.period``). Its density is the linear schedule's for r. Everything is computed from the
driver's own rows, in a fixed order: the same decisions for any pool count, and after a resume,
which restores the rows up to its checkpoint. ``rounds.parquet`` of an inertia run records the
ratio of each round in ``inertia_ratio``; a round's hand-out was sparse when its ``density`` < 1.

Known answers: ``trigger: 0`` never fires (the ratio is never negative), so the run is FedAvg
with a dense hand-out; a trigger that always fires with ``min_gap: T`` and
``inertia_ref_round: 0`` hands out sparse copies at rounds 0, T, 2T, ...: the linear schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ray_lips.models import LayerGroup


def _flat(state: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([state[n].detach().reshape(-1).double().cpu() for n in names])


def layer_metrics(round_idx: int, groups: list[LayerGroup], previous: Mapping[str, torch.Tensor],
                  current: Mapping[str, torch.Tensor],
                  reference: Mapping[str, torch.Tensor] | None) -> list[dict]:
    """One row per layer: relative update against the previous round, distances to the reference.

    ``rel_update`` = ||w_l(r) - w_l(r-1)|| / ||w_l(r-1)||; ``cos_to_ref``, ``l1_to_ref`` and
    ``l2_to_ref`` compare w_l(r) with the global model of the reference round (NaN before it).
    """
    rows = []
    nan = float("nan")
    for index, group in enumerate(groups):
        now = _flat(current, group.param_names)
        before = _flat(previous, group.param_names)
        prev_norm = float(before.norm())
        row = {
            "round": round_idx, "layer": group.name, "layer_index": index, "kind": group.kind,
            "eligible": group.eligible, "numel": int(now.numel()),
            "norm": float(now.norm()),
            "rel_update": float((now - before).norm()) / prev_norm if prev_norm > 0 else nan,
            "cos_to_ref": nan, "l1_to_ref": nan, "l2_to_ref": nan,
        }
        if reference is not None:
            ref = _flat(reference, group.param_names)
            denom = float(now.norm() * ref.norm())
            row["cos_to_ref"] = float(now @ ref) / denom if denom > 0 else nan
            row["l1_to_ref"] = float((now - ref).abs().sum())
            row["l2_to_ref"] = float((now - ref).norm())
        rows.append(row)
    return rows


def eligible_update(rows: Iterable[Mapping]) -> dict[int, float]:
    """u(r) per round: the mean ``rel_update`` of the eligible layers' rows, in row order
    (NaN where a round has none, or one of them is NaN)."""
    per_round: dict[int, list[float]] = {}
    for row in rows:
        if row["eligible"]:
            per_round.setdefault(int(row["round"]), []).append(float(row["rel_update"]))
    return {r: sum(values) / len(values) for r, values in per_round.items()}


@dataclass(frozen=True)
class InertiaTrigger:
    """When ``lips.schedule: inertia`` hands out a sparse copy (module docstring)."""

    window: int
    trigger: float
    min_gap: int
    ref_round: int

    def _signal(self, updates: Mapping[int, float], round_idx: int) -> float:
        values = [updates.get(r, math.nan) for r in
                  range(max(0, round_idx - self.window + 1), round_idx + 1)]
        return sum(values) / len(values)

    def ratio(self, updates: Mapping[int, float], round_idx: int) -> float:
        """S(round_idx) / S(ref) from u per round (:func:`eligible_update`)."""
        if round_idx < self.ref_round:
            return math.nan
        reference = self._signal(updates, self.ref_round)
        if not reference > 0:
            return math.nan
        return self._signal(updates, round_idx) / reference

    def fires(self, ratio: float, round_idx: int, last_sparse: int | None) -> bool:
        """Whether the hand-out after ``round_idx`` is sparse; ``last_sparse`` is the round of
        the last sparse hand-out before it (None: none yet). A NaN ratio never fires."""
        rested = last_sparse is None or round_idx - last_sparse >= self.min_gap
        return rested and ratio < self.trigger
