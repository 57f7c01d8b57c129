"""Seconds per round of this tree against an earlier git revision, on the same machine, in one
run: what a change of the engine costs (or saves).

Both versions run the same in-process rounds (one pool, no Ray, ``--threads`` threads) of the
same workload: ``--clients`` clients x 100 samples of synthetic 3x32x32, batch 100,
``--epochs`` local epochs, no evaluation after the warm-up round, for FedAvg and FedAvg + LIPS
(d0 = 0.5, T = 1, so every timed round builds sparse hand-outs). Each measurement is a fresh
interpreter; the two versions alternate ``--repeats`` times and each reports its fastest round,
in wall seconds and in the process's CPU seconds (steadier on a shared machine; use
``--threads 1`` to make it the whole story).

    .venv/bin/python benchmarks/bench_versions.py --rev HEAD~1 --models resnet8,smallcnn
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def config(model: str, algorithm: str, clients: int, epochs: int, threads: int) -> dict:
    return {
        "name": "bench", "seed": 0, "model": model, "algorithm": algorithm,
        "data": {"dataset": "synthetic", "partition": "dirichlet", "alpha": 0.1,
                 "clients": clients, "train_per_client": 100, "test_per_client": 20,
                 "synthetic": {"shape": [3, 32, 32], "classes": 10, "train_size": 5000,
                              "test_size": 1000}},
        "train": {"rounds": 1000, "local_epochs": epochs, "batch_size": 100, "lr": 0.1,
                  "eval_every": 1000, "eval_test_samples": 0, "checkpoint_every": 1000,
                  "finetune_epochs": 0},
        "lips": {"sparsity": 0.5, "period": 1},
        "resources": {"pools": 1, "cpus_per_pool": threads},
    }


def worker(job: dict) -> dict:
    """Runs in a fresh interpreter whose ``ray_lips`` is the version under test."""
    import torch

    torch.set_num_threads(job["threads"])
    import importlib

    from ray_lips.config import validate_config

    cfg = validate_config(job["config"])
    # where the driver loop lived: today, before the layout of folders, before the engine package
    for where in ("ray_lips.core.run", "ray_lips.engine.experiment", "ray_lips.experiment"):
        try:
            FederatedRun = importlib.import_module(where).FederatedRun  # noqa: N806
            break
        except ImportError:
            continue
    if where == "ray_lips.experiment":  # that driver took a dict
        cfg = job["config"]
    import ray_lips

    with tempfile.TemporaryDirectory() as run_dir:
        run = FederatedRun(cfg, run_dir)
        run.run_round()  # warm-up, evaluates
        times, cpu = [], []
        for _ in range(job["rounds"]):
            started, started_cpu = time.perf_counter(), time.process_time()
            run.run_round()
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        run.close()
    return {"s_round": min(times), "cpu_s_round": min(cpu),
            "source": str(Path(ray_lips.__file__).parent.parent)}


def run_job(job: dict, source: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": str(job["threads"])}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                          capture_output=True, text=True, cwd=source)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(done.stderr[-2000:])
    result = json.loads(lines[-1][len("RESULT "):])
    if Path(result["source"]).resolve() != source.resolve():
        raise RuntimeError(f"imported ray_lips from {result['source']}, not {source}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the earlier revision (git)")
    parser.add_argument("--models", default="resnet8")
    parser.add_argument("--algorithms", default="fedavg,lips")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="ray-lips-rev-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                        args.rev], check=True, capture_output=True)
        try:
            best: dict[tuple[str, str, str], float] = {}
            for _ in range(args.repeats):
                for model in args.models.split(","):
                    for algorithm in args.algorithms.split(","):
                        job = {"config": config(model, algorithm, args.clients, args.epochs,
                                                args.threads),
                               "threads": args.threads, "rounds": args.rounds}
                        for version, source in (("before", before), ("after", ROOT)):
                            result = run_job(job, source)
                            for kind in ("s_round", "cpu_s_round"):
                                key = (model, algorithm, version, kind)
                                best[key] = min(best.get(key, float("inf")), result[kind])
                            print(f"  {model} {algorithm} {version}: {result['s_round']:.3f} "
                                  f"s/round, {result['cpu_s_round']:.3f} CPU s/round",
                                  flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before)], check=False, capture_output=True)
    print(f"\n{'model':<10s} {'algorithm':<10s} {'seconds':<12s} {'before':>8s} {'after':>8s} "
          f"{'after/before':>13s}")
    for model in args.models.split(","):
        for algorithm in args.algorithms.split(","):
            for kind, name in (("s_round", "wall/round"), ("cpu_s_round", "CPU/round")):
                b = best[(model, algorithm, "before", kind)]
                a = best[(model, algorithm, "after", kind)]
                print(f"{model:<10s} {algorithm:<10s} {name:<12s} {b:8.3f} {a:8.3f} "
                      f"{a / b:12.3f}x")


if __name__ == "__main__":
    main()
