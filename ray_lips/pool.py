"""A client pool: hosts pinned clients, trains them, and builds their hand-outs.

Plain Python; ``ray.remote(ClientPool)`` makes it an actor. A pool keeps, per client, only what
the method needs between rounds: the last-batch gradient of the eligible layers (for LIPS with a
gradient-based scorer). The hand-out model of a client is built when it is needed, from the one
global model the pool holds.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from typing import Any

import torch

from ray_lips.aggregate import DivergenceError, FixedSum, add_client
from ray_lips.config import ExperimentConfig
from ray_lips.models import build_model, eligible_parameter_names
from ray_lips.seeding import torch_generator
from ray_lips.sparsify import GRADIENT_SCORERS, sparsify_state
from ray_lips.training import (
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
class PoolPayload:
    """What the driver ships to one pool (once, through the object store)."""

    pool_id: int
    shards: list[ClientShard]
    norm: Normalisation
    sample_shape: tuple[int, ...]
    num_classes: int
    test_split: tuple[torch.Tensor, torch.Tensor] | None = None  # global test subset, pool 0


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


class ClientPool:
    def __init__(self, config: dict[str, Any], payload: PoolPayload, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
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
        settings = local_settings(self.cfg)
        seed = self.cfg.seed
        fixed: FixedSum | None = None
        rows, new_grads = [], {}
        for client in participants:
            shard = self.shards[client]
            self.model.load_state_dict(self.handout_state(client))
            result = local_train(
                self.model, shard.x_train, shard.y_train, settings, self.norm,
                batch_gen=torch_generator(seed, "batches", client, round_idx),
                augment_gen=torch_generator(seed, "augment", client, round_idx),
                remember=self.remember)
            if not math.isfinite(result.loss):
                raise DivergenceError(
                    f"client {client} diverged in round {round_idx}: training loss {result.loss}")
            if result.last_grads is not None:
                new_grads[client] = result.last_grads
            row = {"client": client, "n_train": int(shard.x_train.shape[0]),
                   "loss": result.loss}
            if evaluate:
                row["acc_before"] = accuracy(self.model, shard.x_test, shard.y_test, self.norm)
            rows.append(row)
            weight = shard.x_train.shape[0] / total_weight
            fixed = add_client(fixed, self.model.state_dict(), weight, client=client)
        self.grads = new_grads
        if fixed is not None:
            fixed = {k: v.cpu() for k, v in fixed.items()}
        return {"sum": fixed, "clients": rows}

    def handout(self, round_idx: int, state: dict[str, torch.Tensor], density: float,
                eval_clients: list[int], eval_test: bool) -> dict[str, Any]:
        """Take the new global model; evaluate what the listed clients now hold."""
        self.set_global(round_idx, state, density)
        self.model.load_state_dict(self.global_state)
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
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
