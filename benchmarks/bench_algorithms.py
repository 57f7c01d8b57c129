"""What an algorithm's local objective costs per local step, against FedAvg's.

Trains one client of the paper's shape (100 samples of 3x32x32, batch 100, SGD momentum 0.9)
through the path pools take on this device (``train.batched: auto``: on CPU a group of one,
channels-last; ``--serial``: ``local_train``) with the correction each algorithm adds:
none (FedAvg), FedProx's proximal pull, SCAFFOLD's control-variate offset, and Ditto's
personal objective (a proximal pull, so FedProx's cost). The variants are interleaved in
``--repeats`` rounds and each reports its fastest, in CPU seconds of this process (one thread
by default), which other load on a shared machine disturbs far less than wall time.

    .venv/bin/python benchmarks/bench_algorithms.py --models resnet8 --steps 10 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch

from ray_lips.models import build_model
from ray_lips.training.batched import ClientGroup
from ray_lips.training.local import Correction, LocalSettings, Normalisation, local_train


def corrections(state: dict[str, torch.Tensor], params: list[str]) -> dict[str, Correction | None]:
    anchor = {n: state[n].clone() for n in params}
    offset = {n: torch.randn_like(state[n]) * 1e-3 for n in params}
    return {"fedavg": None, "fedprox": Correction(coef=0.01, anchor=anchor),
            "scaffold": Correction(offset=offset)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet8")
    parser.add_argument("--steps", type=int, default=10, help="local steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--serial", action="store_true", help="local_train instead of a group")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = LocalSettings(epochs=args.steps, batch_size=100, lr=0.1, momentum=0.9,
                             weight_decay=0.0)
    norm = Normalisation((0.5,) * 3, (0.25,) * 3, augment=False)
    print(f"{'model':<10s} {'algorithm':<10s} {'CPU ms/step':>12s} {'vs fedavg':>10s}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, (3, 32, 32), 10)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        params = [n for n, _ in model.named_parameters()]
        x, y = torch.rand(100, 3, 32, 32), torch.randint(0, 10, (100,))
        group = None if args.serial else ClientGroup(model, 1)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for label, correction in corrections(state, params).items():
                gens = (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
                started = time.process_time()
                if group is None:
                    model.load_state_dict(state)
                    local_train(model, x, y, settings, norm, *gens, correction=correction)
                else:
                    group.load([state])
                    group.train(x[None], y[None], settings, norm, [gens[0]], [gens[1]],
                                corrections=[correction])
                seconds = (time.process_time() - started) / args.steps
                best[label] = min(best.get(label, float("inf")), seconds)
        for label, seconds in best.items():
            print(f"{name:<10s} {label:<10s} {seconds * 1e3:12.1f} "
                  f"{seconds / best['fedavg']:9.3f}x")


if __name__ == "__main__":
    main()
