"""Seconds per round: the serial floor against ray-lips, one client at a time and batched.

One run measures, on the same workload (the paper's client shape: 100 clients x 100 samples,
5 local epochs, batch 100, synthetic 3x32x32 data, LIPS d0 = 0.5, T = 5):

- floor: the same clients' ``local_train`` one after another in one process: no Ray, no
  aggregation, no hand-out, all CPU threads (``--cpus``), with the malloc thresholds every
  pool sets (``ray_lips.pools.allocator``); and once more with glibc's defaults, to show what that
  setting is worth;
- ray-lips on a private local Ray with 1 pool (``--cpus`` threads) and 2 pools (half each),
  training one client at a time (``train.batched=false``) and batched (``true``) with the
  device's default group size (1 on CPU, up to 32 on CUDA) and in groups of half a pool's
  clients (25 of the 50 a pool hosts).

Each measurement runs in a fresh interpreter (clean peak RSS, its own Ray), warms up with one
round (round 0, which also evaluates), then times ``--rounds`` rounds without evaluation and
keeps the fastest (the machine may be shared; ``--quiet`` waits for a low load average before
each measurement, and the table shows the load during it). The table gives seconds per round,
the ratio to the floor, the overhead (round time minus the slowest pool's time inside local
training) and peak RSS of the driver and the pools.

    python benchmarks/bench_rounds.py --quick               # a few minutes on 2 CPUs
    python benchmarks/bench_rounds.py                        # smallcnn and resnet8, paper shape
    python benchmarks/bench_rounds.py --models vgg11_bn --device cuda   # on a GPU box
    python benchmarks/bench_rounds.py --models vgg11_bn --device cuda --no-ray   # ... without Ray
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    emit,
    load,
    markdown_table,
    run_worker,
    start_ray,
    wait_for_quiet,
)

from ray_lips.pools.in_process import pool_stats  # noqa: E402
from ray_lips.pools.memory import peak_rss_mb  # noqa: E402

MODES = [  # (label, pools, batched, group): group None = the default for the device
    ("ray-lips, one at a time", 1, False, None),
    ("ray-lips, one at a time", 2, False, None),
    ("ray-lips, batched (default groups)", 1, True, None),
    ("ray-lips, batched (default groups)", 2, True, None),
    ("ray-lips, batched, grouped", 2, True, "half"),  # half a pool's clients per group
]


def workload(model: str, clients: int, samples: int, epochs: int, pools: int, cpus: int,
             device: str, batched: bool, precision: str = "fp32",
             group: int | None = None) -> dict[str, Any]:
    """A run config for the benchmark: evaluation and checkpoints only in the warm-up round."""
    gpus = 1.0 / pools if device == "cuda" else 0.0
    return {
        "name": "bench", "seed": 0, "model": model, "algorithm": "lips",
        "data": {"dataset": "synthetic", "partition": "dirichlet", "alpha": 0.1,
                 "clients": clients, "train_per_client": samples, "test_per_client": 20,
                 "synthetic": {"shape": [3, 32, 32], "classes": 10, "train_size": 5000,
                              "test_size": 1000}},
        "train": {"rounds": 1000, "local_epochs": epochs, "batch_size": 100, "lr": 0.1,
                  "momentum": 0.9, "eval_every": 1000, "eval_test_samples": 0,
                  "checkpoint_every": 1000, "finetune_epochs": 0, "batched": batched,
                  "batch_clients": group or "auto", "precision": precision},
        "lips": {"sparsity": 0.5, "period": 5},
        "resources": {"pools": pools, "cpus_per_pool": cpus / pools, "gpus_per_pool": gpus,
                      "timeout_s": 3600},
    }


# ----- workers (each in its own process) ------------------------------------------------------
def floor_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The floor: local_train of every client of one round, one after another, nothing else."""
    import torch

    from ray_lips.config import validate_config
    from ray_lips.core.run import build_payloads, initial_model
    from ray_lips.core.seeding import torch_generator
    from ray_lips.data import load_dataset
    from ray_lips.pools.allocator import keep_buffers_in_heap
    from ray_lips.pools.client_pool import local_settings, pick_device
    from ray_lips.training.local import local_train

    torch.set_num_threads(job["cpus"])
    if job["tuned_malloc"]:
        keep_buffers_in_heap()  # as every ClientPool does
    cfg = validate_config(job["config"])
    dataset = load_dataset(cfg.data)
    payload = build_payloads(cfg, dataset, [list(range(cfg.data.clients))])[0]
    device = pick_device(1.0 if job["device"] == "cuda" else 0.0)
    shards = [s.to(device) for s in payload.shards]
    model = initial_model(cfg, tuple(dataset.sample_shape), dataset.num_classes).to(device)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = local_settings(cfg)

    def one_round(round_idx: int, clients: list) -> float:
        started = time.perf_counter()
        for shard in clients:
            model.load_state_dict(start)
            local_train(model, shard.x_train, shard.y_train, settings, payload.norm,
                        torch_generator(cfg.seed, "batches", shard.client, round_idx),
                        torch_generator(cfg.seed, "augment", shard.client, round_idx))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    one_round(0, shards)  # warm-up: a whole round, as for ray-lips
    times = [one_round(r, shards) for r in range(1, job["rounds"] + 1)]
    return {"s_round": min(times), "train_s": min(times), "rounds_s": times,
            "driver_rss": peak_rss_mb(), "pool_rss": 0.0, "load": load()}


def ray_worker(job: dict[str, Any]) -> dict[str, Any]:
    """ray-lips on a private local Ray: a warm-up round, then timed rounds."""
    import torch

    from ray_lips.config import ExperimentConfig
    from ray_lips.core.run import FederatedRun
    from ray_lips.pools.in_process import local_pools

    torch.set_num_threads(job["cpus"])
    cfg = ExperimentConfig.model_validate(job["config"])
    make_pools = local_pools  # in this process, pools one after another (--no-ray)
    if not job["no_ray"]:
        from ray_lips.pools.ray_actors import RayPoolFactory

        start_ray(job["cpus"], 1 if job["device"] == "cuda" else 0)
        make_pools = RayPoolFactory(cfg.resources)
    with tempfile.TemporaryDirectory() as run_dir:
        run = FederatedRun(cfg, run_dir, make_pools=make_pools)
        try:
            run.run_round()  # warm-up (also evaluates)
            rounds = []  # (seconds, the slowest pool's seconds in local training)
            for _ in range(job["rounds"]):
                before = pool_stats(run.pools)
                started = time.perf_counter()
                run.run_round()
                seconds = time.perf_counter() - started
                after = pool_stats(run.pools)
                rounds.append((seconds, max(a["train_s"] - b["train_s"]
                                            for a, b in zip(after, before, strict=True))))
        finally:
            run.close()
    seconds, train = min(rounds)
    return {"s_round": seconds, "train_s": train, "rounds_s": [r[0] for r in rounds],
            "driver_rss": peak_rss_mb(), "pool_rss": max(a["peak_rss_mb"] for a in after),
            "group_size": int(after[0]["group_size"]) if after[0]["batched"] else "-",
            "load": load()}


# ----- the parent -----------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    size = dict(clients=8, samples=100, epochs=2) if args.quick else dict(
        clients=100, samples=100, epochs=5)
    rows = []
    for model in args.models.split(","):
        base = dict(model=model, **size, cpus=args.cpus, device=args.device,
                    precision=args.precision)
        jobs = [("floor: local_train one at a time, no Ray", 1, False, None, "floor"),
                ("(floor, glibc's default malloc thresholds)", 1, False, None, "floor-glibc")]
        modes = [m for m in MODES if m[1] == 1] if args.no_ray else MODES
        jobs += [(*mode, "ray") for mode in modes]
        for label, pools, batched, group, kind in jobs:
            if group == "half":  # 100 clients, 2 pools: groups of 25
                group = max(1, size["clients"] // pools // 2)
            config = workload(pools=pools, batched=batched, group=group, **base)
            job = {"kind": kind.split("-")[0], "config": config, "cpus": args.cpus,
                   "device": args.device, "rounds": args.rounds,
                   "tuned_malloc": kind != "floor-glibc", "no_ray": args.no_ray}
            if args.quiet:
                wait_for_quiet(args.quiet)
            result = run_worker(__file__, job)
            if args.no_ray and kind == "ray":
                label = label.replace("ray-lips", "ray-lips without Ray (in-process pool)")
            result.update(model=model, label=label, kind=kind,
                          pools=pools if kind == "ray" else 0,
                          threads=args.cpus // pools)
            rows.append(result)
            print(f"  {model:9s} {label:42s} pools={result['pools']} "
                  f"{result['s_round']:8.2f} s/round (load {result['load']:.1f})", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    floors = {r["model"]: r["s_round"] for r in rows if r["kind"] == "floor"}
    for r in rows:
        floor = floors[r["model"]]
        overhead = r["s_round"] - r["train_s"]
        out.append([r["model"], r["label"], r["pools"] or "-", r["threads"],
                    r.get("group_size", "-"), r["s_round"], r["s_round"] / floor,
                    floor / r["s_round"], overhead, r["driver_rss"],
                    r["pool_rss"] or "-", r["load"]])
    header = ["model", "mode", "pools", "threads/pool", "group", "s/round (best)", "x floor",
              "speed-up", "overhead s/round", "driver peak MB", "pool peak MB", "load avg"]
    return markdown_table(header, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 clients x 2 epochs")
    parser.add_argument("--models", default="smallcnn,resnet8")
    parser.add_argument("--cpus", type=int, default=2, help="CPU threads of the whole run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed rounds per measurement (the fastest is reported)")
    parser.add_argument("--quiet", type=float, default=0.0,
                        help="before each measurement wait (<= 15 min) for a load below this")
    parser.add_argument("--no-ray", action="store_true",
                        help="pools in this process instead of Ray actors (1-pool rows only), "
                             "for machines without Ray")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        emit(floor_worker(job) if job["kind"] == "floor" else ray_worker(job))
        return
    rows = measure(args)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
