"""The LIPS hand-out: a transiently sparse, client-specific copy of the global model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

Tensors = Mapping[str, torch.Tensor]
GRADIENT_SCORERS = ("sensitivity", "gradient")


def keep_count(numel: int, density: float) -> int:
    """Entries kept in a tensor of ``numel`` entries: floor(density * numel), as the reference."""
    return int(density * numel)


def scores(weight: torch.Tensor, grad: torch.Tensor | None, scorer: str,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance of each entry of ``weight``; the largest are kept."""
    if scorer == "magnitude":
        return weight.abs()
    if scorer == "random":
        return torch.rand(weight.shape, generator=generator).to(weight.device)
    if grad is None:
        raise ValueError(f"scorer {scorer!r} needs the client's last-batch gradient")
    grad = grad.to(device=weight.device, dtype=weight.dtype)
    if scorer == "sensitivity":
        return (grad * weight).abs()
    if scorer == "gradient":
        return grad.abs()
    raise ValueError(f"lips.scorer: unknown scorer {scorer!r}")


def top_k_mask(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of ``score``'s shape marking exactly ``keep`` largest entries."""
    flat = score.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep >= flat.numel():
        mask[:] = True
    elif keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(score)


def sparsify_state(state: Tensors, eligible: list[str], density: float, scorer: str,
                   grads: Tensors | None = None,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Copy of ``state`` whose eligible tensors keep their top ``density`` fraction of entries.

    Tensors that are not eligible are shared with ``state`` (not copied). ``grads`` maps eligible
    names to the client's remembered last-batch gradient (any float dtype).
    """
    out = dict(state)
    if density >= 1.0:
        return out
    for name in eligible:
        weight = state[name]
        grad = grads.get(name) if grads is not None else None
        keep = keep_count(weight.numel(), density)
        mask = top_k_mask(scores(weight, grad, scorer, generator), keep)
        out[name] = weight * mask
    return out
