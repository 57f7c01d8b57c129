"""Layer-wise inertia: how far each layer of the global model moves, round by round."""

from __future__ import annotations

from collections.abc import Mapping

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
