"""What an algorithm's local objective costs per local step, against FedAvg's.

Trains one client of the paper's shape (100 samples of 3x32x32, batch 100, SGD momentum 0.9)
through each built-in algorithm's own client side (its corrections, loss terms, phases and
local entries, with its default options) on the trainer pools take on this device
(``train.batched: auto``: on CPU a group of one, channels-last, whose jobs with a loss term
train one at a time; ``--serial``: the one-at-a-time trainer). A row is the CPU time of one
round divided by its local steps (the algorithm's local work in epochs x one step per epoch),
so Ditto's and FedRep's extra epochs count as more steps, not as dearer ones; FedPart is timed
in its first one-group round (after its warm-up). The algorithms are interleaved in
``--repeats`` rounds and each reports its fastest, in CPU seconds of this process (one thread
by default), which other load on a shared machine disturbs far less than wall time, after one
untimed warm-up round each.

    .venv/bin/python benchmarks/bench_algorithms.py --models resnet8 --steps 10 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch

from ray_lips.algorithms import registry
from ray_lips.algorithms.base import Algorithm, ClientRound
from ray_lips.pools.client_store import ClientStore
from ray_lips.pools.payload import ClientShard
from ray_lips.training.local import LocalSettings, Normalisation
from ray_lips.training.trainers import GroupTrainer, SerialTrainer, Stopwatch

CLASSES = 10


def first_round(algorithm: Algorithm) -> int:
    """The round to time: FedPart's first one-group round, else the first."""
    return getattr(algorithm.options, "warmup_rounds", 0)


def one_round(algorithm: Algorithm, trainer, store: ClientStore, state: dict,
              server_state: dict, counts: tuple[int, ...]) -> None:
    """One round of ``algorithm``'s client side for client 0."""
    round_ = ClientRound(
        store=store, global_state=state, handed=lambda client: state,
        round_idx=first_round(algorithm), message=algorithm.server_message(server_state),
        trainer=trainer, samples=lambda client: 100, total_weight=100, population_weight=100,
        evaluate=False, class_counts=lambda client: counts)
    algorithm.train(round_, [0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet8")
    parser.add_argument("--steps", type=int, default=10,
                        help="local epochs (one step each) of FedAvg per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--serial", action="store_true", help="one client at a time")
    parser.add_argument("--algorithms", default=",".join(registry.names()))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = LocalSettings(epochs=args.steps, batch_size=100, lr=0.1, momentum=0.9,
                             weight_decay=0.0)
    norm = Normalisation((0.5,) * 3, (0.25,) * 3, augment=False)
    names = args.algorithms.split(",")
    if "fedavg" not in names:
        names.insert(0, "fedavg")
    print(f"{'model':<10s} {'algorithm':<10s} {'steps':>6s} {'CPU ms/step':>12s} "
          f"{'vs fedavg':>10s}  local work per round")
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        from ray_lips.models import build_model

        model = build_model(model_name, (3, 32, 32), CLASSES)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        y = torch.arange(100) % CLASSES
        shard = ClientShard(0, torch.rand(100, 3, 32, 32), y[torch.randperm(100)],
                            torch.rand(10, 3, 32, 32), torch.arange(10))
        counts = tuple(int((shard.y_train == c).sum()) for c in range(CLASSES))
        serial = SerialTrainer(model, {0: shard}, settings, norm, 0, Stopwatch())
        trainer = serial if args.serial else GroupTrainer(
            model, {0: shard}, settings, norm, 0, 1, Stopwatch(), fallback=serial)
        setups = {}
        for name in names:
            cls = registry.algorithm_class(name)
            algorithm = cls(cls.Options(), settings, model)
            work = cls.local_work(algorithm.options, settings)
            setups[name] = (algorithm, work, ClientStore(),
                            algorithm.init_server_state(state))
        for algorithm, _, store, server_state in setups.values():  # warm-up, untimed
            one_round(algorithm, trainer, store, state, server_state, counts)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (algorithm, work, store, server_state) in setups.items():
                started = time.process_time()
                one_round(algorithm, trainer, store, state, server_state, counts)
                seconds = (time.process_time() - started) / work.epochs
                best[name] = min(best.get(name, float("inf")), seconds)
        for name, seconds in best.items():
            work = setups[name][1]
            print(f"{model_name:<10s} {name:<10s} {work.epochs:6g} {seconds * 1e3:12.1f} "
                  f"{seconds / best['fedavg']:9.3f}x  {work}")


if __name__ == "__main__":
    main()
