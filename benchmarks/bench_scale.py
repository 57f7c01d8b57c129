"""Scale: 10,000 and 100,000 clients x 20 samples against 1,000, 100 participants a round.

Every run has 100 participants a round (synthetic 1x28x28, smallcnn, 5 local epochs, batch
50, LIPS d0 = 0.5, T = 5, evaluation every round, 2 pools with 1 CPU each on a private local
Ray). If a round costs what its participants cost, seconds per round are the same for both.
The table also gives the time a round spends evaluating (the slowest pool's), the rest that is
neither training nor evaluating (aggregation, hand-out, orchestration), the setup time
(partition, payloads, pool start), peak RSS of driver and pools, and how much a pool's resident
memory grew from round 1 to the last round.

    python benchmarks/bench_scale.py                       # 20 rounds each, ~9 min on 2 CPUs
    python benchmarks/bench_scale.py --rounds 5 --clients 1000,10000 --finish
    python benchmarks/bench_scale.py --clients 1000,100000 --algorithm scaffold --handout lips

``--algorithm`` / ``--handout`` pick the method (default FedAvg with the LIPS hand-out, as the
rows in benchmarks/README.md): SCAFFOLD keeps a control variate per client that has taken part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, load, markdown_table, run_worker, start_ray  # noqa: E402

from ray_lips.pools.in_process import pool_stats  # noqa: E402
from ray_lips.pools.memory import current_rss_mb as rss_mb  # noqa: E402
from ray_lips.pools.memory import peak_rss_mb  # noqa: E402

PARTICIPANTS = 100


def scale_config(clients: int, rounds: int, batched: bool | str, cpus: int,
                 algorithm: str = "fedavg", handout: str = "lips") -> dict[str, Any]:
    return {
        "name": f"scale{clients}", "seed": 0, "model": "smallcnn", "algorithm": algorithm,
        "handout": handout,
        "data": {"dataset": "synthetic", "partition": "dirichlet", "alpha": 0.1,
                 "clients": clients, "train_per_client": 20, "test_per_client": 20,
                 "synthetic": {"shape": [1, 28, 28], "classes": 10, "train_size": 5000,
                              "test_size": 1000}},
        "train": {"rounds": rounds, "local_epochs": 5, "batch_size": 50,
                  "participation": PARTICIPANTS / clients, "eval_every": 1,
                  "checkpoint_every": 10, "finetune_epochs": 5, "batched": batched},
        "lips": {"sparsity": 0.5, "period": 5},
        "resources": {"pools": 2, "cpus_per_pool": cpus / 2},
    }


def worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ray_lips.config import ExperimentConfig
    from ray_lips.core.run import FederatedRun
    from ray_lips.pools.ray_actors import RayPoolFactory

    torch.set_num_threads(1)
    start_ray(job["cpus"], 0)
    cfg = ExperimentConfig.model_validate(job["config"])
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        run = FederatedRun(cfg, run_dir, make_pools=RayPoolFactory(cfg.resources))
        out["setup_s"] = time.perf_counter() - started
        out["driver_rss_after_setup"] = rss_mb()
        try:
            seconds, pool_rss, evaluate, overhead = [], [], [], []
            before = pool_stats(run.pools)
            while not run.done:
                started = time.perf_counter()
                row = run.run_round()
                seconds.append(time.perf_counter() - started)
                assert row["participants"] == PARTICIPANTS
                after = pool_stats(run.pools)
                pool_rss.append(max(s["rss_mb"] for s in after))
                pairs = list(zip(after, before, strict=True))
                evaluate.append(max(a["evaluate_s"] - b["evaluate_s"] for a, b in pairs))
                busy = max(a["train_s"] + a["evaluate_s"] - b["train_s"] - b["evaluate_s"]
                           for a, b in pairs)
                overhead.append(seconds[-1] - busy)
                before = after
            if job["finish"]:
                started = time.perf_counter()
                run.finish()
                out["finish_s"] = time.perf_counter() - started
            stats = pool_stats(run.pools)
        finally:
            run.close()
    out.update(seconds=seconds, pool_rss=pool_rss, overhead=overhead, evaluate=evaluate,
               driver_peak=peak_rss_mb(), driver_rss=rss_mb(),
               pool_peak=max(s["peak_rss_mb"] for s in stats),
               client_state_mb=sum(s["client_state_mb"] for s in stats),
               batched=bool(stats[0]["batched"]), group_size=int(stats[0]["group_size"]),
               load=load())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1000,10000")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batched", default="auto", help="true, false or auto")
    parser.add_argument("--finish", action="store_true", help="also time the final fine-tuning")
    parser.add_argument("--algorithm", default="fedavg")
    parser.add_argument("--handout", default="lips")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
        return
    batched = {"true": True, "false": False}.get(args.batched, args.batched)
    results = []
    for clients in (int(c) for c in args.clients.split(",")):
        job = {"config": scale_config(clients, args.rounds, batched, args.cpus, args.algorithm,
                                      args.handout),
               "cpus": args.cpus, "finish": args.finish}
        result = run_worker(__file__, job)
        result["clients"] = clients
        results.append(result)
        steady = result["seconds"][1:] or result["seconds"]
        print(f"  {clients} clients: {statistics.median(steady):.2f} s/round (median of rounds "
              f"1-{len(result['seconds']) - 1}), setup {result['setup_s']:.1f} s, "
              f"load {result['load']:.1f}", flush=True)
    base = statistics.median(results[0]["seconds"][1:] or results[0]["seconds"])
    rows = []
    for r in results:
        steady = r["seconds"][1:] or r["seconds"]
        median = statistics.median(steady)
        rows.append([r["clients"], PARTICIPANTS, len(r["seconds"]),
                     "batched" if r["batched"] else "one at a time", r["group_size"],
                     median, median / base, statistics.median(r["evaluate"][1:]),
                     statistics.median(r["overhead"][1:]),
                     r["seconds"][0], max(steady), r["setup_s"],
                     r.get("finish_s", "-"), r["driver_rss_after_setup"], r["driver_peak"],
                     r["pool_peak"], r["client_state_mb"],
                     r["pool_rss"][-1] - r["pool_rss"][0], r["load"]])
    header = ["clients", "participants", "rounds", "training", "group", "s/round (median)",
              "x first", "evaluation s/round", "other s/round", "round 0 s", "slowest round s",
              "setup s", "finish s", "driver MB after setup", "driver peak MB", "pool peak MB",
              "client state MB", "pool RSS growth MB", "load avg"]
    print()
    print(markdown_table(header, rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
