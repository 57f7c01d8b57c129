"""A client pool: hosts pinned clients, trains them, and builds their hand-outs.

Plain Python; ``ray.remote(ClientPool)`` makes it an actor. A pool keeps, per client, only what
the method needs between rounds: the last-batch gradient of the eligible layers (for LIPS with a
gradient-based scorer). The hand-out model of a client is built when it is needed, from the one
global model the pool holds.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ray_lips.aggregate import DivergenceError, FixedSum, add_client
from ray_lips.allocator import keep_buffers_in_heap
from ray_lips.batched import ClientGroup, supports
from ray_lips.config import ExperimentConfig
from ray_lips.memory import current_rss_mb, peak_rss_mb
from ray_lips.models import build_model, eligible_parameter_names
from ray_lips.seeding import torch_generator
from ray_lips.sparsify import GRADIENT_SCORERS, sparsify_state
from ray_lips.training import (
    LocalResult,
    LocalSettings,
    Normalisation,
    accuracy,
    local_train,
    recalibrate_batchnorm,
)


@dataclass
class ClientShard:
    client: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device) -> ClientShard:
        return ClientShard(self.client, *(t.to(device) for t in
                                          (self.x_train, self.y_train, self.x_test, self.y_test)))


@dataclass
class PackedShards:
    """A pool's clients' data as one tensor per field: client k's rows follow client k-1's.

    Ten thousand small clients travel to a pool as four buffers, not 40,000 tensors.
    """

    clients: list[int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_sizes: list[int]
    test_sizes: list[int]

    @classmethod
    def from_shards(cls, shards: list[ClientShard]) -> PackedShards:
        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(s, name) for s in shards])

        return cls([s.client for s in shards], cat("x_train"), cat("y_train"), cat("x_test"),
                   cat("y_test"), [int(s.x_train.shape[0]) for s in shards],
                   [int(s.x_test.shape[0]) for s in shards])

    def shards(self) -> list[ClientShard]:
        """One shard per client, its tensors views into the packed ones."""
        fields = (self.x_train.split(self.train_sizes), self.y_train.split(self.train_sizes),
                  self.x_test.split(self.test_sizes), self.y_test.split(self.test_sizes))
        return [ClientShard(client, *parts)
                for client, *parts in zip(self.clients, *fields, strict=True)]


@dataclass
class PoolPayload:
    """What the driver ships to one pool (once, through the object store)."""

    pool_id: int
    data: PackedShards
    norm: Normalisation
    sample_shape: tuple[int, ...]
    num_classes: int
    test_split: tuple[torch.Tensor, torch.Tensor] | None = None  # global test subset, pool 0

    @property
    def shards(self) -> list[ClientShard]:
        return self.data.shards()


def pick_device(gpus_per_pool: float) -> torch.device:
    if gpus_per_pool > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def local_settings(cfg: ExperimentConfig, epochs: int | None = None) -> LocalSettings:
    t = cfg.train
    return LocalSettings(epochs=t.local_epochs if epochs is None else epochs,
                         batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                         weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                         precision=t.precision)


GPU_BATCH_CLIENTS = 32  # cap of a batched group on CUDA when train.batch_clients is "auto"


def batch_clients(cfg: ExperimentConfig, device: torch.device) -> int:
    """Slots per batched group: the same for every pool and round of a run.

    Derived from the config and the device type alone (never from how many clients a pool
    hosts), so a client's group has the same shape whatever the pool count, and batched results
    do not depend on it. Participants are split into the fewest groups of at most
    ``train.batch_clients`` and the group size balanced over them (100 participants, cap 32:
    4 groups of 25). ``"auto"``: 1 on CPU, where grouped convolutions cost more per client than
    dense ones (the batched path then trains one client at a time, channels-last; see
    benchmarks/README.md), and a cap of 32 on CUDA.
    """
    cap = getattr(cfg.train, "batch_clients", "auto")
    if cap == "auto":
        if device.type == "cpu":
            return 1
        cap = GPU_BATCH_CLIENTS
    clients = cfg.data.clients
    participants = (clients if cfg.train.participation >= 1.0
                    else max(1, round(cfg.train.participation * clients)))
    groups = math.ceil(participants / int(cap))
    return max(1, math.ceil(participants / groups))


def wants_batched(cfg: ExperimentConfig, model: torch.nn.Module) -> bool:
    """``train.batched``: true, false, or "auto": the batched path whenever the model supports
    it. On CPU its default groups of one client, channels-last, made rounds 1.2-1.4x faster
    than ``local_train`` (NCHW) (benchmarks/README.md); on CUDA grouping is what pays."""
    choice = cfg.train.batched
    if choice is False:
        return False
    if not supports(model):
        if choice is True:
            warnings.warn(f"train.batched: model {cfg.model!r} cannot be trained as a batched "
                          "group; training its clients one at a time", stacklevel=2)
        return False
    return True


@dataclass
class _Trained:
    client: int
    result: LocalResult
    state: dict[str, torch.Tensor]
    acc_before: float | None


class ClientPool:
    def __init__(self, config: dict[str, Any], payload: PoolPayload, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        keep_buffers_in_heap()
        self.cfg = ExperimentConfig.model_validate(config)
        self.device = pick_device(self.cfg.resources.gpus_per_pool)
        self.pool_id = payload.pool_id
        self.norm = payload.norm
        self.num_classes = payload.num_classes
        self.shards = {s.client: s.to(self.device) for s in payload.shards}
        self.test_split = (tuple(t.to(self.device) for t in payload.test_split)
                           if payload.test_split is not None else None)
        self.model = build_model(self.cfg.model, payload.sample_shape, payload.num_classes)
        self.model.to(self.device)
        self.eligible = eligible_parameter_names(self.model)
        lips = self.cfg.lips
        self.sparse = self.cfg.algorithm == "lips"
        self.remember = (self.eligible if self.sparse and lips.scorer in GRADIENT_SCORERS
                         else None)
        self.global_state: dict[str, torch.Tensor] = {}
        self.density = 1.0
        self.handout_round = -1
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.batched = wants_batched(self.cfg, self.model)
        self.group_size = batch_clients(self.cfg, self.device)
        self._group: ClientGroup | None = None
        self.seconds = {"train": 0.0, "evaluate": 0.0}  # wall time, for benchmarks

    # ----- the hand-out -----------------------------------------------------------------
    def clients(self) -> list[int]:
        return sorted(self.shards)

    def handout_state(self, client: int) -> dict[str, torch.Tensor]:
        """The model client ``client`` holds after the latest hand-out."""
        if not self.sparse or self.density >= 1.0:
            return self.global_state
        grads = self.grads.get(client)
        if self.remember is not None and grads is None:
            return self.global_state  # did not train in that round: it gets the dense model
        generator = None
        if self.cfg.lips.scorer == "random":
            generator = torch_generator(self.cfg.seed, "scorer", client, self.handout_round)
        return sparsify_state(self.global_state, self.eligible, self.density,
                              self.cfg.lips.scorer, grads, generator)

    def _is_sparse_for(self, client: int) -> bool:
        return self.handout_state(client) is not self.global_state

    def set_global(self, round_idx: int, state: dict[str, torch.Tensor], density: float) -> None:
        self.global_state = {k: v.to(self.device) for k, v in state.items()}
        self.density = density
        self.handout_round = round_idx

    # ----- one round --------------------------------------------------------------------
    def train_round(self, round_idx: int, participants: list[int], total_weight: int,
                    evaluate: bool) -> dict[str, Any]:
        """Train the participants hosted here; return their weighted fixed-point sum."""
        train = self._train_batched if self.batched else self._train_serial
        fixed: FixedSum | None = None
        rows, new_grads = {}, {}
        for done in train(round_idx, participants, evaluate):
            client, result = done.client, done.result
            if not math.isfinite(result.loss):
                raise DivergenceError(
                    f"client {client} diverged in round {round_idx}: training loss {result.loss}")
            if result.last_grads is not None:
                new_grads[client] = result.last_grads
            shard = self.shards[client]
            row = {"client": client, "n_train": int(shard.x_train.shape[0]),
                   "loss": result.loss}
            if evaluate:
                row["acc_before"] = done.acc_before
            rows[client] = row
            weight = shard.x_train.shape[0] / total_weight
            fixed = add_client(fixed, done.state, weight, client=client)
        self.grads = new_grads
        if fixed is not None:
            fixed = {k: v.cpu() for k, v in fixed.items()}
        return {"sum": fixed, "clients": [rows[c] for c in participants]}

    def _generators(self, client: int, round_idx: int) -> tuple[torch.Generator, torch.Generator]:
        seed = self.cfg.seed
        return (torch_generator(seed, "batches", client, round_idx),
                torch_generator(seed, "augment", client, round_idx))

    def _train_serial(self, round_idx: int, participants: list[int],
                      evaluate: bool) -> Iterator[_Trained]:
        """One client at a time through ``local_train``."""
        settings = local_settings(self.cfg)
        for client in participants:
            shard = self.shards[client]
            self.model.load_state_dict(self.handout_state(client))
            batch_gen, augment_gen = self._generators(client, round_idx)
            with self._timed("train"):
                result = local_train(self.model, shard.x_train, shard.y_train, settings,
                                     self.norm, batch_gen=batch_gen, augment_gen=augment_gen,
                                     remember=self.remember)
            acc = None
            if evaluate:
                with self._timed("evaluate"):
                    acc = accuracy(self.model, shard.x_test, shard.y_test, self.norm)
            yield _Trained(client, result, self.model.state_dict(), acc)

    def plan_groups(self, participants: list[int]) -> list[list[int]]:
        """Participants in groups of ``group_size`` clients with equal train and test sizes."""
        buckets: dict[tuple[int, int], list[int]] = {}
        for client in participants:
            shard = self.shards[client]
            key = (int(shard.x_train.shape[0]), int(shard.x_test.shape[0]))
            buckets.setdefault(key, []).append(client)
        size = self.group_size
        return [members[i:i + size] for members in buckets.values()
                for i in range(0, len(members), size)]

    def _train_batched(self, round_idx: int, participants: list[int],
                       evaluate: bool) -> Iterator[_Trained]:
        """Groups of clients trained at once (ray_lips.batched); every group has exactly
        ``group_size`` slots, the last one of a pool padded with throw-away copies."""
        settings = local_settings(self.cfg)
        group = self._batched_group()
        for members in self.plan_groups(participants):
            slots = members + [members[0]] * (self.group_size - len(members))
            shards = [self.shards[c] for c in slots]
            starts = [self.handout_state(c) for c in members]
            group.load(starts + starts[:1] * (len(slots) - len(members)))
            gens = [self._generators(c, round_idx) for c in slots]
            with self._timed("train"):
                results = group.train(torch.stack([s.x_train for s in shards]),
                                      torch.stack([s.y_train for s in shards]), settings,
                                      self.norm, batch_gens=[g[0] for g in gens],
                                      augment_gens=[g[1] for g in gens], remember=self.remember)
            accs: list[float | None] = [None] * len(slots)
            if evaluate:
                with self._timed("evaluate"):
                    accs = group.accuracy(torch.stack([s.x_test for s in shards]),
                                          torch.stack([s.y_test for s in shards]), self.norm)
            states = group.states()
            for k, client in enumerate(members):
                yield _Trained(client, results[k], states[k], accs[k])

    def handout(self, round_idx: int, state: dict[str, torch.Tensor], density: float,
                eval_clients: list[int], eval_test: bool) -> dict[str, Any]:
        """Take the new global model; evaluate what the listed clients now hold."""
        self.set_global(round_idx, state, density)
        with self._timed("evaluate"):
            return self._evaluate_handout(eval_clients, eval_test)

    def _evaluate_handout(self, eval_clients: list[int], eval_test: bool) -> dict[str, Any]:
        self.model.load_state_dict(self.global_state)
        if self.batched:
            return self._handout_batched(eval_clients, eval_test)
        rows = {c: {"client": c, "acc_global": accuracy(self.model, self.shards[c].x_test,
                                                        self.shards[c].y_test, self.norm)}
                for c in eval_clients}
        acc_test = None
        if eval_test and self.test_split is not None:
            acc_test = accuracy(self.model, *self.test_split, self.norm)
        for client in eval_clients:
            state_k = self.handout_state(client)
            if state_k is self.global_state:
                rows[client]["acc_after"] = rows[client]["acc_global"]
                continue
            self.model.load_state_dict(state_k)
            shard = self.shards[client]
            rows[client]["acc_after"] = accuracy(self.model, shard.x_test, shard.y_test, self.norm)
        return {"clients": list(rows.values()), "acc_test": acc_test}

    def _handout_batched(self, eval_clients: list[int], eval_test: bool) -> dict[str, Any]:
        """``handout``'s evaluation with the batched group: the global model, then (where a
        client's hand-out is sparse) each client's own start model, a group at a time."""
        acc_test = None
        if eval_test and self.test_split is not None:
            acc_test = accuracy(self.model, *self.test_split, self.norm)
        group = self._batched_group()
        rows: dict[int, dict[str, Any]] = {}
        for members in self.plan_groups(eval_clients):
            pad = self.group_size - len(members)
            shards = [self.shards[c] for c in members + members[:1] * pad]
            x = torch.stack([s.x_test for s in shards])
            y = torch.stack([s.y_test for s in shards])
            group.load([self.global_state] * self.group_size)
            acc_global = group.accuracy(x, y, self.norm)
            starts = [self.handout_state(c) for c in members]
            acc_after = acc_global
            if any(start is not self.global_state for start in starts):
                group.load(starts + starts[:1] * pad)
                acc_after = group.accuracy(x, y, self.norm)
            for k, client in enumerate(members):
                rows[client] = {"client": client, "acc_global": acc_global[k],
                                "acc_after": acc_after[k]}
        return {"clients": [rows[c] for c in eval_clients], "acc_test": acc_test}

    def _batched_group(self) -> ClientGroup:
        if self._group is None:
            self._group = ClientGroup(self.model, self.group_size)
        return self._group

    def finetune(self, round_idx: int, epochs: int) -> list[dict[str, Any]]:
        """Each hosted client fine-tunes the model it holds on its own data (final scores)."""
        settings = local_settings(self.cfg, epochs=epochs)
        rows = []
        for client in self.clients():
            shard = self.shards[client]
            self.model.load_state_dict(self.global_state)
            row = {"client": client, "n_train": int(shard.x_train.shape[0]),
                   "n_test": int(shard.x_test.shape[0]),
                   "acc_global": accuracy(self.model, shard.x_test, shard.y_test, self.norm)}
            self.model.load_state_dict(self.handout_state(client))
            row["acc_final"] = accuracy(self.model, shard.x_test, shard.y_test, self.norm)
            if epochs > 0:
                local_train(self.model, shard.x_train, shard.y_train, settings, self.norm,
                            batch_gen=torch_generator(self.cfg.seed, "finetune", client, 0),
                            augment_gen=torch_generator(self.cfg.seed, "finetune", client, 1))
            row["acc_finetune"] = accuracy(self.model, shard.x_test, shard.y_test, self.norm)
            recalibrate_batchnorm(self.model, shard.x_train, self.norm)
            row["acc_finetune_bnrecal"] = accuracy(self.model, shard.x_test, shard.y_test,
                                                   self.norm)
            row["train_labels"] = torch.bincount(shard.y_train.cpu(),
                                                minlength=self.num_classes).tolist()
            rows.append(row)
        return rows

    # ----- checkpoints ------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """Client state that must survive a restart: the remembered gradients."""
        return {"grads": {c: {k: v.cpu() for k, v in g.items()} for c, g in self.grads.items()}}

    def import_state(self, state: dict[str, Any]) -> None:
        self.grads = {int(c): {k: v.to(self.device) for k, v in g.items()}
                      for c, g in state.get("grads", {}).items() if int(c) in self.shards}

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    @contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - started

    def stats(self) -> dict[str, float]:
        """For benchmarks: seconds spent so far in local training and in evaluation (both end
        with a device sync), current and peak resident memory, and the training mode."""
        return {"train_s": self.seconds["train"], "evaluate_s": self.seconds["evaluate"],
                "rss_mb": current_rss_mb(),
                "peak_rss_mb": self.peak_rss_mb(), "batched": float(self.batched),
                "group_size": float(self.group_size)}

