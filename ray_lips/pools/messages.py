"""The typed requests and replies between the driver and its client pools, one pair per step
of a round: train, hand out, fine-tune at the end, and export or import client state; and
``PoolCall``, one such step for every pool of a group, however the group runs it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_lips.core.aggregate import FixedSum

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainRequest:
    """Round ``round_idx``: train these participants (the ones the pool hosts)."""

    round_idx: int
    participants: list[int]
    total_weight: int  # training samples of all of the round's participants, over every pool
    population_weight: int  # training samples of all clients, participating or not
    evaluate: bool  # score each trained model on its client's test set (acc_before)
    frozen: tuple[str, ...] = ()  # parameters no client trains or uploads (handout: freeze)


@dataclass
class TrainReply:
    """A pool's exact partial sums, one per part the algorithm aggregates, and per-client rows
    (client, n_train, loss, up_bytes: what it uploads, acc_before when evaluated)."""

    sums: dict[str, FixedSum]
    clients: list[dict[str, Any]]
    # what each trained client sent individually (ClientUpdate.individual), on the CPU
    individual: dict[int, dict[str, Tensors]] = field(default_factory=dict)


@dataclass(frozen=True)
class HandoutRequest:
    """After round ``round_idx``: take the new global model, hand it out with ``density``, and
    score what these clients now hold (and the global model on the test split).
    ``receivers``: the clients handed the new model, whose download the reply counts.
    ``personal``: what the algorithm's ``personalise`` gave this pool's clients, each put in
    its store slot ``personalised_slot`` first (and counted in its download)."""

    round_idx: int
    density: float
    eval_clients: list[int]
    eval_test: bool
    receivers: list[int] = field(default_factory=list)
    personal: dict[int, Tensors] = field(default_factory=dict)


@dataclass
class HandoutReply:
    clients: list[dict[str, Any]] = field(default_factory=list)  # client, acc_global, acc_after
    acc_test: float | None = None
    # per receiver: client, down_bytes (as handed), down_bytes_dense (were it dense)
    traffic: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class StatePartRequest:
    """A pool's share of one checkpoint part: these (slot, client) entries, written by the
    pool itself to ``file`` when given (it sees the checkpoint folder), else sent back."""

    keys: list[tuple[str, int]]
    file: str | None = None


@dataclass
class StatePartReply:
    nbytes: int = 0  # of the file the pool wrote
    entries: dict[str, dict[int, Tensors]] | None = None  # when it wrote none


@dataclass(frozen=True)
class PoolDevice:
    """Where a pool runs and what it trains on, as it sees it from inside.

    ``device``: ``cpu`` or e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)``; ``gpu_ids``: the GPUs Ray
    assigned to the pool (empty without Ray or without GPUs); ``cuda_visible_devices``: that
    variable in the pool's process (``None`` when unset); ``threads``: torch's threads while
    the pool trains.
    """

    pool: int
    node: str  # host name
    ip: str | None  # the node's address as Ray knows it; None in one process without Ray
    pid: int
    device: str
    gpu_ids: list[str]
    cuda_visible_devices: str | None
    threads: int

    def location(self) -> str:
        """How error messages name the pool's process."""
        return f"pid {self.pid} on {self.node}"


@dataclass(frozen=True)
class PoolCall:
    """One step for every pool of a group: ``method``, a ``ClientPool`` method (called on each
    pool in this process, or by its name on each pool's actor), with pool i's own argument
    ``each[i]`` (when given) and then the arguments all pools share. ``kind`` names the step
    in a hung pool's message and its deadline; ``work``: the client-epochs of the busiest pool,
    where the step trains (see ``ray_actors.CallDeadlines``)."""

    method: Callable[..., Any]
    kind: str
    each: Sequence[Any] | None = None
    shared: tuple[Any, ...] = ()
    work: float = 0.0

    @property
    def name(self) -> str:
        """The method's name: what a pool's actor is called by."""
        return self.method.__name__

    def arguments(self, pools: int) -> list[tuple[Any, ...]]:
        """Each pool's arguments, in pool order."""
        if self.each is None:
            return [self.shared] * pools
        if len(self.each) != pools:
            raise ValueError(f"{self.kind}: {len(self.each)} requests for {pools} pools")
        return [(own, *self.shared) for own in self.each]
