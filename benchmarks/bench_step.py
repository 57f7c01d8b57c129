"""Milliseconds per client per SGD step: one client at a time against batched groups.

The evidence behind ``train.batched: auto``'s group size. For each workload it times one
training step (forward, backward, SGD with momentum) of

- ``local_train``'s model as is (NCHW) and channels-last, one client;
- the batched wide model (``ray_lips.batched.ClientGroup``) with groups of G clients, NCHW and
  channels-last; per client = step time / G.

Best of ``--repeats`` after a warm-up, so other work on the machine disturbs it little.

    python benchmarks/bench_step.py                        # CPU, 1 and 2 threads
    python benchmarks/bench_step.py --device cuda --groups 1,8,25,50,100 --threads 0
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402

from ray_lips.batched import ClientGroup, _client_losses, _SlotwiseSGD  # noqa: E402
from ray_lips.models import build_model  # noqa: E402
from ray_lips.training import Normalisation  # noqa: E402

WORKLOADS = {  # name: (model, sample shape, batch)
    "smallcnn 3x32x32 b100 (paper shape)": ("smallcnn", (3, 32, 32), 100),
    "resnet8 3x32x32 b100 (paper shape)": ("resnet8", (3, 32, 32), 100),
    "vgg11_bn 3x32x32 b100 (paper CIFAR-10)": ("vgg11_bn", (3, 32, 32), 100),
    "smallcnn 1x28x28 b20 (scale run)": ("smallcnn", (1, 28, 28), 20),
    "smallcnn 1x8x8 b40 (digits)": ("smallcnn", (1, 8, 8), 40),
    "resnet8_1d 1x40 b50 (mnist1d)": ("resnet8_1d", (1, 40), 50),
}


def best_ms(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    def timed() -> float:
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    timed()
    return 1000 * min(timed() for _ in range(repeats))


def serial_ms(model: nn.Module, shape: tuple[int, ...], batch: int, channels_last: bool,
              device: torch.device, repeats: int) -> float:
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()

    return best_ms(step, repeats, device)


def group_ms(model: nn.Module, shape: tuple[int, ...], batch: int, clients: int,
             channels_last: bool, device: torch.device, repeats: int) -> float:
    group = ClientGroup(model, clients, channels_last=channels_last)
    group.load([model.state_dict()] * clients)
    norm = Normalisation(mean=(0.0,) * shape[0], std=(1.0,) * shape[0], augment=False)
    inputs = group._inputs(torch.randn(clients * batch, *shape, device=device), norm, None)
    targets = torch.randint(0, 10, (clients, batch), device=device)
    params = list(group.wide.parameters())
    sgd = _SlotwiseSGD(params, lr=0.01, momentum=0.9, weight_decay=0.0)

    def step() -> None:
        for p in params:
            p.grad = None
        _client_losses(group.wide(inputs), targets).sum().backward()
        sgd.step()

    return best_ms(step, repeats, device) / clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", default="1,2", help="CPU threads to try (0: leave as is)")
    parser.add_argument("--groups", default="1,4,16")
    parser.add_argument("--workloads", default=",".join(str(i) for i in range(len(WORKLOADS))),
                        help="indices into the workload list")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    groups = [int(g) for g in args.groups.split(",")]
    names = [list(WORKLOADS)[int(i)] for i in args.workloads.split(",")]
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        if threads:
            torch.set_num_threads(threads)
        for name in names:
            model_name, shape, batch = WORKLOADS[name]
            model = build_model(model_name, shape, 10).to(device)
            image = len(shape) == 3
            row = [name, threads or torch.get_num_threads()]
            row.append(serial_ms(model, shape, batch, False, device, args.repeats))
            row.append(serial_ms(model, shape, batch, True, device, args.repeats)
                       if image else "-")
            for clients in groups:
                row.append(group_ms(model, shape, batch, clients, False, device, args.repeats))
                row.append(group_ms(model, shape, batch, clients, True, device, args.repeats)
                           if image else "-")
            rows.append(row)
            print(" | ".join(str(v if not isinstance(v, float) else round(v, 1))
                             for v in row), flush=True)
    header = ["workload", "threads", "local_train NCHW", "local_train NHWC"]
    for clients in groups:
        header += [f"G={clients} NCHW", f"G={clients} NHWC"]
    print()
    print("ms per client per step (lower is better)")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
