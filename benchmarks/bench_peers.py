"""ray-lips against Flower's simulation engine and a serial loop, on the same FedAvg work.

One workload, three orchestrations, interleaved in one run (each in a fresh process tree):

- serial: every client's ``local_train`` one after another in one process (all ``--cpus``
  threads), then a float64 weighted average; nothing else. The floor.
- Flower 1.42 (``flwr.simulation.run_simulation``, Ray backend, its own ``FedAvg``), in its own
  virtual environment (``bash benchmarks/make_flower_venv.sh``; Flower pins Ray 2.55.1). Two
  settings: 1 CPU per ClientApp (2 actors in parallel, 1 thread each) and Flower's default of
  2 CPUs per ClientApp (one actor, 2 threads).
- ray-lips with its defaults (2 pools x 1 CPU, FedAvg, dense hand-out): through the Python API
  (``FederatedRun`` on a private local Ray, as the driver actor runs it) and through the CLI a
  user types (``ray-lips run``, which also starts the driver actor and writes the run folder).

Same data (ray-lips's partition of the synthetic 3x32x32 set, Dirichlet 0.1), same initial
model, same local training (``ray_lips.training.local.local_train``: SGD lr 0.1, momentum 0.9,
batch 100, the same per-client, per-round batch order), every client in every round, no
federated evaluation in Flower (ray-lips evaluates in its first and last round; that is in
its numbers). So the final models differ only by how each averages (Flower: float32; serial:
float64; ray-lips: exact fixed point); the table shows their accuracy on the test set and the
largest weight difference against the serial loop.

Columns: start-up, the time from launching the process to the start of the first round's
training (imports, Ray start-up, actors, data; for Flower, the first ClientApp's ``train`` call;
for ``ray-lips run``, the end of round 1 as seen on disk less that round's own seconds); time
from launching the process to the end of the first round; seconds per round (median over the
rounds after the first and before the last); peak memory of the whole process tree (every
descendant: Ray's daemons, workers, actors), sampled every 0.25 s, as the sum of RSS (counts
shared pages once per process) and of PSS (shares them out).

    bash benchmarks/make_flower_venv.sh                    # once, ~3 min
    .venv/bin/python benchmarks/bench_peers.py --quick     # 20 clients, 1 epoch, ~2 min
    .venv/bin/python benchmarks/bench_peers.py             # 20 and 100 clients, paper shape
    .venv/bin/python benchmarks/bench_peers.py --workloads paper --rounds 4 \
        --modes serial,flower-1cpu,ray-lips                # the paper shape alone, ~20 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, emit, load, markdown_table, wait_for_quiet  # noqa: E402

FLOWER_VENV = Path(__file__).resolve().parent / ".flower-venv"
WORKLOADS = {  # --workloads id: (name, clients, samples per client, local epochs)
    "20": ("20 clients, 1 epoch", 20, 100, 1),
    "100": ("100 clients, 1 epoch", 100, 100, 1),
    "paper": ("paper shape: 100 clients, 5 epochs", 100, 100, 5),
}
MODES = ["serial", "flower-1cpu", "flower-default", "ray-lips", "ray-lips-cli"]
LABELS = {
    "serial": "serial loop, 2 threads",
    "flower-1cpu": "Flower, 1 CPU per ClientApp",
    "flower-default": "Flower, default 2 CPUs per ClientApp",
    "ray-lips": "ray-lips, Python API, 2 pools x 1 CPU",
    "ray-lips-cli": "ray-lips run (CLI)",
}


def run_config(clients: int, samples: int, epochs: int, rounds: int, cpus: int,
               output: str = "runs/bench_peers") -> dict[str, Any]:
    """The workload as a ray-lips config: FedAvg, the defaults' 2 pools x 1 CPU."""
    return {
        "name": "peers", "seed": 0, "model": "smallcnn", "algorithm": "fedavg",
        "data": {"dataset": "synthetic", "partition": "dirichlet", "alpha": 0.1,
                 "clients": clients, "train_per_client": samples, "test_per_client": 20,
                 "synthetic": {"shape": [3, 32, 32], "classes": 10,
                              "train_size": clients * samples, "test_size": 2000}},
        "train": {"rounds": rounds, "local_epochs": epochs, "batch_size": 100, "lr": 0.1,
                  "momentum": 0.9, "eval_every": 10_000, "eval_test_samples": 0,
                  "checkpoint_every": 10_000, "finetune_epochs": 0},
        "resources": {"pools": 2, "cpus_per_pool": cpus / 2},
        "output": output,
    }


# ----- the workload every orchestration reads -------------------------------------------------
def export_workload(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the clients' data, the initial model and the local settings where the serial loop
    and Flower read them; return the test set and normalisation for scoring."""
    import torch

    from ray_lips.config import validate_config
    from ray_lips.core.run import build_payloads, initial_model
    from ray_lips.data import load_dataset
    from ray_lips.pools.client_pool import local_settings

    cfg = validate_config(config)
    dataset = load_dataset(cfg.data)
    payload = build_payloads(cfg, dataset, [list(range(cfg.data.clients))])[0]
    shards = payload.shards
    model = initial_model(cfg, tuple(dataset.sample_shape), dataset.num_classes)
    settings = local_settings(cfg)
    torch.save({
        "model": cfg.model, "sample_shape": list(dataset.sample_shape),
        "num_classes": dataset.num_classes, "seed": cfg.seed, "rounds": cfg.train.rounds,
        "x_train": [s.x_train.clone() for s in shards],
        "y_train": [s.y_train.clone() for s in shards],
        "init": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "mean": list(payload.norm.mean), "std": list(payload.norm.std),
        "settings": {"epochs": settings.epochs, "batch_size": settings.batch_size,
                     "lr": settings.lr, "momentum": settings.momentum,
                     "weight_decay": settings.weight_decay, "grad_clip": settings.grad_clip,
                     "precision": settings.precision},
    }, path)
    return {"x_test": dataset.x_test, "y_test": dataset.y_test, "norm": payload.norm,
            "model": cfg.model, "sample_shape": tuple(dataset.sample_shape),
            "num_classes": dataset.num_classes}


# ----- workers (each in its own process tree) -------------------------------------------------
def serial_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Train every client one after another, then average; ``job["average"]``: ``"float64"``
    (the benchmark's floor, the default) or ``"fixed"`` (ray-lips's exact fixed-point FedAvg,
    so that tests can compare the two orchestrations bit for bit). The model runs in the
    workload's dtype (its initial state's)."""
    import torch

    from ray_lips.core.aggregate import FixedSum, add_client, to_state
    from ray_lips.core.seeding import torch_generator
    from ray_lips.data.augment import Normalisation
    from ray_lips.models import build_model
    from ray_lips.pools.allocator import keep_buffers_in_heap
    from ray_lips.training.local import LocalSettings, local_train

    average = job.get("average", "float64")
    if average not in ("float64", "fixed"):
        raise ValueError(f"average: 'float64' or 'fixed', not {average!r}")
    torch.set_num_threads(job["cpus"])
    keep_buffers_in_heap()  # as ray-lips's pools do
    w = torch.load(job["workload"], weights_only=True)
    state = w["init"]
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    model = build_model(w["model"], tuple(w["sample_shape"]), w["num_classes"]).to(dtype)
    settings = LocalSettings(**w["settings"])
    norm = Normalisation(tuple(w["mean"]), tuple(w["std"]), augment=False)
    total = sum(int(y.shape[0]) for y in w["y_train"])
    round_ends, round_starts = [], []
    for round_idx in range(w["rounds"]):
        round_starts.append(time.time())
        summed = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
        fixed: FixedSum = {}
        for client, (x, y) in enumerate(zip(w["x_train"], w["y_train"], strict=True)):
            model.load_state_dict(state)
            local_train(model, x, y, settings, norm,
                        torch_generator(w["seed"], "batches", client, round_idx),
                        torch_generator(w["seed"], "augment", client, round_idx))
            weight = y.shape[0] / total
            if average == "fixed":
                add_client(fixed, model.state_dict(), weight, client=client)
            else:
                for k, v in model.state_dict().items():
                    summed[k] += v.double() * weight
        state = (to_state(fixed, state) if average == "fixed"
                 else {k: summed[k].to(v.dtype) for k, v in state.items()})
        round_ends.append(time.time())
    torch.save(state, job["final_state"])
    return {"round_ends": round_ends, "round_starts": round_starts,
            "threads": [torch.get_num_threads()]}


def raylips_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ray_lips.cluster import connect as runtime
    from ray_lips.config import validate_config
    from ray_lips.core.run import FederatedRun
    from ray_lips.pools.ray_actors import RayPoolFactory

    cfg = validate_config(job["config"])
    runtime.connect(num_cpus=job["cpus"])
    round_ends, round_starts = [], []
    with tempfile.TemporaryDirectory() as run_dir:
        run = FederatedRun(cfg, run_dir, make_pools=RayPoolFactory(cfg.resources))
        try:
            while not run.done:
                round_starts.append(time.time())
                run.run_round()
                round_ends.append(time.time())
            torch.save(run.global_state, job["final_state"])
        finally:
            run.close()
    return {"round_ends": round_ends, "round_starts": round_starts, "threads": [1]}


# ----- launching and watching a process tree ---------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            kids[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    return kids


def tree_memory_mb(root: int) -> tuple[float, float, int]:
    """(sum of RSS, sum of PSS, number of processes) of ``root`` and all its descendants."""
    kids, todo, rss, pss, count = _children(), [root], 0, 0, 0
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
            count += 1
        except OSError:
            continue
    return rss / 1024, pss / 1024, count


def first_round_done(out_dir: Path) -> bool:
    """Whether a run folder below ``out_dir`` says (``status.json``, rewritten every round)
    that its first round is done."""
    for status in out_dir.glob("*/status.json"):
        try:
            if int(json.loads(status.read_text()).get("round", 0)) >= 1:
                return True
        except (OSError, ValueError):  # replaced as it was read: the next look sees it
            continue
    return False


def watch(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float,
          first_round: Path | None = None) -> tuple[str, dict[str, float]]:
    """Run ``cmd``; sample its process tree's memory; when ``first_round`` (a folder of run
    folders) is given, note when a run there first says its first round is done
    (``first_file_at``). Returns stdout and the readings (``launched`` is a wall-clock
    time)."""
    readings = {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0}
    launched = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda s=s, k=k: out.__setitem__(k, s.read()))
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    deadline = launched + timeout
    while proc.poll() is None:
        rss, pss, count = tree_memory_mb(proc.pid)
        readings["rss_mb"] = max(readings["rss_mb"], rss)
        readings["pss_mb"] = max(readings["pss_mb"], pss)
        readings["processes"] = max(readings["processes"], count)
        if first_round is not None and "first_file_at" not in readings:
            if first_round_done(first_round):
                readings["first_file_at"] = time.time()
        if time.time() > deadline:
            proc.kill()
            break
        time.sleep(0.25)
    for t in readers:
        t.join()
    readings["launched"] = launched
    readings["ended"] = time.time()
    if proc.returncode != 0:
        sys.stderr.write(out.get("stdout", "")[-3000:] + out.get("stderr", "")[-5000:])
        raise RuntimeError(f"{cmd[:3]} failed with exit {proc.returncode}")
    return out.get("stdout", ""), readings


def result_of(stdout: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {}


def measure_one(mode: str, config: dict[str, Any], workload: Path, scratch: Path,
                cpus: int, timeout: float) -> dict[str, Any]:
    final_state = scratch / f"final_{mode}.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_TELEMETRY_ENABLED="0")
    job = {"mode": mode, "workload": str(workload), "final_state": str(final_state),
           "config": config, "cpus": cpus}
    first_round = None
    if mode.startswith("flower"):
        python = FLOWER_VENV / "bin" / "python"
        job["client_cpus"] = 1 if mode == "flower-1cpu" else 2
        cmd = [str(python), str(ROOT / "benchmarks" / "peers_flower.py"), "--worker",
               json.dumps(job)]
    elif mode == "ray-lips-cli":
        out_dir = scratch / "cli_runs"
        shutil.rmtree(out_dir, ignore_errors=True)  # a repeat looks for its own run folder
        config_path = scratch / "cli.yaml"
        config_path.write_text(json.dumps(dict(config, output=str(out_dir))))  # JSON is YAML
        cmd = [str(Path(sys.executable).with_name("ray-lips")), "run", str(config_path)]
        first_round = out_dir
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    stdout, readings = watch(cmd, env, ROOT, timeout, first_round)
    result = result_of(stdout)
    if mode == "ray-lips-cli":
        import pandas as pd

        run_dir = next(out_dir.glob("*/rounds.parquet")).parent
        seconds = pd.read_parquet(run_dir / "rounds.parquet")["seconds"].tolist()
        result = {"round_s": seconds, "first_round_at": readings["first_file_at"],
                  "first_start_at": readings["first_file_at"] - seconds[0], "threads": [1]}
        final_state = run_dir / "model_final.pt"
    else:
        ends = result["round_ends"]
        result["round_s"] = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
        result["first_round_at"] = ends[0]
        result["first_start_at"] = result["round_starts"][0]
    steady = result["round_s"][:-1] if mode != "ray-lips-cli" else result["round_s"][1:-1]
    return {"mode": mode, "start_s": result["first_start_at"] - readings["launched"],
            "first_round_s": result["first_round_at"] - readings["launched"],
            "s_round": statistics.median(steady), "rounds_s": result["round_s"],
            "total_s": readings["ended"] - readings["launched"],
            "rss_mb": readings["rss_mb"], "pss_mb": readings["pss_mb"],
            "processes": readings["processes"], "threads": result.get("threads"),
            "final_state": str(final_state), "load": load()}


def score(rows: list[dict[str, Any]], test: dict[str, Any]) -> None:
    """Test accuracy of every final model, and its largest weight difference to the serial
    loop's."""
    import torch

    from ray_lips.models import build_model
    from ray_lips.training.local import accuracy

    model = build_model(test["model"], test["sample_shape"], test["num_classes"])
    states = {r["mode"]: torch.load(r["final_state"], weights_only=True) for r in rows}
    reference = states.get("serial")
    for r in rows:
        state = states[r["mode"]]
        model.load_state_dict(state)
        r["acc_test"] = accuracy(model, test["x_test"], test["y_test"], test["norm"])
        r["max_abs_diff"] = (max(float((state[k].double() - reference[k].double()).abs().max())
                                 for k in reference if reference[k].is_floating_point())
                             if reference is not None else float("nan"))


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    if any(m.startswith("flower") for m in args.modes) and not (FLOWER_VENV / "bin").exists():
        sys.exit(f"no Flower environment at {FLOWER_VENV}: run bash benchmarks/make_flower_venv.sh"
                 " (or leave Flower out with --modes serial,ray-lips,ray-lips-cli)")
    rows = []
    for workload_id in ["20"] if args.quick else args.workloads:
        name, clients, samples, epochs = WORKLOADS[workload_id]
        config = run_config(clients, samples, epochs, args.rounds, args.cpus)
        with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
            scratch = Path(tmp)
            test = export_workload(config, scratch / "workload.pt")
            for repeat in range(args.repeats):
                measured = []
                for mode in args.modes:
                    if args.quiet:
                        wait_for_quiet(args.quiet)
                    row = measure_one(mode, config, scratch / "workload.pt", scratch,
                                      args.cpus, args.timeout)
                    row.update(workload=name, clients=clients, epochs=epochs, repeat=repeat)
                    measured.append(row)
                    print(f"  {name:36s} {LABELS[mode]:40s} start-up {row['start_s']:5.1f} s,"
                          f" first round {row['first_round_s']:6.1f}"
                          f" s, {row['s_round']:6.2f} s/round, tree RSS {row['rss_mb']:6.0f} MB"
                          f" (load {row['load']:.1f})", flush=True)
                score(measured, test)
                rows += measured
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        serial = next(s for s in rows if s["mode"] == "serial" and s["workload"] == r["workload"]
                      and s["repeat"] == r["repeat"])
        out.append([r["workload"], LABELS[r["mode"]], r["start_s"], r["first_round_s"],
                    r["s_round"],
                    r["s_round"] / serial["s_round"], r["total_s"], r["rss_mb"], r["pss_mb"],
                    r["processes"], f"{r['acc_test']:.4f}", f"{r['max_abs_diff']:.1e}",
                    r["load"]])
    header = ["workload", "orchestration", "launch to 1st round start s",
              "launch to 1st round end s", "s/round",
              "x serial", "total s", "tree peak RSS MB", "tree peak PSS MB", "processes",
              "final test acc", "max |w - w_serial|", "load avg"]
    return markdown_table(header, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 20-client workload")
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS),
                        help="comma-separated subset of " + ",".join(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per run (s/round: the median of rounds 2..rounds-1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="cycle through the orchestrations this many times per workload")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=MODES,
                        help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--cpus", type=int, default=2, help="CPUs every orchestration gets")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--quiet", type=float, default=0.0,
                        help="before each measurement wait (<= 15 min) for a load below this")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        emit(serial_worker(job) if job["mode"] == "serial" else raylips_worker(job))
        return
    unknown = (set(args.modes) - set(MODES)) | (set(args.workloads) - set(WORKLOADS))
    if unknown or args.rounds < 3:
        parser.error(f"unknown modes or workloads {sorted(unknown)}" if unknown
                     else "--rounds must be >= 3")
    rows = measure(args)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
