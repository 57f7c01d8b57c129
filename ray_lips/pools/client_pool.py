"""A client pool: hosts pinned clients, trains them, and builds their hand-outs.

Plain Python; ``ray.remote(ClientPool)`` makes it an actor. The driver calls it through typed
requests (:mod:`ray_lips.pools.messages`). What happens to a client in a round is the
algorithm's (:mod:`ray_lips.algorithms`); the pool offers it a
:class:`~ray_lips.algorithms.base.ClientRound` (the round's message and weights, the trainer, the
clients' store, their hand-outs and sample counts), sums what the clients return on the exact
fixed-point grid, and builds each client's hand-out from the one global model it holds.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from dataclasses import replace
from typing import Any

import torch

from ray_lips.algorithms import build_algorithm, build_handout
from ray_lips.algorithms.base import MODEL, ClientRound, ClientView, Tensors
from ray_lips.config import ExperimentConfig, ResourcesConfig
from ray_lips.core.aggregate import DivergenceError, FixedSum, add_client
from ray_lips.core.run_folder import open_new
from ray_lips.core.traffic import individual_bytes, parts_bytes, state_bytes
from ray_lips.models import build_model, eligible_parameter_names
from ray_lips.pools.allocator import keep_buffers_in_heap
from ray_lips.pools.client_store import ClientStore, EntryInfo
from ray_lips.pools.memory import current_rss_mb, peak_rss_mb
from ray_lips.pools.messages import (
    HandoutReply,
    HandoutRequest,
    PoolDevice,
    StatePartReply,
    StatePartRequest,
    TrainReply,
    TrainRequest,
)
from ray_lips.pools.payload import DatasetArrays, PoolPayload
from ray_lips.training.batched import supports
from ray_lips.training.local import LocalSettings, accuracy, local_train, recalibrate_batchnorm
from ray_lips.training.trainers import GroupTrainer, SerialTrainer, Stopwatch, stream_generators


class CudaUnavailableError(RuntimeError):
    """A pool must train on CUDA (``resources.device``, ``resources.gpus_per_pool``) but torch
    sees no CUDA device in its process. The message is one line that stands alone."""


def wants_cuda(resources: ResourcesConfig) -> bool:
    """``resources.device``: ``cuda``, or ``auto`` with GPUs given to each pool."""
    return resources.device == "cuda" or (resources.device == "auto"
                                          and resources.gpus_per_pool > 0)


def pick_device(resources: ResourcesConfig, pool: int = 0, node: str = "") -> torch.device:
    """The device a pool trains on; never the CPU in place of a CUDA device it was promised.

    ``pool`` and ``node`` (host, address) only name the pool in the error.
    """
    if not wants_cuda(resources):
        return torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:  # e.g. a driver too old for torch
        warnings.simplefilter("always")
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found > 0:
        return torch.device("cuda")
    said = "; ".join(str(w.message).strip().splitlines()[0] for w in caught
                     if str(w.message).strip())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = (f"resources.gpus_per_pool {resources.gpus_per_pool:g}"
           if resources.device == "auto" else "resources.device cuda")
    raise CudaUnavailableError(
        f"client pool {pool} on {node or socket.gethostname()} must train on CUDA ({why}) but "
        f"torch sees no CUDA device there (torch.version.cuda {torch.version.cuda}, "
        f"torch.cuda.device_count() {found}, CUDA_VISIBLE_DEVICES "
        f"{'unset' if visible is None else repr(visible)}{'; torch: ' + said[:300] if said else ''}"
        f"); set resources.device: cpu if the pools should train on the CPU")


def describe_device(device: torch.device) -> str:
    """``cpu``, or ``cuda:INDEX (NAME)``."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def pool_threads(resources: ResourcesConfig) -> int:
    """torch's threads in a pool: its whole CPUs, at least one (the same in one process)."""
    return max(1, int(resources.cpus_per_pool))


def local_settings(cfg: ExperimentConfig, epochs: int | None = None) -> LocalSettings:
    return LocalSettings.of(cfg.train, epochs)


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


class ClientPool:
    """The clients of one pool, and the algorithm's client side for them."""

    def __init__(self, cfg: ExperimentConfig, payload: PoolPayload, threads: int | None = None,
                 dataset: DatasetArrays | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.torch_threads = torch.get_num_threads()  # what it trains with
        keep_buffers_in_heap()
        if dataset is not None:  # shipped apart from the payload, once for every pool
            payload = replace(payload, dataset=dataset)
        self.cfg = cfg
        self.pool_id = payload.pool_id
        self.device = pick_device(cfg.resources, self.pool_id, self.node())
        self.norm = payload.norm
        self.num_classes = payload.num_classes
        self.shards = payload.client_shards(self.device)
        self.sizes = dict(zip(payload.data.clients,
                              zip(payload.data.train_sizes, payload.data.test_sizes,
                                  strict=True), strict=True))  # client: (train, test) samples
        self.test_split = (tuple(t.to(self.device) for t in payload.test_split)
                           if payload.test_split is not None else None)
        self.model = build_model(cfg.model, payload.sample_shape, payload.num_classes)
        self.model.to(self.device)
        self.eligible = eligible_parameter_names(self.model)
        self.algorithm = build_algorithm(cfg, self.model)
        self.handout_step = build_handout(cfg, self.eligible)
        self.store = ClientStore(int(cfg.resources.client_state_mb * 2**20),
                                 cfg.resources.spill_dir)
        self.global_state: dict[str, torch.Tensor] = {}
        self.stopwatch = Stopwatch()
        self.batched = wants_batched(cfg, self.model)
        self.group_size = batch_clients(cfg, self.device) if self.batched else 1
        settings = local_settings(cfg)
        self.serial = SerialTrainer(self.model, self.shards, settings, self.norm, cfg.seed,
                                    self.stopwatch)
        self.trainer = (GroupTrainer(self.model, self.shards, settings, self.norm, cfg.seed,
                                     self.group_size, self.stopwatch, fallback=self.serial)
                        if self.batched else self.serial)

    # ----- what the algorithm's client side sees --------------------------------------------
    def handed(self, client: int) -> Tensors:
        """The global model as handed to ``client`` after the latest aggregation."""
        return self.handout_step.handed(self.global_state, client, self.store)

    def samples(self, client: int) -> int:
        return int(self.sizes[client][0])

    def view(self) -> ClientView:
        """The hosted clients as the algorithm may read them between rounds."""
        return ClientView(self.store, self.global_state, self.handed)

    def client_round(self, request: TrainRequest, message: dict[str, Tensors]) -> ClientRound:
        """What round ``request.round_idx`` offers the algorithm's client side here."""
        return ClientRound(
            store=self.store, global_state=self.global_state, handed=self.handed,
            round_idx=request.round_idx, message=message, trainer=self.trainer,
            samples=self.samples, total_weight=request.total_weight,
            population_weight=request.population_weight, evaluate=request.evaluate,
            remember=tuple(self.handout_step.remember or ()), class_counts=self.class_counts,
            frozen=frozenset(request.frozen),
            remember_mean=self.handout_step.remember_mean)

    def class_counts(self, client: int) -> tuple[int, ...]:
        """How many training samples of each class ``client`` holds."""
        labels = self.shards[client].y_train.cpu()
        return tuple(torch.bincount(labels, minlength=self.num_classes).tolist())

    # ----- the driver's calls ---------------------------------------------------------------
    def clients(self) -> list[int]:
        return sorted(self.sizes)

    def set_global(self, round_idx: int, state: Tensors, density: float,
                   score: Tensors | None = None) -> None:
        """Hold ``state`` as the global model, handed out with ``density`` after
        ``round_idx`` (-1: the initial model); ``score``: a shared mask's summed score."""
        self.global_state = {k: v.to(self.device) for k, v in state.items()}
        if score is not None:
            score = {k: v.to(self.device) for k, v in score.items()}
        self.handout_step.start_round(round_idx, density, score)

    def plan_groups(self, clients: list[int]) -> list[list[int]]:
        """Clients in training groups: batched, up to ``group_size`` clients with equal train
        and test sizes; one at a time, a single list."""
        if not self.batched:
            return [list(clients)] if clients else []
        buckets: dict[tuple[int, int], list[int]] = {}
        for client in clients:
            buckets.setdefault(self.sizes[client], []).append(client)
        size = self.group_size
        return [members[i:i + size] for members in buckets.values()
                for i in range(0, len(members), size)]

    def train_round(self, request: TrainRequest, message: dict[str, Tensors]) -> TrainReply:
        """Train the participants hosted here; return their weighted fixed-point sums."""
        this_round = self.client_round(request, message)
        sums: dict[str, FixedSum] = {}
        rows: dict[int, dict[str, Any]] = {}
        kept: dict[int, dict[str, torch.Tensor]] = {}
        score_part = (self.handout_step.score_part
                      if self.handout_step.wants_score(request.round_idx) else None)
        individual: dict[int, dict[str, Tensors]] = {}
        for members in self.plan_groups(request.participants):
            for update in self.algorithm.train(this_round, members):
                client = update.client
                if not math.isfinite(update.loss):
                    raise DivergenceError(f"client {client} diverged in round "
                                          f"{request.round_idx}: training loss {update.loss}")
                if update.last_grads is not None:
                    kept[client] = update.last_grads
                if request.frozen and MODEL in update.parts:  # the global model keeps them
                    tensors, weight = update.parts[MODEL]
                    frozen = set(request.frozen)
                    update.parts[MODEL] = ({k: v for k, v in tensors.items() if k not in frozen},
                                           weight)
                up_bytes = parts_bytes(update.parts)
                if update.individual:
                    up_bytes += individual_bytes(update.individual, update.parts)
                    individual[client] = {part: {k: v.cpu() for k, v in tensors.items()}
                                          for part, tensors in update.individual.items()}
                row = {"client": client, "n_train": self.samples(client), "loss": update.loss,
                       "up_bytes": up_bytes}
                if score_part is not None and update.last_grads is not None:
                    score = self.handout_step.score_of(update.last_grads)
                    sums[score_part] = add_client(sums.get(score_part), score, 1.0, client)
                    row["up_bytes"] += state_bytes(score)  # its fp16 |g| travels too
                if request.evaluate:
                    row["acc_before"] = update.acc_before
                rows[client] = row
                for part, (tensors, weight) in update.parts.items():
                    sums[part] = add_client(sums.get(part), tensors, weight, client=client)
        self.handout_step.keep(self.store, kept)
        sums = {part: {k: v.cpu() for k, v in total.items()} for part, total in sums.items()}
        return TrainReply(sums, [rows[c] for c in request.participants], individual)

    def handout(self, request: HandoutRequest, state: Tensors,
                score: Tensors | None = None) -> HandoutReply:
        """Take the new global model (and a shared mask's summed ``score``) and what the
        algorithm personalised for each client; score what the listed clients now hold."""
        self.set_global(request.round_idx, state, request.density, score)
        if request.personal:
            self.deliver(request.personal)
        with self.stopwatch("evaluate"):
            reply = self._score_holdings(request.eval_clients, request.eval_test)
        reply.traffic = self.downloads(request.receivers)
        if request.personal:
            for row in reply.traffic:
                extra = state_bytes(request.personal.get(row["client"], {}))
                row["down_bytes"] += extra
                row["down_bytes_dense"] += extra
        return reply

    def deliver(self, personal: dict[int, Tensors]) -> None:
        """Put each client's personalised tensors in the algorithm's ``personalised_slot``."""
        slot = self.algorithm.personalised_slot
        if not slot:
            raise ValueError(f"algorithm {self.algorithm.name!r} personalised tensors for "
                             "clients but declares no personalised_slot to keep them in")
        for client, tensors in personal.items():
            self.store.put(client, slot, {k: v.to(self.device) for k, v in tensors.items()})

    def downloads(self, receivers: list[int]) -> list[dict[str, Any]]:
        """Each receiver's download of the hand-out just set (bytes as handed, and were it
        dense), from shapes alone; the algorithm's local entries never travel."""
        local = getattr(self.algorithm, "local", frozenset())
        dense = state_bytes(self.global_state, local)
        handed = self.handout_step.handed_bytes(self.global_state, receivers, self.store, local)
        return [{"client": c, "down_bytes": handed[c], "down_bytes_dense": dense}
                for c in receivers]

    def _score_holdings(self, eval_clients: list[int], eval_test: bool) -> HandoutReply:
        has_global = self.algorithm.has_global_model
        reply = HandoutReply()
        if eval_test and has_global and self.test_split is not None:
            reply.acc_test = self.serial.accuracy_on(self.global_state, *self.test_split)
        rows: dict[int, dict[str, Any]] = {}
        view = self.view()
        for members in self.plan_groups(eval_clients):
            acc_global = (self.trainer.accuracy(members, [self.global_state] * len(members))
                          if has_global else [math.nan] * len(members))
            held = [self.algorithm.held_state(view, c) for c in members]
            acc_after = list(acc_global)
            own = [k for k, state in enumerate(held)
                   if not (has_global and state is self.global_state)]
            if own:
                scores = self.trainer.accuracy([members[k] for k in own], [held[k] for k in own])
                for k, score in zip(own, scores, strict=True):
                    acc_after[k] = score
            for k, client in enumerate(members):
                rows[client] = {"client": client, "acc_global": acc_global[k],
                                "acc_after": acc_after[k]}
        reply.clients = [rows[c] for c in eval_clients]
        return reply

    def finetune(self, epochs: int) -> list[dict[str, Any]]:
        """Each hosted client fine-tunes the model it holds on its own data (final scores)."""
        settings = local_settings(self.cfg, epochs=epochs)
        has_global = self.algorithm.has_global_model
        self.serial.model_changed()  # the loop below loads and trains the shared model
        view = self.view()
        rows = []
        for client in self.clients():
            shard = self.shards[client]
            row = {"client": client, "n_train": int(shard.x_train.shape[0]),
                   "n_test": int(shard.x_test.shape[0]), "acc_global": math.nan}
            if has_global:
                self.model.load_state_dict(self.global_state)
                row["acc_global"] = accuracy(self.model, shard.x_test, shard.y_test, self.norm)
            self.model.load_state_dict(self.algorithm.held_state(view, client))
            row["acc_final"] = accuracy(self.model, shard.x_test, shard.y_test, self.norm)
            if epochs > 0:
                batch_gen, augment_gen = stream_generators(self.cfg.seed, "finetune", client, 0)
                local_train(self.model, shard.x_train, shard.y_train, settings, self.norm,
                            batch_gen=batch_gen, augment_gen=augment_gen)
            row["acc_finetune"] = accuracy(self.model, shard.x_test, shard.y_test, self.norm)
            recalibrate_batchnorm(self.model, shard.x_train, self.norm)
            row["acc_finetune_bnrecal"] = accuracy(self.model, shard.x_test, shard.y_test,
                                                   self.norm)
            row["train_labels"] = torch.bincount(shard.y_train.cpu(),
                                                minlength=self.num_classes).tolist()
            rows.append(row)
        return rows

    # ----- checkpoints ------------------------------------------------------------------
    def state_index(self) -> list[EntryInfo]:
        """The client state the next rounds need, entry by entry with its size."""
        return self.store.index(skip=self.handout_step.unneeded_slots())

    def sees(self, path: str) -> bool:
        """Whether this process sees the file the driver just made (same node or a shared
        file system): then it writes its checkpoint parts itself."""
        return os.path.isfile(path)

    def save_state(self, request: StatePartRequest) -> StatePartReply:
        """The entries of ``request.keys`` on the CPU: written to ``request.file`` or sent."""
        entries = self.store.export(request.keys)
        if request.file is None:
            return StatePartReply(entries=entries)
        with open_new(request.file) as handle:  # exclusive create: never through a planted link
            torch.save(entries, handle)
        return StatePartReply(nbytes=os.path.getsize(request.file))

    def import_state(self, state: dict[str, dict[int, Tensors]]) -> None:
        """Adds a checkpoint part's entries of this pool's clients."""
        self.store.add(state, self.device, hosted=set(self.sizes))

    # ----- where it runs ---------------------------------------------------------------
    def node(self) -> str:
        """This process's host, for messages (a Ray pool adds the node's address)."""
        return socket.gethostname()

    def device_info(self) -> PoolDevice:
        """The device this pool trains on and the process it runs in."""
        return PoolDevice(pool=self.pool_id, node=socket.gethostname(), ip=None, pid=os.getpid(),
                          device=describe_device(self.device), gpu_ids=[],
                          cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                          threads=self.torch_threads)

    # ----- for benchmarks ---------------------------------------------------------------
    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def stats(self) -> dict[str, float]:
        """Seconds spent so far in local training and in evaluation (both end with a device
        sync), current and peak resident memory, the training mode and client state held."""
        return {"train_s": self.stopwatch.seconds["train"],
                "evaluate_s": self.stopwatch.seconds["evaluate"],
                "rss_mb": current_rss_mb(), "peak_rss_mb": self.peak_rss_mb(),
                "batched": float(self.batched), "group_size": float(self.group_size),
                "client_state_mb": self.store.memory_bytes / 2**20,
                "client_state_spilled": float(self.store.spilled)}
