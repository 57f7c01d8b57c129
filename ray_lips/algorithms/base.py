"""The algorithm interface: what a federated algorithm decides, and nothing the engine does.

An algorithm is one class that declares everything about itself (its ``name``, its config
section ``Options``, its ``label`` in reports, whether it has a global model, whether LIPS's
sparse hand-out may compose with it, the client-state slots it keeps) and has two sides:

- client (runs in the pool that hosts the client): :meth:`Algorithm.train` trains a group of
  participants through the round's trainer and returns, per client, the tensors to aggregate;
  :meth:`Algorithm.held_state` is the model a client holds between rounds (what ``acc_after``
  and fine-tuning use). What a round offers it is a :class:`ClientRound`, nothing more; what a
  client keeps between rounds lives in its :class:`~ray_lips.pools.client_store.ClientStore`.
- server (runs in the driver): :meth:`Algorithm.server_message` is what a round sends to the
  pools besides the model, and :meth:`Algorithm.aggregate` turns the averaged parts into the next
  global state (and server state).
- one client at a time (optional, FedCAC): a client may also send tensors the server sees as
  its own, not summed (:attr:`ClientUpdate.individual`); the server's
  :meth:`Algorithm.personalise` turns them into tensors for each client, which reach that
  client's store slot (``personalised_slot``) with the round's hand-out, before the pool scores
  what its clients hold.

An algorithm is built from its own options and the run's local-training settings
(:class:`~ray_lips.training.spec.LocalSettings`), never the whole config. Aggregation itself is
the engine's: every part a client returns is summed on the exact fixed-point grid with the
weight the algorithm gives it, so an algorithm never sees how clients were split into pools.
The hand-out (dense, or LIPS's sparse copy) is a separate step: the algorithm asks the round for
the model handed to a client and never knows which hand-out made it.

This module imports no torch (nor do the algorithm modules at import): the config schema is
built from the algorithms' declarations before torch loads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from ray_lips.training.spec import (
    Correction,
    LocalResult,
    LocalSettings,
    LossTerm,
    Phase,
    TermBatch,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ray_lips.pools.client_store import ClientStore

Tensors = Mapping[str, "torch.Tensor"]
MODEL = "model"  # the part every global-model algorithm aggregates: the clients' trained models

# What a client predicts with: an algorithm's ``family`` (reports group methods by it, in order)
GLOBAL_MODEL = "global model"  # the global model, as handed to it
GLOBAL_BODY = "global body, personal parts"  # an averaged body with parts of its own
PERSONAL_MODELS = "personal models"  # a model of its own, never the averaged one
FAMILIES = (GLOBAL_MODEL, GLOBAL_BODY, PERSONAL_MODELS)

__all__ = ["FAMILIES", "GLOBAL_BODY", "GLOBAL_MODEL", "MODEL", "PERSONAL_MODELS", "Algorithm",
           "AlgorithmOptions", "ClientRound", "ClientUpdate", "ClientView", "Correction",
           "LocalResult", "LocalSettings", "LocalWork", "LossTerm", "Phase", "Tensors",
           "TermBatch", "TrainJob", "Trained", "Trainer"]


class AlgorithmOptions(BaseModel):
    """An algorithm's config section (the keys under its ``name``); no keys by default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class LocalWork:
    """One client's local training in one round, in local epochs: passes over the client's
    training data, each a forward and a backward pass of the model (``epochs``), and in words
    what differs from that (``detail``: a partial model, extra forward passes)."""

    epochs: float
    detail: str = ""  # e.g. "10 head + 1 body", "+2 forward passes of frozen models"

    def __str__(self) -> str:
        count = f"{self.epochs:g}"
        return f"{count} ({self.detail})" if self.detail else count


@dataclass(frozen=True)
class TrainJob:
    """One client's local training: where it starts, what corrects its gradient, and what the
    algorithm asks of it beyond the run's local training.

    ``loss_term`` and ``phases`` are the seams of local objectives that are not a gradient
    correction (a loss on outputs or representations; training some parameters in some
    epochs). Batched groups train phases (the jobs of a group share them, as their stream and
    epochs); a job with a loss term trains one client at a time (:attr:`one_at_a_time`).
    """

    client: int
    start: Tensors
    correction: Correction | None = None
    stream: str = "local"  # its random stream of batch order and augmentation: or "personal"
    epochs: int | None = None  # None: the run's train.local_epochs
    remember: tuple[str, ...] = ()  # parameters whose last-batch gradient comes back
    loss_term: LossTerm | None = None  # added to the cross-entropy at every step
    phases: tuple[Phase, ...] = ()  # given: these phases in place of ``epochs`` of everything
    frozen: frozenset[str] = frozenset()  # parameters no phase trains (``handout: freeze``)
    remember_mean: bool = False  # the remembered gradient: the last epoch's mean, not last batch

    def plan(self, epochs: int, parameters: Sequence[str]) -> tuple[Phase, ...]:
        """The phases the trainer runs: :attr:`phases` (none: ``epochs`` epochs of all of
        ``parameters``, the model's) with the :attr:`frozen` parameters taken out of each;
        :attr:`phases` itself when nothing is frozen."""
        if not self.frozen:
            return self.phases
        plan = []
        for phase in self.phases or (Phase(epochs),):
            names = parameters if phase.trainable is None else phase.trainable
            kept = tuple(name for name in names if name not in self.frozen)
            if not kept:
                raise ValueError(f"client {self.client}: every parameter a phase of its local "
                                 "training trains is frozen (handout: freeze); this algorithm "
                                 "cannot be combined with freezing")
            plan.append(Phase(phase.epochs, kept))
        return tuple(plan)

    @property
    def one_at_a_time(self) -> bool:
        """Whether the job needs the one-at-a-time path (batched groups have no loss term)."""
        return self.loss_term is not None


@dataclass
class Trained:
    """What a trainer gives back for one job."""

    client: int
    result: LocalResult
    state: dict[str, torch.Tensor]
    accuracy: float | None = None  # on the client's own test set, when asked for


class Trainer(Protocol):
    """Local training and evaluation of a pool's clients: one at a time, or batched groups
    (whose jobs share a stream, epochs and remembered parameters)."""

    def train(self, jobs: list[TrainJob], round_idx: int,
              evaluate: bool = False) -> list[Trained]: ...

    def accuracy(self, clients: list[int], states: list[Tensors]) -> list[float]: ...


@dataclass(frozen=True)
class ClientView:
    """What an algorithm may read of a pool's clients at any time: the model each was handed
    (dense, or its sparse copy), the global model the pool holds, and the clients' store."""

    store: ClientStore
    global_state: Tensors
    handed: Callable[[int], Tensors]  # handed(client): the global model as handed to it


@dataclass(frozen=True)
class ClientRound(ClientView):
    """What one round offers an algorithm's client side in one pool."""

    round_idx: int
    message: Mapping[str, Tensors]  # what the algorithm's server side sent (server_message)
    trainer: Trainer
    samples: Callable[[int], int]  # samples(client): its training samples
    total_weight: int  # training samples of all of this round's participants, over every pool
    population_weight: int  # training samples of all clients
    evaluate: bool  # score each trained model on its client's test set (acc_before)
    remember: tuple[str, ...] = ()  # parameters whose last-batch gradient the hand-out keeps
    class_counts: Callable[[int], tuple[int, ...]] | None = None  # a client's training labels
    frozen: frozenset[str] = frozenset()  # parameters no client trains this round (freeze)
    remember_mean: bool = False  # the remembered gradient is the last epoch's mean (epoch_mean)

    def job(self, client: int, start: Tensors, correction: Correction | None = None,
            loss_term: LossTerm | None = None, phases: tuple[Phase, ...] = ()) -> TrainJob:
        """The round's training of ``client`` (with the gradients the hand-out needs, and
        without the parameters frozen this round, whatever ``phases`` ask)."""
        return TrainJob(client, start, correction, remember=self.remember,
                        loss_term=loss_term, phases=phases, frozen=self.frozen,
                        remember_mean=self.remember_mean)


@dataclass
class ClientUpdate:
    """One client's result: the parts to aggregate, each with its weight, and its metrics."""

    client: int
    loss: float
    parts: dict[str, tuple[Tensors, float]] = field(default_factory=dict)
    last_grads: dict[str, torch.Tensor] | None = None  # for the hand-out (LIPS)
    acc_before: float | None = None
    # tensors the server sees as this client's own, by part name, never summed (FedCAC's model
    # and critical mask); a tensor that is also in ``parts`` (the same object) uploads once
    individual: dict[str, Tensors] | None = None


class Algorithm:
    """Base class: FedAvg's behaviour where a subclass does not say otherwise.

    A subclass sets ``name`` (the config's ``algorithm`` value and the name of its section),
    and may set ``Options`` (its section), ``label``, ``family``, ``has_global_model``,
    ``sparse_handout``, ``client_slots``, ``personalised_slot`` and ``order``, and override
    :meth:`local_work`.

    ``family`` is what a client predicts with: the global model (:data:`GLOBAL_MODEL`), an
    averaged body with parts of its own (:data:`GLOBAL_BODY`), or a model of its own
    (:data:`PERSONAL_MODELS`).

    Local entries: a subclass that sets ``self.local`` (state-dict names, in ``__init__``) and
    ``local_slot`` (one of its ``client_slots``) keeps those entries on the client: they are
    never sent to the server, each client's trained values are kept in its store and laid over
    the model it is handed, for where it starts training and for the model it holds. The global
    model's copy of them is never aggregated: it stays at its initial value.
    """

    name: ClassVar[str]
    label: ClassVar[str] = ""  # how documentation and help name it, e.g. "FedProx"
    family: ClassVar[str] = GLOBAL_MODEL  # what a client predicts with: one of FAMILIES
    Options: ClassVar[type[AlgorithmOptions]] = AlgorithmOptions  # its config section
    has_global_model: ClassVar[bool] = True  # False: acc_global and acc_test are NaN
    sparse_handout: ClassVar[bool] = True  # whether LIPS's hand-out may be composed with it
    sparse_handout_conflict: ClassVar[str] = ""  # why not, when it may not (for the error)
    client_slots: ClassVar[tuple[str, ...]] = ()  # the ClientStore slots its clients keep
    order: ClassVar[int] = 100  # its place in lists, tables and figures (then by name)
    local_slot: ClassVar[str] = ""  # the client-state slot of its local entries, if any
    personalised_slot: ClassVar[str] = ""  # the slot what personalise() returns a client goes to

    def __init__(self, options: AlgorithmOptions, settings: LocalSettings, model: nn.Module):
        """``options``: its section; ``settings``: the run's local training; ``model``: the
        architecture (read for its parameter and layer names, not kept)."""
        self.options = options
        self.settings = settings
        self.parameter_names = [name for name, _ in model.named_parameters()]
        self.local: frozenset[str] = frozenset()  # state entries that never leave a client

    @classmethod
    def local_work(cls, options: AlgorithmOptions, settings: LocalSettings) -> LocalWork:
        """A participant's local training per round (FedAvg: ``train.local_epochs`` of the
        whole model)."""
        return LocalWork(settings.epochs)

    @classmethod
    def measures_body(cls) -> bool:
        """Whether the run measures the averaged entries' layer inertia (``layers.parquet``):
        where there is a global model, or a global body LIPS's hand-out may sparsify."""
        return cls.has_global_model or cls.sparse_handout

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

    def personalise(self, individual: Mapping[int, Mapping[str, Tensors]], global_state: Tensors,
                    round_idx: int, server_state: Tensors) -> dict[int, dict[str, torch.Tensor]]:
        """What each client gets of its own after round ``round_idx`` (FedCAC: its customised
        model), from what every participant sent individually (``individual``: client -> its
        :attr:`ClientUpdate.individual`, in client order, on the CPU) and the new global state.
        Called by the driver after :meth:`aggregate`, only in rounds where some participant
        sent something individually; each client's result is put in its store slot
        ``personalised_slot`` (replacing what was there) with the round's hand-out. Default:
        nothing."""
        return {}

    # ----- client side --------------------------------------------------------------------
    def train(self, round: ClientRound, clients: list[int]) -> list[ClientUpdate]:
        """Train ``clients`` (a group the trainer may batch) from the model handed to them."""
        jobs = []
        for client in clients:
            start = self.start_state(round, client)
            jobs.append(round.job(client, start, self.correction(round, client, start)))
        done = round.trainer.train(jobs, round.round_idx, evaluate=round.evaluate)
        return [self.update(round, job, trained) for job, trained in zip(jobs, done, strict=True)]

    def start_state(self, round: ClientRound, client: int) -> Tensors:
        """Where ``client``'s local training starts: the model it was handed (with its local
        entries laid over it)."""
        return self.held_state(round, client) if self.local else round.handed(client)

    def correction(self, round: ClientRound, client: int, start: Tensors) -> Correction | None:
        """The gradient correction of ``client``'s local objective (none for FedAvg)."""
        return None

    def update(self, round: ClientRound, job: TrainJob, trained: Trained) -> ClientUpdate:
        """What one trained client returns: its model, weighted by its share of the samples."""
        weight = round.samples(job.client) / round.total_weight
        if self.local:
            round.store.put(job.client, self.local_slot,
                            {k: v for k, v in trained.state.items() if k in self.local})
        return ClientUpdate(job.client, trained.result.loss,
                            {MODEL: (self.shared(trained.state), weight)},
                            trained.result.last_grads, trained.accuracy)

    def shared(self, state: Tensors) -> Tensors:
        """The entries of a client's model that go to the server: all but its local ones."""
        if not self.local:
            return state
        return {k: v for k, v in state.items() if k not in self.local}

    def held_state(self, view: ClientView, client: int) -> Tensors:
        """The model ``client`` holds between rounds: what it was handed, with its local
        entries (once it has trained) laid over it."""
        kept = view.store.get(client, self.local_slot) if self.local else None
        handed = view.handed(client)
        if kept is None:
            return handed
        return {**handed, **{k: v.to(handed[k].device) for k, v in kept.items()}}  # spilled: CPU
