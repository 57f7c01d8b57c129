"""The paper's rounds on one GPU (issue 12): per-client step times, whole rounds, bf16 vs fp32.

Three parts (``--parts``, default all), each writing its numbers under ``--out`` as it goes (a
part killed by a time limit leaves the rows it finished):

- ``steps``: milliseconds per client per SGD step of vgg11_bn (CIFAR-10) and resnet8 (CIFAR-100)
  at the paper's client shape (100 uint8 images 3x32x32, batch 100, 5 steps = 5 local epochs,
  crop + flip on the device), through the trainers' own code: ``training.local_train`` (one
  client at a time, what ``SerialTrainer`` runs) and ``batched.ClientGroup.train`` (G clients as
  one wide model of grouped convolutions, what ``GroupTrainer`` runs); fp32 and bf16 autocast,
  NCHW and channels-last; FLOPs per step from ``FlopCounterMode`` and the achieved TFLOP/s
  against the device's measured dense matrix-product rate (``matmul.csv``).
- ``rounds``: whole rounds of the paper's configs (``sweeps/paper_cifar10.yaml``,
  ``sweeps/paper_cifar100.yaml``) through ``FederatedRun`` with in-process pools (the path of
  ``ray-lips run --local``), one pool on one device, on the project's ``synthetic`` dataset
  (3x32x32, 10 or 100 classes, augmentation on): seconds per round split into training,
  hand-out, aggregation, evaluation, inertia metrics, writing and the rest, and a 300-round
  extrapolation. The split wraps the engine's own calls (synchronising the device at each
  boundary); nothing in the engine is changed.
- ``accuracy``: a short run of fp32 and of bf16 (same seed, same data), windowed accuracy.

    python benchmarks/bench_gpu.py --device cuda --out gpu_out      # on the GPU machine
    python benchmarks/bench_gpu.py --device cpu --quick --out /tmp/b # CPU smoke size

Files: ``env.json``, ``matmul.csv``, ``steps.csv``, ``rounds.csv`` (one row per timed round),
``rounds_summary.csv``, ``accuracy.csv``, ``accuracy_summary.csv``, ``summary_<part>.json`` and
a readable ``<part>.txt`` per part.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from common import ROOT, markdown_table  # noqa: E402

from ray_lips.models import build_model  # noqa: E402
from ray_lips.training.batched import ClientGroup  # noqa: E402
from ray_lips.training.local import LocalSettings, Normalisation, local_train  # noqa: E402

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
PAPER = {  # model: (the paper's config for it, classes)
    "vgg11_bn": ("sweeps/paper_cifar10.yaml", 10),
    "resnet8": ("sweeps/paper_cifar100.yaml", 100),
}
PARTS = ("steps", "rounds", "accuracy")


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: the paper's (default) or a tiny CPU smoke run (``--quick``)."""

    images: int  # training images per client
    batch: int
    steps: int  # local steps per timed call (the paper: 5 epochs of one batch)
    groups: tuple[int, ...]
    repeats: int
    clients: int
    test_per_client: int
    train_size: int  # synthetic dataset split sizes
    test_size: int
    rounds: int  # timed rounds per round variant
    serial_rounds: int
    acc_rounds: int
    matmul_n: int
    variants: str
    acc_model: str
    layouts: tuple[str, ...] = ("nchw", "nhwc")  # step layouts besides the serial fp32 NCHW
    side: int = 32  # images are 3 x side x side
    step_models: str = "vgg11_bn,resnet8"
    eval_test_samples: int | None = None  # None: the config's (2000 global test samples)


FULL = Sizes(images=100, batch=100, steps=5, groups=(1, 8, 32, 100), repeats=3, clients=100,
             test_per_client=400, train_size=10000, test_size=10000, rounds=20,
             serial_rounds=3, acc_rounds=30, matmul_n=8192,
             variants="vgg11_bn:auto:fp32,vgg11_bn:auto:bf16,resnet8:auto:fp32,"
                      "vgg11_bn:100:bf16,resnet8:auto:bf16,vgg11_bn:serial:fp32",
             acc_model="vgg11_bn")
QUICK = Sizes(images=2, batch=2, steps=1, groups=(1, 2), repeats=1, clients=2,
              test_per_client=4, train_size=200, test_size=200, rounds=2, serial_rounds=1,
              acc_rounds=2, matmul_n=128,
              variants="resnet8:auto:fp32,resnet8:2:bf16,vgg11_bn:serial:fp32",
              acc_model="resnet8", layouts=("nhwc",), side=16, step_models="resnet8",
              eval_test_samples=8)


# ----- small helpers ------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from ray_lips.pools.memory import peak_rss_mb

    return peak_rss_mb()


class Table:
    """A CSV file written row by row (flushed), so a killed run keeps what it measured."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        self.rows: list[dict[str, Any]] = []
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(columns)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_cell(row.get(c, "")) for c in self.columns])

    def rewrite(self) -> None:
        """Write every row again (after values were filled in that needed later rows)."""
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            writer.writerows([_cell(r.get(c, "")) for c in self.columns] for r in self.rows)


def _cell(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


class Budget:
    """A soft time limit (None: none): parts stop starting new measurements once it is
    spent."""

    def __init__(self, seconds: float | None):
        self.end = math.inf if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0

    def share(self, parts: int) -> Budget:
        """An equal share of what is left among ``parts`` measurements still to come."""
        return Budget(None if math.isinf(self.end) else self.left() / max(parts, 1))


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Versions, device and the numeric settings the measurements ran with."""
    env: dict[str, Any] = {
        "argv": sys.argv, "quick": args.quick, "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(device), "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env["cpu"] = _cpu_name()
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----- the device's matrix-product rate -----------------------------------------------------
def matmul_rates(device: torch.device, n: int, out: Path) -> dict[str, float]:
    """TFLOP/s of a large dense ``torch.matmul`` per precision: bf16, fp32 (full precision) and,
    on CUDA, fp32 with TF32 allowed (what cuDNN's fp32 convolutions use by default)."""
    table = Table(out / "matmul.csv", ["precision", "n", "iters", "seconds", "tflops"])
    kinds = [("bf16", torch.bfloat16, "highest"), ("fp32", torch.float32, "highest")]
    if device.type == "cuda":
        kinds.append(("tf32", torch.float32, "high"))
    rates = {}
    saved = torch.get_float32_matmul_precision()
    for name, dtype, precision in kinds:
        torch.set_float32_matmul_precision(precision)
        try:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            torch.matmul(a, b)
            sync(device)
            iters, seconds = 1, 0.0
            while True:  # double the count until one timing lasts long enough to trust
                started = time.perf_counter()
                for _ in range(iters):
                    torch.matmul(a, b)
                sync(device)
                seconds = time.perf_counter() - started
                if seconds > 0.2 or iters >= 256:
                    break
                iters *= 2
            rates[name] = 2 * n**3 * iters / seconds / 1e12
            table.add({"precision": name, "n": n, "iters": iters, "seconds": seconds,
                       "tflops": rates[name]})
            del a, b
        finally:
            torch.set_float32_matmul_precision(saved)
    return rates


def conv_rate_key(precision: str, device: torch.device) -> str:
    """The matrix rate a step's arithmetic is compared with: bf16, or for fp32 on CUDA the
    TF32 rate when cuDNN may use TF32 (its default), else full fp32."""
    if precision == "bf16":
        return "bf16"
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


# ----- part 1: per-client step times --------------------------------------------------------
@dataclass(frozen=True)
class StepConfig:
    model: str
    path: str  # "serial" (local_train) or "grouped" (ClientGroup)
    clients: int
    precision: str
    layout: str  # "nchw" or "nhwc" (channels-last)

    def priority(self) -> tuple[int, int]:
        """Most telling first, so a budget cut leaves the key rows: the serial baseline,
        grouped bf16 channels-last from the largest group down, then the rest."""
        if self.path == "serial" and self.precision == "fp32" and self.layout == "nchw":
            rank = 0
        elif self.precision == "bf16" and self.layout == "nhwc":
            rank = 1
        elif self.layout == "nhwc":
            rank = 2
        else:
            rank = 3
        return rank, -self.clients if self.path == "grouped" else 1


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normalisation,
               batch: int) -> float:
    """FLOPs of one training step of one client (forward and backward, as counted by
    ``FlopCounterMode``: convolutions and matrix products), through ``local_train``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model)
    settings = LocalSettings(epochs=1, batch_size=batch, lr=0.1, momentum=0.9, weight_decay=0.0)
    counter = FlopCounterMode(display=False)
    with counter:
        local_train(model, x[:batch], y[:batch], settings, norm, torch.Generator().manual_seed(0),
                    torch.Generator().manual_seed(1))
    return float(counter.get_total_flops())


def time_call(call: Callable[[], None], prepare: Callable[[], None], repeats: int,
              device: torch.device) -> list[float]:
    """Seconds of ``call`` after one warm-up, ``repeats`` times; ``prepare`` runs untimed
    before each (it reloads the start state, so every call trains the same thing)."""
    times = []
    for i in range(repeats + 1):
        prepare()
        sync(device)
        started = time.perf_counter()
        call()
        sync(device)
        if i:
            times.append(time.perf_counter() - started)
    return times


def measure_step(cfg: StepConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 sizes: Sizes, device: torch.device) -> tuple[float, int]:
    """Best seconds of one call (``sizes.steps`` local steps of every client) and the number
    of client-steps in it."""
    norm = Normalisation(CIFAR_MEAN, CIFAR_STD, augment=True)
    settings = LocalSettings(epochs=sizes.steps, batch_size=sizes.batch, lr=0.1, momentum=0.9,
                             weight_decay=0.0, precision=cfg.precision)
    channels_last = cfg.layout == "nhwc"
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.path == "serial":
        one = copy.deepcopy(model)
        if channels_last:
            one = one.to(memory_format=torch.channels_last)
        xs, ys = x[0], y[0]

        def serial() -> None:
            local_train(one, xs, ys, settings, norm, torch.Generator().manual_seed(0),
                        torch.Generator().manual_seed(1))

        times = time_call(serial, lambda: one.load_state_dict(start), sizes.repeats, device)
        return min(times), sizes.steps
    g = cfg.clients
    group = ClientGroup(model, g, channels_last=channels_last)
    xg, yg = x[:g], y[:g]

    def grouped() -> None:
        group.train(xg, yg, settings, norm,
                    batch_gens=[torch.Generator().manual_seed(k) for k in range(g)],
                    augment_gens=[torch.Generator().manual_seed(g + k) for k in range(g)])

    times = time_call(grouped, lambda: group.load([start] * g), sizes.repeats, device)
    return min(times), sizes.steps * g


def run_steps(args: argparse.Namespace, sizes: Sizes, device: torch.device, out: Path,
              budget: Budget) -> dict[str, Any]:
    rates = matmul_rates(device, args.matmul_n or sizes.matmul_n, out)
    groups = tuple(int(g) for g in args.groups.split(",")) if args.groups else sizes.groups
    models = (args.models or sizes.step_models).split(",")
    precisions = args.precisions.split(",")
    layouts = args.layouts.split(",") if args.layouts else list(sizes.layouts)
    configs = [StepConfig(m, "serial", 1, "fp32", "nchw") for m in models]
    configs += [StepConfig(m, "serial", 1, p, lay) for m in models for p in precisions
                for lay in layouts if (p, lay) != ("fp32", "nchw")]
    configs += [StepConfig(m, "grouped", g, p, lay) for m in models for g in groups
                for p in precisions for lay in layouts]
    configs.sort(key=lambda c: (*c.priority(), models.index(c.model)))
    columns = ["model", "path", "clients", "precision", "layout", "images", "batch", "steps",
               "ms_per_call", "ms_per_client_step", "gflop_per_client_step", "tflops",
               "matmul_tflops", "fraction_of_matmul", "speedup_vs_serial_same_precision_layout",
               "peak_mem_mb", "repeats", "error"]
    table = Table(out / "steps.csv", columns)
    gen = torch.Generator().manual_seed(0)
    most = max(groups)
    x = torch.randint(0, 256, (most, sizes.images, 3, sizes.side, sizes.side), generator=gen,
                      dtype=torch.uint8).to(device)
    built: dict[str, Any] = {}
    flops: dict[str, float] = {}
    serial_ms: dict[tuple[str, str, str], float] = {}
    skipped = 0
    try:
        for cfg in configs:
            if budget.spent():
                skipped += 1
                continue
            if cfg.model not in built:
                classes = PAPER[cfg.model][1]
                torch.manual_seed(0)
                shape = (3, sizes.side, sizes.side)
                built[cfg.model] = build_model(cfg.model, shape, classes).to(device)
                y_all = torch.randint(0, classes, (most, sizes.images), generator=gen)
                built[cfg.model + ":y"] = y_all.to(device)
                flops[cfg.model] = step_flops(built[cfg.model], x[0], y_all[0].to(device),
                                              Normalisation(CIFAR_MEAN, CIFAR_STD, augment=True),
                                              sizes.batch)
            model, y = built[cfg.model], built[cfg.model + ":y"]
            row: dict[str, Any] = {"model": cfg.model, "path": cfg.path, "clients": cfg.clients,
                                   "precision": cfg.precision, "layout": cfg.layout,
                                   "images": sizes.images, "batch": sizes.batch,
                                   "steps": sizes.steps, "repeats": sizes.repeats,
                                   "gflop_per_client_step": flops[cfg.model] / 1e9}
            reset_peak(device)
            try:
                seconds, client_steps = measure_step(cfg, model, x, y, sizes, device)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # e.g. out of memory
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                table.add(row)
                print(f"steps {cfg}: {row['error']}", flush=True)
                continue
            ms = 1000 * seconds / client_steps
            rate = flops[cfg.model] / (ms / 1000) / 1e12
            matmul = rates.get(conv_rate_key(cfg.precision, device), math.nan)
            row.update(ms_per_call=1000 * seconds, ms_per_client_step=ms, tflops=rate,
                       matmul_tflops=matmul, fraction_of_matmul=rate / matmul,
                       peak_mem_mb=peak_mb(device))
            if cfg.path == "serial":
                serial_ms[(cfg.model, cfg.precision, cfg.layout)] = ms
            table.add(row)
            print(f"steps {cfg.model} {cfg.path} G={cfg.clients} {cfg.precision} {cfg.layout}: "
                  f"{ms:.3f} ms/client-step, {rate:.3g} TFLOP/s", flush=True)
    finally:  # also when stopped by a time limit: keep what was measured
        for row in table.rows:  # the serial rows of a precision and layout may come later
            key = (row["model"], row["precision"], row["layout"])
            if key in serial_ms and "ms_per_client_step" in row:
                row["speedup_vs_serial_same_precision_layout"] = (serial_ms[key]
                                                                  / row["ms_per_client_step"])
        table.rewrite()
        summary = steps_summary(table.rows, rates, skipped)
        write_json(out / "summary_steps.json", summary)
        text = steps_text(table.rows, rates, summary, device)
        (out / "steps.txt").write_text(text + "\n")
        print(text, flush=True)
    return summary


def steps_summary(rows: list[dict[str, Any]], rates: dict[str, float],
                  skipped: int) -> dict[str, Any]:
    """Per model: the best one-at-a-time and best grouped rows and their ratio."""
    out: dict[str, Any] = {"matmul_tflops": rates, "configs_skipped_for_budget": skipped}
    for model in sorted({r["model"] for r in rows}):
        done = [r for r in rows if r["model"] == model and "ms_per_client_step" in r]
        serial = [r for r in done if r["path"] == "serial"]
        grouped = [r for r in done if r["path"] == "grouped"]
        best_serial = min(serial, key=lambda r: r["ms_per_client_step"], default=None)
        best_grouped = min(grouped, key=lambda r: r["ms_per_client_step"], default=None)
        base = next((r for r in serial if r["precision"] == "fp32" and r["layout"] == "nchw"),
                    None)
        entry: dict[str, Any] = {"best_serial": best_serial, "best_grouped": best_grouped,
                                 "serial_fp32_nchw": base}
        if best_serial and best_grouped:
            entry["best_grouped_vs_best_serial"] = (best_serial["ms_per_client_step"]
                                                    / best_grouped["ms_per_client_step"])
        if base and best_grouped:
            entry["best_grouped_vs_serial_fp32_nchw"] = (base["ms_per_client_step"]
                                                         / best_grouped["ms_per_client_step"])
        out[model] = entry
    return out


def steps_text(rows: list[dict[str, Any]], rates: dict[str, float], summary: dict[str, Any],
               device: torch.device) -> str:
    lines = ["# Per-client step times (bench_gpu.py steps)", "",
             "Dense matrix-product rate of the device: "
             + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in rates.items()), ""]
    header = ["model", "path", "G", "precision", "layout", "ms / client-step", "ms / call",
              "GFLOP / client-step", "TFLOP/s", "x matmul rate", "x serial", "peak MB"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], r["path"], r["clients"], r["precision"], r["layout"],
                         r["error"], "", "", "", "", "", ""])
            continue
        body.append([r["model"], r["path"], r["clients"], r["precision"], r["layout"],
                     r["ms_per_client_step"], r["ms_per_call"], r["gflop_per_client_step"],
                     r["tflops"], r["fraction_of_matmul"],
                     r.get("speedup_vs_serial_same_precision_layout", "-"), r["peak_mem_mb"]])
    lines.append(markdown_table(header, body))
    lines.append("")
    for model, entry in summary.items():
        if not isinstance(entry, dict) or "best_serial" not in entry:
            continue
        if entry.get("best_grouped_vs_best_serial") is not None:
            g, s = entry["best_grouped"], entry["best_serial"]
            lines.append(f"{model}: best grouped (G={g['clients']} {g['precision']} "
                         f"{g['layout']}) {g['ms_per_client_step']:.3f} ms/client-step is "
                         f"{entry['best_grouped_vs_best_serial']:.2f}x the best one at a time "
                         f"({s['precision']} {s['layout']}, {s['ms_per_client_step']:.3f} ms) "
                         f"and {entry.get('best_grouped_vs_serial_fp32_nchw', math.nan):.2f}x "
                         "serial fp32 NCHW")
    if summary.get("configs_skipped_for_budget"):
        lines.append(f"{summary['configs_skipped_for_budget']} configurations skipped: the "
                     "part's time budget was spent")
    lines.append(f"(peak MB: {'GPU memory allocated' if device.type == 'cuda' else 'process RSS'})")
    return "\n".join(lines)


# ----- part 2: whole rounds -----------------------------------------------------------------
class PhaseClock:
    """Exclusive wall seconds per phase: entering a nested phase pauses the enclosing one.
    On CUDA each boundary synchronises the device, so queued work is charged to its phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.stack: list[str] = []
        self.mark = 0.0

    def _switch(self) -> float:
        sync(self.device)
        now = time.perf_counter()
        if self.stack:
            key = self.stack[-1]
            self.seconds[key] = self.seconds.get(key, 0.0) + now - self.mark
        self.mark = now
        return now

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        self._switch()
        self.stack.append(key)
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(key):
                return fn(*args, **kwargs)

        return timed

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, {}
        return taken


class StopwatchView:
    """Stands in for the pools' ``Stopwatch`` ("train", "evaluate") and feeds the clock."""

    def __init__(self, clock: PhaseClock):
        self.clock = clock
        self.seconds = {"train": 0.0, "evaluate": 0.0}

    def __call__(self, key: str) -> Any:
        return self.clock(key)


PHASES = ("train", "handout", "aggregate", "evaluate", "inertia", "write", "other")


@contextmanager
def instrumented(run: Any, clock: PhaseClock) -> Iterator[None]:
    """Time the engine's own calls of one ``FederatedRun`` by phase (instance attributes and
    two module-level names, restored afterwards):

    - train: the trainers' "train" stopwatch (local SGD of the clients);
    - evaluate: their "evaluate" stopwatch (acc_before, acc_global, acc_after, acc_test);
    - handout: ``set_global`` and ``handout_step.handed`` (LIPS's sparse copies, built when a
      client starts training and again when what it holds is scored);
    - aggregate: ``add_client`` (the pools' fixed-point sums), the driver's ``_averages`` and
      the algorithm's ``aggregate``;
    - inertia: ``layer_metrics``; write: the run folder's tables, status and checkpoints;
    - other: the rest of the round (loading groups, copying states, bookkeeping).
    """
    import ray_lips.core.run as experiment_mod
    import ray_lips.pools.client_pool as pool_mod

    saved = (pool_mod.add_client, experiment_mod.layer_metrics)
    pool_mod.add_client = clock.wrap("aggregate", pool_mod.add_client)
    experiment_mod.layer_metrics = clock.wrap("inertia", experiment_mod.layer_metrics)
    for pool in run.pools.pools:
        view = StopwatchView(clock)
        pool.stopwatch = pool.serial.timed = pool.trainer.timed = view
        pool.handout_step.handed = clock.wrap("handout", pool.handout_step.handed)
        pool.set_global = clock.wrap("handout", pool.set_global)
    run._averages = clock.wrap("aggregate", run._averages)
    run.algorithm.aggregate = clock.wrap("aggregate", run.algorithm.aggregate)
    for name in ("write_rounds", "write_layers", "write_status"):
        setattr(run.writer, name, clock.wrap("write", getattr(run.writer, name)))
    run.checkpoint = clock.wrap("write", run.checkpoint)
    try:
        yield
    finally:
        pool_mod.add_client, experiment_mod.layer_metrics = saved


@contextmanager
def cached_datasets() -> Iterator[None]:
    """Generate each synthetic dataset once per process (variants share it); the engine reads
    the dataset, never changes it."""
    import ray_lips.core.run as experiment_mod

    original = experiment_mod.load_dataset
    cache: dict[str, Any] = {}

    def load(data: Any) -> Any:
        key = data.model_dump_json()
        if key not in cache:
            cache[key] = original(data)
        return cache[key]

    experiment_mod.load_dataset = load
    try:
        yield
    finally:
        experiment_mod.load_dataset = original


def round_config(model: str, mode: str, precision: str, sizes: Sizes, device: torch.device,
                 output: Path, rounds: int | None = None, noise: float | None = None,
                 seed: int = 0) -> Any:
    """The paper's config for ``model`` on the synthetic CIFAR-shaped dataset, one pool on
    ``device``; ``mode``: "auto" (the default grouping), "serial" or a group size."""
    from ray_lips.config import load_config

    path, classes = PAPER[model]
    sets = [f"name=bench_{model}", f"seed={seed}", "data.dataset=synthetic",
            f"data.synthetic.shape=[3, {sizes.side}, {sizes.side}]",
            f"data.synthetic.classes={classes}",
            f"data.synthetic.train_size={sizes.train_size}",
            f"data.synthetic.test_size={sizes.test_size}", "data.augment=true",
            "resources.pools=1", "resources.cpus_per_pool=1", "resources.driver_cpus=0",
            f"resources.gpus_per_pool={1 if device.type == 'cuda' else 0}",
            f"train.precision={precision}", f"output={output}"]
    if noise is not None:
        sets.append(f"data.synthetic.noise={noise}")
    if sizes is QUICK:
        sets += [f"data.clients={sizes.clients}", f"data.train_per_client={sizes.images}",
                 f"data.test_per_client={sizes.test_per_client}",
                 f"train.batch_size={sizes.batch}", f"train.local_epochs={sizes.steps}"]
    if sizes.eval_test_samples is not None:
        sets.append(f"train.eval_test_samples={sizes.eval_test_samples}")
    if rounds is not None:
        sets += [f"train.rounds={rounds}", f"train.final_window={max(1, min(10, rounds // 2))}"]
    if mode == "serial":
        sets.append("train.batched=false")
    elif mode == "auto":
        sets += ["train.batched=auto", "train.batch_clients=auto"]
    else:
        sets += ["train.batched=true", f"train.batch_clients={int(mode)}"]
    return load_config(ROOT / path, sets)


def run_rounds(args: argparse.Namespace, sizes: Sizes, device: torch.device, out: Path,
               budget: Budget) -> dict[str, Any]:
    from ray_lips.core.run import FederatedRun

    variants = [v.split(":") for v in (args.variants or sizes.variants).split(",")]
    timed = args.rounds or sizes.rounds
    columns = (["model", "mode", "precision", "group_size", "round", "density", "evaluated",
                "round_s", "engine_seconds"] + [f"{p}_s" for p in PHASES]
               + ["acc_after", "acc_global", "train_loss"])
    table = Table(out / "rounds.csv", columns)
    summary_cols = (["model", "mode", "precision", "group_size", "clients", "rounds_timed",
                     "setup_s", "first_round_s", "mean_round_s", "median_round_s",
                     "min_round_s"] + [f"mean_{p}_s" for p in PHASES]
                    + ["est_300_rounds_s", "est_300_rounds_min", "peak_mem_mb", "stopped_by",
                       "error"])
    summary_table = Table(out / "rounds_summary.csv", summary_cols)
    scratch = Path(tempfile.mkdtemp(prefix="bench_gpu_runs_"))
    try:
        with cached_datasets():
            for i, (model, mode, precision) in enumerate(variants):
                if budget.spent():
                    summary_table.add({"model": model, "mode": mode, "precision": precision,
                                       "rounds_timed": 0, "stopped_by": "budget: not run"})
                    continue
                want = sizes.serial_rounds if mode == "serial" else timed
                one_round_variant(model, mode, precision, sizes, device, scratch, want,
                                  budget.share(len(variants) - i), table, summary_table,
                                  FederatedRun)
                print(f"rounds {model} {mode} {precision}: {summary_table.rows[-1]}",
                      flush=True)
    finally:  # also when stopped by a time limit: keep what was measured
        shutil.rmtree(scratch, ignore_errors=True)
        result = {"variants": summary_table.rows}
        write_json(out / "summary_rounds.json", result)
        text = rounds_text(summary_table.rows, sizes)
        (out / "rounds.txt").write_text(text + "\n")
        print(text, flush=True)
    return result


def one_round_variant(model: str, mode: str, precision: str, sizes: Sizes,
                      device: torch.device, scratch: Path, want: int, budget: Budget,
                      table: Table, summary_table: Table, federated_run: Any) -> None:
    """Set up one run, time up to ``want`` rounds (fewer when ``budget`` is spent); its
    rounds go to ``table``, its summary to ``summary_table`` (also when interrupted)."""
    summary: dict[str, Any] = {"model": model, "mode": mode, "precision": precision}
    reset_peak(device)
    run = None
    rows: list[dict[str, Any]] = []
    try:
        cfg = round_config(model, mode, precision, sizes, device,
                           scratch / f"{model}_{mode}_{precision}")
        summary["clients"] = cfg.data.clients
        started = time.perf_counter()
        run = federated_run(cfg, scratch / f"run_{model}_{mode}_{precision}")
        sync(device)
        summary["setup_s"] = time.perf_counter() - started
        summary["group_size"] = int(run.pools.pools[0].group_size)
        clock = PhaseClock(device)
        with instrumented(run, clock):
            for _ in range(want):
                if budget.spent() and rows:
                    summary["stopped_by"] = "budget"
                    break
                with clock("other"):
                    engine_row = run.run_round()
                phases = clock.take()
                row = {"model": model, "mode": mode, "precision": precision,
                       "group_size": summary["group_size"], "round": engine_row["round"],
                       "density": engine_row["density"], "evaluated": engine_row["evaluated"],
                       "round_s": sum(phases.values()), "engine_seconds": engine_row["seconds"],
                       "acc_after": engine_row["acc_after"],
                       "acc_global": engine_row["acc_global"],
                       "train_loss": engine_row["train_loss"]}
                row.update({f"{p}_s": phases.get(p, 0.0) for p in PHASES})
                rows.append(row)
                table.add(row)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        summary["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    except BaseException:
        summary["stopped_by"] = "interrupted (time limit)"
        raise
    finally:
        if run is not None:
            run.close()
        summary["peak_mem_mb"] = peak_mb(device)
        summary.update(extrapolate(rows, summary.get("setup_s", 0.0)))
        summary_table.add(summary)


def extrapolate(rows: list[dict[str, Any]], setup_s: float, total: int = 300) -> dict[str, Any]:
    """Round statistics and a ``total``-round estimate: setup + the first (warm-up) round +
    the mean of the later timed rounds for each further round (20 timed rounds hold the same
    share of sparsity rounds, every 5th, as 300)."""
    if not rows:
        return {"rounds_timed": 0}
    times = [r["round_s"] for r in rows]
    later = rows[1:] or rows
    mean = statistics.fmean(r["round_s"] for r in later)
    out: dict[str, Any] = {
        "rounds_timed": len(rows), "first_round_s": times[0], "mean_round_s": mean,
        "median_round_s": statistics.median(r["round_s"] for r in later),
        "min_round_s": min(r["round_s"] for r in later),
    }
    for phase in PHASES:
        out[f"mean_{phase}_s"] = statistics.fmean(r[f"{phase}_s"] for r in later)
    est = setup_s + times[0] + (total - 1) * mean
    out.update(est_300_rounds_s=est, est_300_rounds_min=est / 60)
    return out


def rounds_text(rows: list[dict[str, Any]], sizes: Sizes) -> str:
    shape = (f"{sizes.clients} clients x {sizes.images} images, {sizes.steps} local epochs, "
             f"batch {sizes.batch}")
    lines = ["# Whole rounds through FederatedRun, in-process pools (bench_gpu.py rounds)", "",
             f"Paper configs on synthetic 3x{sizes.side}x{sizes.side} data ({shape}), LIPS "
             "(cifar10 file: d0 0.5, T 5; cifar100 file: d0 0.3, T 5), augmentation on, one "
             "pool. Seconds per round "
             "are the mean over the timed rounds after the first; phases are exclusive wall "
             "seconds (device synchronised at each boundary).", ""]
    header = (["model", "mode", "precision", "G", "rounds", "setup s", "first s", "s/round",
               "median"] + list(PHASES) + ["300 rounds min", "peak MB", "note"])
    body = []
    for r in rows:
        if not r.get("rounds_timed"):
            body.append([r["model"], r["mode"], r["precision"], r.get("group_size", "-"), 0]
                        + ["-"] * (6 + len(PHASES))
                        + [r.get("error") or r.get("stopped_by") or "not run"])
            continue
        body.append([r["model"], r["mode"], r["precision"], r.get("group_size", "-"),
                     r["rounds_timed"], r["setup_s"], r["first_round_s"], r["mean_round_s"],
                     r["median_round_s"]] + [r[f"mean_{p}_s"] for p in PHASES]
                    + [r["est_300_rounds_min"], r["peak_mem_mb"],
                       r.get("error") or r.get("stopped_by") or ""])
    lines.append(markdown_table(header, body))
    lines.append("")
    lines.append("300 rounds = setup + first round + 299 x mean of the later rounds; the final "
                 "fine-tuning (finish) is not included.")
    return "\n".join(lines)


# ----- part 3: fp32 against bf16 ------------------------------------------------------------
def run_accuracy(args: argparse.Namespace, sizes: Sizes, device: torch.device, out: Path,
                 budget: Budget) -> dict[str, Any]:
    from ray_lips.core.run import FederatedRun, windowed

    rounds = args.acc_rounds if args.acc_rounds is not None else sizes.acc_rounds
    seeds = [int(s) for s in args.acc_seeds.split(",")]
    table = Table(out / "accuracy.csv", ["model", "precision", "seed", "round", "evaluated",
                                         "acc_after", "acc_global", "acc_before", "acc_test",
                                         "train_loss", "seconds"])
    summary_table = Table(out / "accuracy_summary.csv",
                          ["model", "precision", "seed", "rounds", "window", "acc_after_window",
                           "acc_global_window", "acc_test_window", "bf16_minus_fp32_acc_after",
                           "seconds", "stopped_by"])
    model = args.acc_model or sizes.acc_model
    scratch = Path(tempfile.mkdtemp(prefix="bench_gpu_acc_"))
    runs = [(seed, precision) for seed in seeds for precision in ("fp32", "bf16")]
    fp32_window: dict[int, float] = {}
    try:
        with cached_datasets():
            for i, (seed, precision) in enumerate(runs):
                if rounds <= 0 or budget.spent():
                    break
                share = budget.share(len(runs) - i)
                cfg = round_config(model, "auto", precision, sizes, device,
                                   scratch / f"{precision}_{seed}", rounds=rounds,
                                   noise=args.acc_noise, seed=seed)
                run = FederatedRun(cfg, scratch / f"run_{precision}_{seed}")
                rows: list[dict[str, Any]] = []
                stopped = ""
                started = time.perf_counter()
                try:
                    while not run.done:
                        if share.spent() and rows:
                            stopped = "budget"
                            break
                        row = run.run_round()
                        rows.append(row)
                        table.add({"model": model, "precision": precision, "seed": seed, **row})
                except BaseException:
                    stopped = "interrupted (time limit)"
                    raise
                finally:
                    run.close()
                    window = cfg.train.final_window
                    entry = {"model": model, "precision": precision, "seed": seed,
                             "rounds": len(rows), "window": window,
                             "acc_after_window": windowed(rows, "acc_after", window),
                             "acc_global_window": windowed(rows, "acc_global", window),
                             "acc_test_window": windowed(rows, "acc_test", window),
                             "seconds": time.perf_counter() - started, "stopped_by": stopped}
                    if precision == "fp32":
                        fp32_window[seed] = entry["acc_after_window"]
                    elif seed in fp32_window:
                        entry["bf16_minus_fp32_acc_after"] = (entry["acc_after_window"]
                                                              - fp32_window[seed])
                    summary_table.add(entry)
                    print(f"accuracy {entry}", flush=True)
    finally:  # also when stopped by a time limit: keep what was measured
        shutil.rmtree(scratch, ignore_errors=True)
        result = {"runs": summary_table.rows}
        write_json(out / "summary_accuracy.json", result)
        header = ["model", "precision", "seed", "rounds", "window", "acc_after (window)",
                  "acc_global (window)", "acc_test (window)", "bf16 - fp32", "seconds", "note"]
        body = [[r["model"], r["precision"], r["seed"], r["rounds"], r["window"],
                 r["acc_after_window"], r["acc_global_window"], r["acc_test_window"],
                 r.get("bf16_minus_fp32_acc_after", "-"), r["seconds"], r["stopped_by"]]
                for r in summary_table.rows]
        text = "\n".join(["# fp32 against bf16 autocast (bench_gpu.py accuracy)", "",
                          f"{model}, paper config on synthetic 3x{sizes.side}x{sizes.side} "
                          f"data, up to {rounds} rounds each, same seed and data; windowed = "
                          "mean of the last `window` evaluated rounds.", "",
                          markdown_table(header, body)])
        (out / "accuracy.txt").write_text(text + "\n")
        print(text, flush=True)
    return result


# ----- main ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default="gpu_out", help="folder for every output file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke test")
    parser.add_argument("--parts", default=",".join(PARTS), help="steps,rounds,accuracy")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="soft time limit of the parts run (0: none); measurements not "
                             "started by then are skipped and said so")
    parser.add_argument("--models", default="",
                        help="models of the steps part (vgg11_bn,resnet8; --quick: resnet8)")
    parser.add_argument("--groups", default="", help="group sizes G (default 1,8,32,100)")
    parser.add_argument("--precisions", default="fp32,bf16", help="precisions of the steps")
    parser.add_argument("--layouts", default="",
                        help="layouts of the steps: nchw,nhwc (--quick: nhwc; serial fp32 "
                             "NCHW, the baseline, is always timed)")
    parser.add_argument("--matmul-n", type=int, default=0, help="matrix size of the rate test")
    parser.add_argument("--variants", default="",
                        help="round variants MODEL:MODE:PRECISION, MODE auto|serial|G "
                             f"(default {FULL.variants})")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per variant (20)")
    parser.add_argument("--acc-rounds", type=int, default=None,
                        help="rounds of each accuracy run (30; 0 skips the part)")
    parser.add_argument("--acc-seeds", default="0", help="seeds of the accuracy runs")
    parser.add_argument("--acc-model", default="", choices=["", *sorted(PAPER)],
                        help="model of the accuracy runs (vgg11_bn; --quick: resnet8)")
    parser.add_argument("--acc-noise", type=float, default=None,
                        help="noise of the synthetic data in the accuracy runs (config: 1.0)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN pick kernels by timing them (the engine does not)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: run the finally blocks
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "env.json", environment(device, args))
    budget = Budget(args.budget_s if args.budget_s > 0 else None)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for part in parts:
        if part not in PARTS:
            parser.error(f"--parts: unknown part {part!r}; choose from {', '.join(PARTS)}")
    runners = {"steps": run_steps, "rounds": run_rounds, "accuracy": run_accuracy}
    for i, part in enumerate(parts):
        started = time.perf_counter()
        runners[part](args, sizes, device, out, budget.share(len(parts) - i))
        print(f"part {part}: {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
