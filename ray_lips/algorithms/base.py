"""The algorithm interface: what a federated algorithm decides, and nothing the engine does.

An algorithm has a client side and a server side:

- client (runs in the pool that hosts the client): :meth:`Algorithm.train` trains a group of
  participants through the pool's trainer and returns, per client, the tensors to aggregate;
  :meth:`Algorithm.held_state` is the model a client holds between rounds (what ``acc_after``
  and fine-tuning use). What a client keeps between rounds lives in the pool's
  :class:`~ray_lips.pools.client_store.ClientStore`.
- server (runs in the driver): :meth:`Algorithm.server_message` is what a round sends to the
  pools besides the model, and :meth:`Algorithm.aggregate` turns the averaged parts into the next
  global state (and server state).

Aggregation itself is the engine's: every part a client returns is summed on the exact
fixed-point grid with the weight the algorithm gives it, so an algorithm never sees how
clients were split into pools. The hand-out (dense, or LIPS's sparse copy) is a separate step,
:class:`~ray_lips.algorithms.handouts.dense.Handout`: the algorithm asks the context for the model
handed to a client and never knows which hand-out made it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn

from ray_lips.training.local import Correction, LocalResult

if TYPE_CHECKING:
    from ray_lips.config import ExperimentConfig
    from ray_lips.pools.client_store import ClientStore

Tensors = Mapping[str, torch.Tensor]
MODEL = "model"  # the part every global-model algorithm aggregates: the clients' trained models


@dataclass
class TrainJob:
    """One client's local training: where it starts and what corrects its gradient."""

    client: int
    start: Tensors
    correction: Correction | None = None


@dataclass
class Trained:
    """What a trainer gives back for one job."""

    client: int
    result: LocalResult
    state: dict[str, torch.Tensor]
    accuracy: float | None = None  # on the client's own test set, when asked for


class Trainer(Protocol):
    """Local training and evaluation of a pool's clients: one at a time, or batched groups."""

    def train(self, jobs: list[TrainJob], round_idx: int, stream: str = "local",
              remember: list[str] | None = None, evaluate: bool = False,
              epochs: int | None = None) -> list[Trained]: ...

    def accuracy(self, clients: list[int], states: list[Tensors]) -> list[float]: ...


class ClientContext(Protocol):
    """What the pool offers an algorithm's client side."""

    trainer: Trainer
    store: ClientStore
    remember: list[str] | None  # parameters whose last-batch gradient the hand-out needs
    global_state: dict[str, torch.Tensor]
    total_weight: int  # training samples of all of this round's participants
    population_weight: int  # training samples of all clients

    def handed(self, client: int) -> Tensors:
        """The global model as handed to ``client`` (dense, or its sparse copy)."""
        ...

    def samples(self, client: int) -> int: ...


@dataclass
class ClientUpdate:
    """One client's result: the parts to aggregate, each with its weight, and its metrics."""

    client: int
    loss: float
    parts: dict[str, tuple[Tensors, float]] = field(default_factory=dict)
    last_grads: dict[str, torch.Tensor] | None = None  # for the hand-out (LIPS)
    acc_before: float | None = None


class Algorithm:
    """Base class: FedAvg's behaviour where a subclass does not say otherwise."""

    name: ClassVar[str]
    has_global_model: ClassVar[bool] = True  # False: acc_global and acc_test are NaN
    sparse_handout: ClassVar[bool] = True  # whether LIPS's hand-out may be composed with it
    client_slots: ClassVar[tuple[str, ...]] = ()  # the ClientStore slots its clients keep

    def __init__(self, cfg: ExperimentConfig, model: nn.Module):
        """``model``: the architecture (read for its parameter and layer names, not kept)."""
        self.cfg = cfg
        self.parameter_names = [name for name, _ in model.named_parameters()]

    # ----- server side --------------------------------------------------------------------
    def init_server_state(self, global_state: Tensors) -> dict[str, torch.Tensor]:
        """State the server keeps besides the global model (checkpointed)."""
        return {}

    def server_message(self, server_state: Tensors) -> dict[str, Tensors]:
        """What a round sends to every pool besides the model, by name."""
        return {}

    def aggregate(self, global_state: Tensors, averages: Mapping[str, Tensors],
                  server_state: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The next global state and server state from the weighted sums of the parts
        (FedAvg: the clients' average replaces every entry it holds)."""
        return {**global_state, **averages[MODEL]}, dict(server_state)

    # ----- client side --------------------------------------------------------------------
    def train(self, ctx: ClientContext, clients: list[int], round_idx: int,
              message: Mapping[str, Tensors], evaluate: bool) -> list[ClientUpdate]:
        """Train ``clients`` (a group the trainer may batch) from the model handed to them."""
        jobs = []
        for client in clients:
            start = self.start_state(ctx, client)
            jobs.append(TrainJob(client, start, self.correction(ctx, client, start, message)))
        done = ctx.trainer.train(jobs, round_idx, remember=ctx.remember, evaluate=evaluate)
        return [self.update(ctx, job, trained, message)
                for job, trained in zip(jobs, done, strict=True)]

    def start_state(self, ctx: ClientContext, client: int) -> Tensors:
        """Where ``client``'s local training starts: the model it was handed."""
        return ctx.handed(client)

    def correction(self, ctx: ClientContext, client: int, start: Tensors,
                   message: Mapping[str, Tensors]) -> Correction | None:
        """The gradient correction of ``client``'s local objective (none for FedAvg)."""
        return None

    def update(self, ctx: ClientContext, job: TrainJob, trained: Trained,
               message: Mapping[str, Tensors]) -> ClientUpdate:
        """What one trained client returns: its model, weighted by its share of the samples."""
        weight = ctx.samples(job.client) / ctx.total_weight
        return ClientUpdate(job.client, trained.result.loss,
                            {MODEL: (self.shared(trained.state), weight)},
                            trained.result.last_grads, trained.accuracy)

    def shared(self, state: Tensors) -> Tensors:
        """The entries of a client's model that go to the server (all; FedPer keeps its
        head)."""
        return state

    def held_state(self, ctx: ClientContext, client: int) -> Tensors:
        """The model ``client`` holds between rounds: what it was handed."""
        return ctx.handed(client)
