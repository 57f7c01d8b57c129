"""FedAvg whose result does not depend on how clients are grouped into pools.

Floating-point addition is not associative, so summing 20 client models as 20 terms or as two
partial sums of 10 gives different last bits, and those differences grow over hundreds of rounds.
Each weighted client contribution is therefore rounded to a fixed-point grid of 2^-32 and summed
as int64, which is exact and order-free. The grid is far finer than float32 resolution for
model-sized values, so the average is what FedAvg computes, and it is the same for any pooling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ray_lips.core.failure import DivergenceError

__all__ = ["DivergenceError", "FixedSum", "add_client", "add_sums", "to_state"]

FRACTION_BITS = 32
_SCALE = float(2**FRACTION_BITS)
_LIMIT = float(2**30)  # |value| beyond this would overflow the int64 grid: the run has diverged


FixedSum = dict[str, torch.Tensor]


def add_client(acc: FixedSum | None, state: Mapping[str, torch.Tensor], fraction: float,
               client: int | None = None) -> FixedSum:
    """Add ``fraction * state`` (fraction = n_k / n_total) to the fixed-point sum ``acc``."""
    acc = {} if acc is None else acc
    factor = fraction * _SCALE
    for name, tensor in state.items():
        value = tensor.detach().double()
        if value.numel() and not float(value.abs().max()) <= _LIMIT:  # NaN fails this too
            who = f"client {client}" if client is not None else "a client"
            raise DivergenceError(f"{who} produced non-finite or exploding values in {name!r}")
        fixed = torch.round(value * factor).to(torch.int64)
        acc[name] = acc[name] + fixed if name in acc else fixed
    return acc


def add_sums(sums: Iterable[FixedSum]) -> FixedSum:
    """Combine partial sums from several pools (exact, any order)."""
    total: FixedSum = {}
    for part in sums:
        for name, tensor in part.items():
            tensor = tensor.cpu()
            total[name] = total[name] + tensor if name in total else tensor.clone()
    return total


def to_state(total: FixedSum, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a complete fixed-point sum back into a state dict with ``template``'s dtypes."""
    state = {}
    for name, ref in template.items():
        value = total[name].double() / _SCALE
        if ref.dtype.is_floating_point:
            state[name] = value.to(ref.dtype)
        else:  # integer buffers such as BatchNorm's num_batches_tracked
            state[name] = torch.round(value).to(ref.dtype)
    return state

