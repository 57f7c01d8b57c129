"""Flower's side of ``bench_peers.py``: the same FedAvg workload through Flower's simulation
engine (``flwr.simulation.run_simulation``, Ray backend). Runs in ``benchmarks/.flower-venv``
(``benchmarks/make_flower_venv.sh``), never in ray-lips's environment: Flower pins its own Ray.

The workload file (written by ``bench_peers.py``) holds every client's training arrays, the
initial model and the local settings. A ClientApp trains with
``ray_lips.training.local.local_train``
and the same per-client, per-round batch-order generator as ray-lips and the serial loop, so
the three differ only in orchestration and in how they average. Flower's own ``FedAvg``
strategy aggregates (weighted by the number of examples); training replies only, no federated
evaluation. Each round's end, and the moment its first client began training, are stamped with
``time.time()`` for the parent.

    benchmarks/.flower-venv/bin/python benchmarks/peers_flower.py --worker JOB_JSON
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ray_lips's plain-PyTorch modules (no Ray, no pydantic needed)
    sys.path.insert(0, str(ROOT))

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from ray_lips.core.seeding import torch_generator  # noqa: E402
from ray_lips.data.augment import Normalisation  # noqa: E402
from ray_lips.models import build_model  # noqa: E402
from ray_lips.training.local import LocalSettings, local_train  # noqa: E402

WORKLOAD_ENV = "BENCH_PEERS_WORKLOAD"


@functools.cache
def workload() -> dict:
    """The workload file, read once per process (each Flower actor keeps it)."""
    return torch.load(os.environ[WORKLOAD_ENV], weights_only=True)


@functools.cache
def client_model() -> torch.nn.Module:
    w = workload()
    return build_model(w["model"], tuple(w["sample_shape"]), w["num_classes"])


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    w = workload()
    client = int(context.node_config["partition-id"])
    round_idx = int(msg.content["config"]["server-round"]) - 1  # Flower counts from 1
    model = client_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = w["x_train"][client], w["y_train"][client]
    norm = Normalisation(tuple(w["mean"]), tuple(w["std"]), augment=False)
    local_train(model, x, y, LocalSettings(**w["settings"]), norm,
                torch_generator(w["seed"], "batches", client, round_idx),
                torch_generator(w["seed"], "augment", client, round_idx))
    metrics = MetricRecord({"num-examples": int(x.shape[0]),
                            "threads": torch.get_num_threads(), "started": started})
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                       "metrics": metrics}), reply_to=msg)


class StampedFedAvg(FedAvg):
    """Flower's FedAvg, stamping the wall-clock time at which each round's aggregate exists."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.round_ends: list[float] = []
        self.round_starts: list[float] = []  # when the round's first client began training
        self.threads: set[int] = set()

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        starts = []
        for reply in replies:
            if reply.has_content():
                self.threads.add(int(reply.content["metrics"]["threads"]))
                starts.append(float(reply.content["metrics"]["started"]))
        self.round_starts.append(min(starts))
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.round_ends.append(time.time())
        return arrays, metrics


server_app = ServerApp()
OUTCOME: dict = {}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    w = workload()
    clients = len(w["x_train"])
    strategy = StampedFedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                             min_train_nodes=clients, min_available_nodes=clients)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(w["init"]),
                            num_rounds=w["rounds"])
    OUTCOME.update(round_ends=strategy.round_ends, round_starts=strategy.round_starts,
                   threads=sorted(strategy.threads),
                   final=result.arrays.to_torch_state_dict())


def run(job: dict) -> dict:
    import peers_flower as app  # by module name, so Ray's workers import it rather than unpickle
    from flwr.simulation import run_simulation

    os.environ[WORKLOAD_ENV] = job["workload"]
    clients = len(app.workload()["x_train"])
    run_simulation(server_app=app.server_app, client_app=app.client_app, num_supernodes=clients,
                   backend_config={
                       "client_resources": {"num_cpus": job["client_cpus"], "num_gpus": 0.0},
                       "init_args": {"address": "local", "num_cpus": job["cpus"],
                                     "include_dashboard": False}})
    torch.save(app.OUTCOME["final"], job["final_state"])
    return {"round_ends": app.OUTCOME["round_ends"], "round_starts": app.OUTCOME["round_starts"],
            "threads": app.OUTCOME["threads"]}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    job = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    print("RESULT " + json.dumps(run(job)), flush=True)
