"""Communication accounting: the bytes a client would download and upload in a round.

Pure functions of tensor shapes and dtypes, never of values or of which pool hosts a client, so
a round's traffic is the same for any pool count. Download: what a client is handed after the
round's aggregation, every entry at its dtype's size, except a LIPS sparse copy's eligible
tensors, each sent as its kept values plus a bitmap of kept positions (numel / 8 bytes, rounded
up) when that is smaller than the dense tensor, plus whatever the algorithm personalised for the
client (FedCAC's customised entries), dense. Upload: every tensor of every part a trained
client returns for aggregation, plus what it sends individually that is not one of those
tensors (a boolean tensor, such as FedCAC's critical mask, as a bitmap).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch

Tensors = Mapping[str, torch.Tensor]

# the columns of rounds.parquet this module fills, in order
TRAFFIC_COLUMNS = ("down_bytes", "up_bytes", "down_bytes_dense", "down_bytes_client",
                   "up_bytes_client")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """The dense tensor's size on the wire: numel times its element size."""
    return tensor.numel() * tensor.element_size()


def state_bytes(state: Tensors, skip: Collection[str] = ()) -> int:
    """Every entry of ``state`` dense, but those named in ``skip`` (entries never sent)."""
    return sum(tensor_bytes(t) for name, t in state.items() if name not in skip)


def sparse_tensor_bytes(numel: int, element_size: int, kept: int) -> int:
    """A tensor of which ``kept`` entries are sent: the kept values plus a bitmap of their
    positions, or the dense tensor when that is not larger."""
    return min(numel * element_size, kept * element_size + math.ceil(numel / 8))


def sparse_copy_bytes(state: Tensors, kept: Mapping[str, int], skip: Collection[str] = ()) -> int:
    """A copy of ``state`` whose tensors named in ``kept`` keep that many entries each (values
    plus bitmap, or dense if smaller); the other entries dense, those in ``skip`` not sent."""
    total = 0
    for name, tensor in state.items():
        if name in skip:
            continue
        if name in kept:
            total += sparse_tensor_bytes(tensor.numel(), tensor.element_size(), kept[name])
        else:
            total += tensor_bytes(tensor)
    return total


def parts_bytes(parts: Mapping[str, tuple[Tensors, float]]) -> int:
    """What a client uploads: every tensor of every part (``ClientUpdate.parts``)."""
    return sum(state_bytes(tensors) for tensors, _weight in parts.values())


def wire_bytes(tensor: torch.Tensor) -> int:
    """A tensor sent on its own: a boolean one as a bitmap (numel / 8, rounded up), any other
    dense."""
    if tensor.dtype == torch.bool:
        return math.ceil(tensor.numel() / 8)
    return tensor_bytes(tensor)


def individual_bytes(individual: Mapping[str, Tensors] | None,
                     parts: Mapping[str, tuple[Tensors, float]]) -> int:
    """What a client uploads individually (``ClientUpdate.individual``) beyond its parts: a
    tensor that is also one of the parts' (the same object) is sent once, and counted there."""
    if not individual:
        return 0
    sent = {id(t) for tensors, _weight in parts.values() for t in tensors.values()}
    return sum(wire_bytes(t) for tensors in individual.values() for t in tensors.values()
               if id(t) not in sent)


def round_traffic(train_rows: Iterable[Mapping[str, Any]],
                  handout_rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """A round's columns of ``rounds.parquet`` from the pools' rows: ``down_bytes`` (all
    receivers of the hand-out), ``up_bytes`` (all trained clients), ``down_bytes_dense`` (the
    receivers' download if every copy were dense), and the per-client means
    ``down_bytes_client`` (over receivers) and ``up_bytes_client`` (over trained clients),
    NaN when there were none. Integer sums, so the order of the rows (the pools) cannot matter.
    """
    up = [int(row["up_bytes"]) for row in train_rows if "up_bytes" in row]
    handed = list(handout_rows)
    down = [int(row["down_bytes"]) for row in handed]
    dense = [int(row["down_bytes_dense"]) for row in handed]
    return {
        "down_bytes": sum(down), "up_bytes": sum(up), "down_bytes_dense": sum(dense),
        "down_bytes_client": sum(down) / len(down) if down else math.nan,
        "up_bytes_client": sum(up) / len(up) if up else math.nan,
    }
