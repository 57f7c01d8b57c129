"""The driver of one federated run: data, participants, the hand-out schedule, aggregation,
metrics, checkpoints.

Plain Python: the pools it drives come from a factory, in-process (``LocalPools``) or Ray actors
(``RayPoolFactory``). ``ray.remote(FederatedRun)`` is the driver actor of ``ray-lips run``; inside a
Tune trial the trial itself runs it. The algorithm's server side (``ray_lips.algorithms``) says
what a round sends and how the averaged parts become the next global state.
"""

from __future__ import annotations

import contextlib
import functools
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ray_lips.algorithms import build_algorithm, build_handout, client_slots
from ray_lips.algorithms.base import MODEL
from ray_lips.algorithms.handouts.lips import LEGACY_CLIENT_SLOTS
from ray_lips.algorithms.handouts.schedule import triggered_density
from ray_lips.config import ExperimentConfig, validate_config
from ray_lips.core.aggregate import FixedSum, add_sums, to_state
from ray_lips.core.freeze import LayerFreezer
from ray_lips.core.inertia import InertiaTrigger, eligible_update, layer_metrics
from ray_lips.core.run_folder import LAYERS_FILE, ROUNDS_FILE, RunWriter, check_run_folder, open_new
from ray_lips.core.seeding import derive_seed, numpy_rng
from ray_lips.core.traffic import round_traffic
from ray_lips.data import input_pipeline, load_dataset, partition_clients
from ray_lips.data.datasets import ArrayDataset
from ray_lips.models import build_model, eligible_parameter_names, layer_groups
from ray_lips.pools.client_store import EntryInfo
from ray_lips.pools.in_process import ClientState, PoolFactory, local_pools, torch_threads
from ray_lips.pools.messages import HandoutRequest, StatePartRequest, TrainReply, TrainRequest
from ray_lips.pools.payload import ClientRows, DatasetArrays, PoolPayload

T = TypeVar("T")
STATE_PART_BYTES = 32 * 2**20  # a pool's share of a checkpoint part (plus one entry)


def _cut(entries: list[EntryInfo], part_bytes: int) -> list[list[tuple[str, int]]]:
    """``entries`` in runs of at least ``part_bytes`` each (the last may be smaller), as keys."""
    runs: list[list[tuple[str, int]]] = []
    size = part_bytes
    for info in entries:
        if size >= part_bytes:
            runs.append([])
            size = 0
        runs[-1].append((info.slot, info.client))
        size += info.nbytes
    return runs


def assign_clients(clients: int, pools: int) -> list[list[int]]:
    """Pin clients to pools in contiguous blocks (pool i hosts one block)."""
    return [block.tolist() for block in np.array_split(np.arange(clients), pools)]


def sample_participants(cfg: ExperimentConfig, round_idx: int) -> list[int]:
    clients = cfg.data.clients
    if cfg.train.participation >= 1.0:
        return list(range(clients))
    count = max(1, round(cfg.train.participation * clients))
    rng = numpy_rng(cfg.seed, "participants", round_idx)
    return sorted(rng.choice(clients, size=count, replace=False).tolist())


def build_payloads(cfg: ExperimentConfig, dataset: ArrayDataset,
                   assignment: list[list[int]]) -> list[PoolPayload]:
    """Each pool's clients as row numbers of the dataset, which every payload references
    (``RayPools`` ships it once, apart from the payloads)."""
    d = cfg.data
    splits = partition_clients(
        dataset.y_train.numpy(), dataset.y_test.numpy(), dataset.num_classes, scheme=d.partition,
        clients=d.clients, train_per_client=d.train_per_client, test_per_client=d.test_per_client,
        alpha=d.alpha, classes_per_client=d.classes_per_client, seed=cfg.seed)
    norm = input_pipeline(d, dataset)
    test_split = None
    if cfg.train.eval_test_samples > 0:
        order = numpy_rng(cfg.seed, "init", 1).permutation(len(dataset.y_test))
        keep = torch.from_numpy(order[: cfg.train.eval_test_samples])
        test_split = (dataset.x_test[keep], dataset.y_test[keep])
    arrays = DatasetArrays.of(dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test)
    payloads = []
    for pool_id, block in enumerate(assignment):
        train = [splits[c].train_idx for c in block]
        test = [splits[c].test_idx for c in block]
        rows = ClientRows(list(block), _concat(train), _concat(test),
                          [len(i) for i in train], [len(i) for i in test])
        payloads.append(PoolPayload(pool_id, rows, norm, tuple(dataset.sample_shape),
                                    dataset.num_classes, test_split if pool_id == 0 else None,
                                    arrays))
    return payloads


def _concat(index: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(index).astype(np.int64) if index else np.zeros(0, dtype=np.int64)


def initial_model(cfg: ExperimentConfig, sample_shape: tuple[int, ...], num_classes: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        return build_model(cfg.model, sample_shape, num_classes)


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else float("nan")


def windowed(rows: list[dict], key: str, window: int) -> float:
    """Mean of ``key`` over the last ``window`` evaluated rounds."""
    values = [r[key] for r in rows if r.get("evaluated") and r.get(key) is not None
              and not math.isnan(r[key])]
    return float(np.mean(values[-window:])) if values else float("nan")


def driver_threads(method: Callable[..., T]) -> Callable[..., T]:
    """Run a driver step (aggregation, inertia metrics, hand-out planning) with the threads a
    Ray driver actor has, ``max(1, int(resources.driver_cpus))``, whichever process runs it, so
    the numbers are the same in one process, in a driver actor or in a Tune trial."""

    @functools.wraps(method)
    def wrapped(self: FederatedRun, *args: Any, **kwargs: Any) -> T:
        with torch_threads(max(1, int(self.cfg.resources.driver_cpus))):
            return method(self, *args, **kwargs)

    return wrapped


@dataclass(frozen=True)
class RoundDone:
    """A step of a run that trained a round: the round's row of ``rounds.parquet``."""

    row: dict[str, Any]


@dataclass(frozen=True)
class RunFinished:
    """The last step of a run: fine-tuned, scored, its files written; the summary."""

    summary: dict[str, Any]


class FederatedRun:
    """One run, advanced a round at a time; resumes from its directory's latest checkpoint.

    The round tables (``rounds.parquet``, ``layers.parquet``) are kept in memory and written
    with each checkpoint, at the end, and when a round fails: rewriting them whole every round
    would cost the square of the rounds. A run stopped between two writes loses only rounds
    after its last checkpoint, which a resume runs again; ``status.json`` follows every round.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path,
                 make_pools: PoolFactory = local_pools):
        self.cfg = cfg
        self._start(run_dir, make_pools)

    @driver_threads
    def _start(self, run_dir: str | Path, make_pools: PoolFactory) -> None:
        cfg = self.cfg
        self.writer = RunWriter(run_dir)
        check_run_folder(self.writer.dir)  # before anything is written there
        # The pools start first: on Ray their processes start and import torch while this one
        # reads the data and builds the model.
        self.pools = make_pools(cfg)
        try:
            payloads = self._prepare(cfg)
            self.pools.load(payloads)
        except BaseException:
            self.pools.shutdown()
            raise
        self.ref_state: dict[str, torch.Tensor] | None = None
        self.round = 0
        self.rounds_rows: list[dict] = []
        self.layers_rows: list[dict] = []
        self.updates: dict[int, float] = {}  # the inertia trigger's u(r), from layers_rows
        self.last_sparse: int | None = None  # the last round whose hand-out was sparse
        self.score: dict[str, torch.Tensor] | None = None  # the shared mask's, while it is used
        self.elapsed = 0.0
        checkpoint = self.writer.load_checkpoint(client_slots=client_slots(cfg))
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self.writer.write_config(cfg)
            self.pools.set_global(-1, self.global_state, 1.0)
        # what each pool really trains on (device, node, Ray's GPU ids), and the method's family
        # and local work (reports read them where the algorithm cannot be imported), kept by
        # later writes
        algorithm = type(self.algorithm)
        self.writer.write_status(
            "running", round=self.round, rounds=cfg.train.rounds,
            devices=[asdict(d) for d in self.pools.devices()], family=algorithm.family,
            local_work=str(algorithm.local_work(self.algorithm.options, self.algorithm.settings)))

    def _prepare(self, cfg: ExperimentConfig) -> list[PoolPayload]:
        """The data, the client assignment, the initial model and the algorithm's server side;
        returns each pool's payload."""
        dataset = load_dataset(cfg.data)
        self.assignment = assign_clients(cfg.data.clients, cfg.resources.pools)
        payloads = build_payloads(cfg, dataset, self.assignment)
        self.samples = {client: size for p in payloads
                        for client, size in zip(p.data.clients, p.data.train_sizes, strict=True)}
        model = initial_model(cfg, tuple(dataset.sample_shape), dataset.num_classes)
        self.groups = layer_groups(model)
        self.algorithm = build_algorithm(cfg, model)
        # layer inertia of the averaged entries: none of a client's local ones (FedBN's
        # BatchNorm, FedRep's head), nothing where no global model or sparsifiable body exists
        self.measured_groups = ([g for g in self.groups
                                 if not self.algorithm.local.intersection(g.param_names)]
                                if self.algorithm.measures_body() else [])
        self.handout = build_handout(cfg, eligible_parameter_names(model))
        self.trigger = (InertiaTrigger(cfg.lips.window, cfg.lips.trigger, cfg.lips.gap,
                                       cfg.train.inertia_ref_round)
                        if cfg.handout == "lips" and cfg.lips.schedule == "inertia" else None)
        self.freezer = (LayerFreezer([g.name for g in self.measured_groups if g.eligible],
                                     cfg.freeze.when, cfg.freeze.rounds, cfg.lips.period,
                                     InertiaTrigger(cfg.lips.window, cfg.lips.trigger,
                                                    cfg.lips.gap, cfg.train.inertia_ref_round))
                        if cfg.handout == "freeze" else None)
        self.global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.server_state = self.algorithm.init_server_state(self.global_state)
        return payloads

    # ----- one round --------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.round >= self.cfg.train.rounds

    def density(self, round_idx: int) -> float:
        """Density of the hand-out after round ``round_idx`` (1: dense) under a periodic
        schedule; an inertia-triggered one is known only once the round is measured
        (:meth:`_schedule`)."""
        return self.handout.density(round_idx)

    def _schedule(self, round_idx: int, layers: list[dict]) -> tuple[float, float | None]:
        """The density of this round's hand-out and, for ``lips.schedule: inertia``, the
        trigger's ratio (None otherwise), given this round's layer rows."""
        if self.trigger is None:
            return self.density(round_idx), None
        self.updates.update(eligible_update(layers))
        ratio = self.trigger.ratio(self.updates, round_idx)
        fired = self.trigger.fires(ratio, round_idx, self.last_sparse)
        lips = self.cfg.lips
        density = triggered_density(round_idx, self.cfg.train.rounds, lips.sparsity, fired)
        if density < 1.0:
            self.last_sparse = round_idx
        return density, ratio

    def _frozen_entries(self, layers: tuple[str, ...]) -> tuple[str, ...]:
        """The parameters of the frozen ``layers``, in model order."""
        chosen = set(layers)
        return tuple(n for g in self.measured_groups if g.name in chosen for n in g.param_names)

    def _split(self, clients: list[int]) -> list[list[int]]:
        chosen = set(clients)
        return [[c for c in block if c in chosen] for block in self.assignment]

    def _averages(self, sums: list[dict[str, FixedSum]]) -> dict[str, dict[str, torch.Tensor]]:
        """Each aggregated part, summed over the pools exactly, as tensors."""
        parts = sorted({part for pool in sums for part in pool})
        out = {}
        for part in parts:
            total = add_sums(pool[part] for pool in sums if part in pool)
            out[part] = to_state(total, {k: self.global_state[k] for k in total})
        return out

    def _take_score(self, sums: list[dict[str, FixedSum]]) -> dict[str, torch.Tensor] | None:
        """``lips.mask: shared``: the participants' summed score, taken out of the pools' sums
        before the algorithm sees the averages (exact, whatever the pooling); None otherwise."""
        part = self.handout.score_part
        if part is None:
            return None
        found = [pool.pop(part) for pool in sums if part in pool]
        if not found:
            return None
        total = add_sums(found)
        return to_state(total, {k: self.global_state[k] for k in total})

    def _personalise(self, trained: list[TrainReply], new_state: dict[str, torch.Tensor],
                     round_idx: int) -> dict[int, dict[str, torch.Tensor]]:
        """What the algorithm gives each client of its own (``Algorithm.personalise``) from
        what the participants sent individually, in client order whatever the pools; nothing
        (and no call) when none sent anything."""
        individual = {client: parts for reply in trained
                      for client, parts in reply.individual.items()}
        if not individual:
            return {}
        return self.algorithm.personalise(dict(sorted(individual.items())), new_state,
                                          round_idx, self.server_state)

    def advance(self) -> RoundDone | RunFinished:
        """The run's next step: the next round while rounds remain, then the end."""
        if self.done:
            return RunFinished(self.finish())
        return RoundDone(self.run_round())

    def run_round(self) -> dict[str, Any]:
        """Train, aggregate, hand out, measure; returns this round's row. A round that fails
        leaves the rows of the rounds before it on disk (as well as the disk allows)."""
        try:
            return self._run_round()
        except BaseException:
            if self.rounds_rows:  # a run that never trained leaves no table
                with contextlib.suppress(Exception):  # the error reported stays the round's
                    self.write_tables()
            raise

    @driver_threads
    def _run_round(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.round
        started = time.perf_counter()
        participants = sample_participants(cfg, r)
        evaluate = r % cfg.train.eval_every == 0 or r == cfg.train.rounds - 1
        total_weight = sum(self.samples[c] for c in participants)
        frozen_layers = self.freezer.frozen_in(r) if self.freezer is not None else ()
        frozen = self._frozen_entries(frozen_layers)
        trained = self.pools.train_round(
            [TrainRequest(r, p, total_weight, sum(self.samples.values()), evaluate, frozen)
             for p in self._split(participants)],
            self.algorithm.server_message(self.server_state))
        sums = [t.sums for t in trained]
        score = self._take_score(sums)
        averages = self._averages(sums)
        if frozen and MODEL in averages:  # no client sent them: their average is the global's
            averages[MODEL] = {**{k: self.global_state[k] for k in frozen}, **averages[MODEL]}
        new_state, self.server_state = self.algorithm.aggregate(
            self.global_state, averages, self.server_state)
        if frozen:  # bit for bit, whatever the algorithm's aggregation does with them
            new_state = {**new_state, **{k: self.global_state[k] for k in frozen}}
        if r == cfg.train.inertia_ref_round:
            self.ref_state = new_state
        layers = layer_metrics(r, self.measured_groups, self.global_state, new_state,
                               self.ref_state)
        density, ratio = self._schedule(r, layers)
        freeze_row: dict[str, Any] = {}
        if self.freezer is not None:
            for layer_row in layers:
                layer_row["frozen"] = layer_row["layer"] in frozen_layers
            self.freezer.observe(layers)
            decision = self.freezer.after_round(r)
            freeze_row = {"frozen_layers": len(frozen_layers), "freeze_fired": decision.fired,
                          **({"inertia_ratio": decision.ratio}
                             if decision.ratio is not None else {})}
        personal = self._personalise(trained, new_state, r)
        eval_clients = (list(range(cfg.data.clients)) if cfg.train.participation >= 1.0
                        else participants)
        self.score = score if density < 1.0 else None  # what the hand-out reads
        handed = self.pools.handout(
            [HandoutRequest(r, density, c if evaluate else [], evaluate, receivers=c,
                            personal={k: personal[k] for k in block if k in personal})
             for c, block in zip(self._split(eval_clients), self.assignment, strict=True)],
            new_state, self.score)
        self.layers_rows += layers
        self.global_state = new_state
        train_rows = [row for t in trained for row in t.clients]
        eval_rows = [row for h in handed for row in h.clients]
        seconds = time.perf_counter() - started
        self.elapsed += seconds
        nan = float("nan")
        acc_test = next((h.acc_test for h in handed if h.acc_test is not None), None)
        row = {
            "round": r, "density": density,
            **({"inertia_ratio": ratio} if self.trigger is not None else {}),
            **freeze_row,
            "participants": len(participants),
            "evaluated": evaluate, "train_loss": _mean(train_rows, "loss"),
            "acc_before": _mean(train_rows, "acc_before") if evaluate else nan,
            "acc_after": _mean(eval_rows, "acc_after") if evaluate else nan,
            "acc_global": _mean(eval_rows, "acc_global") if evaluate else nan,
            "acc_test": acc_test if acc_test is not None else nan,
            "seconds": seconds,
            **round_traffic(train_rows, [t for h in handed for t in h.traffic]),
        }
        self.rounds_rows.append(row)
        self.round += 1
        if self.round % cfg.train.checkpoint_every == 0 or self.done:
            self.checkpoint()
        self.writer.write_status("running", round=self.round, rounds=cfg.train.rounds,
                                 elapsed_s=self.elapsed)
        return row

    # ----- the end ----------------------------------------------------------------------
    @driver_threads
    def finish(self) -> dict[str, Any]:
        """Final per-client evaluation and fine-tuning; writes clients.parquet and the summary."""
        if not self.done:
            raise RuntimeError(f"finish() called after {self.round} of {self.cfg.train.rounds}")
        per_pool = self.pools.finetune(self.cfg.train.finetune_epochs)
        client_rows = sorted((row for rows in per_pool for row in rows), key=lambda r: r["client"])
        self.writer.write_clients(client_rows)
        self.writer.write_model(self.global_state)
        summary = self.summary(client_rows)
        self.writer.write_status("finished", round=self.round, rounds=self.cfg.train.rounds,
                                 elapsed_s=self.elapsed, summary=summary)
        return summary

    def summary(self, client_rows: list[dict] | None = None) -> dict[str, Any]:
        rows, window = self.rounds_rows, self.cfg.train.final_window
        last = rows[-1] if rows else {}
        out: dict[str, Any] = {
            "name": self.cfg.name, "algorithm": self.cfg.algorithm,
            "handout": self.cfg.handout, "seed": self.cfg.seed,
            "rounds_done": self.round, "final_window": window,
            "seconds_per_round": self.elapsed / max(self.round, 1),
        }
        for key in ("acc_after", "acc_global", "acc_before", "acc_test"):
            out[f"{key}_last"] = last.get(key, float("nan"))
            out[f"{key}_window"] = windowed(rows, key, window)
        if client_rows:
            for key in ("acc_final", "acc_finetune", "acc_finetune_bnrecal"):
                out[f"{key}_mean"] = _mean(client_rows, key)
        return out

    # ----- checkpoints ------------------------------------------------------------------
    def write_tables(self) -> None:
        """``rounds.parquet`` and ``layers.parquet`` with every round done so far."""
        self.writer.write_rounds(self.rounds_rows)
        self.writer.write_layers(self.layers_rows)

    def checkpoint(self) -> Path:
        """The round tables so far, then the driver's state in one file and the clients' state
        in parts beside it (a resume reads the tables up to the checkpoint's round)."""
        self.write_tables()
        return self.writer.save_checkpoint(self.round - 1, {
            "next_round": self.round, "global_state": self.global_state,
            "ref_state": self.ref_state, "server_state": self.server_state,
            "density": self.rounds_rows[-1]["density"], "elapsed": self.elapsed,
            **({"freeze": self.freezer.state()} if self.freezer is not None else {}),
            **({"lips_score": self.score} if self.handout.score_part is not None else {}),
        }, write_client_state=self._write_client_state)

    def _write_client_state(self, folder: Path) -> list[int]:
        """Each pool's client state as parts of at most about ``STATE_PART_BYTES`` (plus one
        entry) in ``folder``: written by the pool itself where it sees the folder (same node
        or shared storage), else sent to this process to write; so neither this process nor
        a pool ever holds a second copy of all of it. Returns the parts' sizes in order."""
        batches = [_cut(entries, STATE_PART_BYTES) for entries in self.pools.state_index()]
        if not any(batches):
            return []
        probe = folder / f".probe-{secrets.token_hex(8)}"
        open_new(probe).close()
        try:
            direct = self.pools.sees(str(probe))
        finally:
            probe.unlink()
        sizes: list[int] = []
        for step in range(max(len(own) for own in batches)):
            keys = [own[step] if step < len(own) else [] for own in batches]
            files = {pool: folder / f"{len(sizes) + k:05d}.pt"
                     for k, pool in enumerate(p for p, own in enumerate(keys) if own)}
            requests = [StatePartRequest(own, str(files[pool]) if own and direct[pool] else None)
                        for pool, own in enumerate(keys)]
            replies = self.pools.save_state(requests)
            for pool in files:  # in file order
                if replies[pool].entries is not None:
                    with open_new(files[pool]) as handle:
                        torch.save(replies[pool].entries, handle)
                    sizes.append(files[pool].stat().st_size)
                else:
                    sizes.append(replies[pool].nbytes)
        return sizes

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.round = checkpoint["next_round"]
        self.global_state = checkpoint["global_state"]
        self.ref_state = checkpoint["ref_state"]
        self.server_state = checkpoint.get("server_state", self.server_state)
        self.elapsed = checkpoint["elapsed"]
        self.rounds_rows = [r for r in self.writer.read_table(ROUNDS_FILE)
                            if r["round"] < self.round]
        self.layers_rows = [r for r in self.writer.read_table(LAYERS_FILE)
                            if r["round"] < self.round]
        self.updates = eligible_update(self.layers_rows)
        self.last_sparse = max((r["round"] for r in self.rounds_rows if r["density"] < 1.0),
                               default=None)
        if self.freezer is not None:
            self.freezer.restore(checkpoint["freeze"], self.layers_rows)
        self.score = checkpoint.get("lips_score")  # lips.mask: shared
        self.pools.set_global(self.round - 1, self.global_state, checkpoint["density"],
                              self.score)
        # Part by part, each pool gets its own clients' entries (whatever the pool count was)
        owner = {client: pool for pool, block in enumerate(self.assignment) for client in block}
        for part in checkpoint.get("client_state", ()):
            per_pool: list[ClientState] = [{} for _ in self.assignment]
            for slot, entries in part.items():
                slot = LEGACY_CLIENT_SLOTS.get(slot, slot)
                for client, entry in entries.items():
                    if int(client) in owner:
                        per_pool[owner[int(client)]].setdefault(slot, {})[client] = entry
            if any(per_pool):
                self.pools.import_state(per_pool)

    def close(self) -> None:
        self.pools.shutdown()


def drive(run: FederatedRun,
          after_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Advance ``run`` to its end and return its summary; ``after_round`` sees each round's row
    (a Tune trial reports it). ``ray-lips run`` on Ray advances its driver actors the same way,
    a step (``FederatedRun.advance``) at a time."""
    while isinstance(step := run.advance(), RoundDone):
        if after_round is not None:
            after_round(step.row)
    return step.summary


def run_local(config: ExperimentConfig | dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Run a whole experiment in this process, without Ray (tests, GPU boxes without Ray)."""
    cfg = config if isinstance(config, ExperimentConfig) else validate_config(config)
    run = FederatedRun(cfg, run_dir)
    try:
        return drive(run)
    except BaseException as err:
        run.writer.write_end(err)  # as well as the disk allows; the error is this one
        raise
    finally:
        run.close()
