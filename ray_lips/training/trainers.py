"""Local training of a pool's clients: one at a time (``SerialTrainer``) or as batched groups
(``GroupTrainer``, see :mod:`ray_lips.training.batched`). Both train a list of jobs with the same
per-client randomness, so an algorithm never knows which one runs it. What a job asks beyond the
run's local training (a random stream, other epochs, gradients to remember) is on the job
(:class:`~ray_lips.algorithms.base.TrainJob`)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from ray_lips.algorithms.base import Tensors, Trained, TrainJob
from ray_lips.core.seeding import torch_generator
from ray_lips.pools.payload import ClientShard
from ray_lips.training.batched import ClientGroup
from ray_lips.training.local import LocalSettings, Normalisation, accuracy, local_train

# The random streams of local training: (batch order, augmentation) purposes per stream.
STREAM_PURPOSES = {"local": ("batches", "augment"),
                   "personal": ("personal_batches", "personal_augment")}


def stream_generators(seed: int, stream: str, client: int,
                      round_idx: int) -> tuple[torch.Generator, torch.Generator]:
    """The batch-order and augmentation generators of ``client`` in ``round_idx``; the final
    fine-tuning (``"finetune"``) has one pair per client."""
    if stream == "finetune":
        return (torch_generator(seed, "finetune", client, 0),
                torch_generator(seed, "finetune", client, 1))
    if stream not in STREAM_PURPOSES:
        raise ValueError(f"no random stream {stream!r}; a job trains with one of "
                         f"{', '.join(STREAM_PURPOSES)}")
    batches, augment = STREAM_PURPOSES[stream]
    return (torch_generator(seed, batches, client, round_idx),
            torch_generator(seed, augment, client, round_idx))


def _owned(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy that later training cannot overwrite (trainers reuse their model's storage)."""
    return {k: v.detach().clone() for k, v in state.items()}


class Stopwatch:
    """Wall seconds per activity ("train", "evaluate"), for benchmarks."""

    def __init__(self) -> None:
        self.seconds = {"train": 0.0, "evaluate": 0.0}

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - started


class SerialTrainer:
    """One client at a time through :func:`ray_lips.training.local.local_train`."""

    def __init__(self, model: nn.Module, shards: Mapping[int, ClientShard],
                 settings: LocalSettings, norm: Normalisation, seed: int,
                 stopwatch: Stopwatch):
        self.model, self.shards, self.settings = model, shards, settings
        self.norm, self.seed, self.timed = norm, seed, stopwatch
        self._loaded: Tensors | None = None  # the state the model holds, to skip reloads
        self.parameters = tuple(name for name, _ in model.named_parameters())

    def _load(self, state: Tensors) -> None:
        if state is not self._loaded:
            self.model.load_state_dict(state)
            self._loaded = state

    def model_changed(self) -> None:
        """Someone else loaded or trained the shared model: load the next state afresh."""
        self._loaded = None

    def train(self, jobs: list[TrainJob], round_idx: int,
              evaluate: bool = False) -> list[Trained]:
        out = []
        for job in jobs:
            shard = self.shards[job.client]
            self._load(job.start)
            self.model_changed()  # training changes the model
            batch_gen, augment_gen = stream_generators(self.seed, job.stream, job.client,
                                                       round_idx)
            settings = _settings(self.settings, job)
            with self.timed("train"):
                result = local_train(self.model, shard.x_train, shard.y_train, settings,
                                     self.norm, batch_gen=batch_gen, augment_gen=augment_gen,
                                     remember=list(job.remember), correction=job.correction,
                                     loss_term=job.loss_term,
                                     phases=job.plan(settings.epochs, self.parameters),
                                     remember_mean=job.remember_mean)
            acc = None
            if evaluate:
                with self.timed("evaluate"):
                    acc = accuracy(self.model, shard.x_test, shard.y_test, self.norm)
            out.append(Trained(job.client, result, _owned(self.model.state_dict()), acc))
        return out

    def accuracy(self, clients: list[int], states: list[Tensors]) -> list[float]:
        """Each client's model scored on its own test set."""
        out = []
        for client, state in zip(clients, states, strict=True):
            self._load(state)
            shard = self.shards[client]
            out.append(accuracy(self.model, shard.x_test, shard.y_test, self.norm))
        return out

    def accuracy_on(self, state: Tensors, x: torch.Tensor, y: torch.Tensor) -> float:
        self._load(state)
        return accuracy(self.model, x, y, self.norm)


class GroupTrainer:
    """Groups of up to ``group_size`` clients with equal train and test sizes, trained at once;
    every group has exactly ``group_size`` slots, a short one padded with throw-away copies of
    its first job, so a client's numbers do not depend on who shares its group.

    A job with a seam batched groups do not have (a loss term:
    :attr:`TrainJob.one_at_a_time`) is trained one at a time by ``fallback`` (the pool's
    :class:`SerialTrainer` on the same model), and the pool says so once."""

    def __init__(self, model: nn.Module, shards: Mapping[int, ClientShard],
                 settings: LocalSettings, norm: Normalisation, seed: int, group_size: int,
                 stopwatch: Stopwatch, fallback: SerialTrainer | None = None):
        self.model, self.shards, self.settings = model, shards, settings
        self.norm, self.seed, self.group_size, self.timed = norm, seed, group_size, stopwatch
        self._group: ClientGroup | None = None
        self.fallback = fallback or SerialTrainer(model, shards, settings, norm, seed, stopwatch)
        self._said_serial = False
        self.parameters = tuple(name for name, _ in model.named_parameters())

    @property
    def group(self) -> ClientGroup:
        if self._group is None:
            self._group = ClientGroup(self.model, self.group_size)
        return self._group

    def _padded(self, items: list) -> list:
        if not 0 < len(items) <= self.group_size:
            raise ValueError(f"a group holds 1 to {self.group_size} clients, got {len(items)}")
        return items + items[:1] * (self.group_size - len(items))

    def train(self, jobs: list[TrainJob], round_idx: int,
              evaluate: bool = False) -> list[Trained]:
        serial = [job for job in jobs if job.one_at_a_time]
        if not serial:
            return self._train_group(jobs, round_idx, evaluate)
        if not self._said_serial:
            self._said_serial = True
            warnings.warn("train.batched: this algorithm's local objective (a loss term) has "
                          "no batched form; its clients train one at a time", stacklevel=2)
        done = {id(job): trained for job, trained in
                zip(serial, self.fallback.train(serial, round_idx, evaluate), strict=True)}
        grouped = [job for job in jobs if not job.one_at_a_time]
        if grouped:
            done |= {id(job): trained for job, trained in
                     zip(grouped, self._train_group(grouped, round_idx, evaluate), strict=True)}
        return [done[id(job)] for job in jobs]

    def _train_group(self, jobs: list[TrainJob], round_idx: int,
                     evaluate: bool) -> list[Trained]:
        slots = self._padded(jobs)
        first = jobs[0]
        if any((j.stream, j.epochs, j.remember, j.phases, j.frozen, j.remember_mean)
               != (first.stream, first.epochs, first.remember, first.phases, first.frozen,
                   first.remember_mean) for j in jobs):
            raise ValueError("the jobs of a batched group need one stream, epochs, phases, "
                             "frozen and remembered parameters")
        shards = [self.shards[j.client] for j in slots]
        group = self.group
        group.load([j.start for j in slots])
        gens = [stream_generators(self.seed, j.stream, j.client, round_idx) for j in slots]
        settings = _settings(self.settings, first)
        with self.timed("train"):
            results = group.train(torch.stack([s.x_train for s in shards]),
                                  torch.stack([s.y_train for s in shards]),
                                  settings, self.norm,
                                  batch_gens=[g[0] for g in gens],
                                  augment_gens=[g[1] for g in gens],
                                  remember=list(first.remember),
                                  corrections=[j.correction for j in slots],
                                  phases=first.plan(settings.epochs, self.parameters),
                                  remember_mean=first.remember_mean)
        accs: list[float | None] = [None] * len(slots)
        if evaluate:
            with self.timed("evaluate"):
                accs = self._group_accuracy(shards)
        states = group.states()
        return [Trained(job.client, results[k], _owned(states[k]), accs[k])
                for k, job in enumerate(jobs)]

    def _group_accuracy(self, shards: list[ClientShard]) -> list[float]:
        return self.group.accuracy(torch.stack([s.x_test for s in shards]),
                                   torch.stack([s.y_test for s in shards]), self.norm)

    def accuracy(self, clients: list[int], states: list[Tensors]) -> list[float]:
        self.group.load(self._padded(list(states)))
        shards = [self.shards[c] for c in self._padded(list(clients))]
        return self._group_accuracy(shards)[:len(clients)]


def _settings(settings: LocalSettings, job: TrainJob) -> LocalSettings:
    """The run's local-training settings with the job's own epochs, if it asks for others."""
    return settings if job.epochs is None else replace(settings, epochs=job.epochs)
