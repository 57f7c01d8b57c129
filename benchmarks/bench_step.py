"""Milliseconds per client per SGD step: one client at a time against batched groups.

The evidence behind ``train.batched: auto``'s group size. For each workload it times one
training step (forward, backward, SGD with momentum) of

- ``local_train``'s model as is (NCHW) and channels-last, one client;
- the batched wide model (``ray_lips.training.batched.ClientGroup``) with groups of G clients,
  NCHW and
  channels-last; per client = step time / G.

Best of ``--repeats`` after a warm-up, so other work on the machine disturbs it little. A
second table gives each workload's FLOPs per step, the rate one client at a time reaches, and
the rate of a large convolution on the same threads: how much any batching could still gain.

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

from ray_lips.models import build_model  # noqa: E402
from ray_lips.pools.allocator import keep_buffers_in_heap  # noqa: E402
from ray_lips.training.batched import ClientGroup, _client_losses, _SlotwiseSGD  # noqa: E402
from ray_lips.training.local import Normalisation  # noqa: E402

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


def step_gflop(model: nn.Module, shape: tuple[int, ...], batch: int,
               device: torch.device) -> float:
    """Floating-point work of one training step (forward and backward, convolutions and
    matrix products as counted by torch's FlopCounterMode), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def conv_gflops(device: torch.device, repeats: int) -> float:
    """The rate this machine's convolution kernels reach on a large layer (3x3, 256 -> 256
    channels, 32x32, batch 16, channels-last, forward): what the arithmetic of a training step
    could run at if nothing else cost time."""
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(16, 256, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ms = best_ms(lambda: conv(x), max(repeats, 5), device)
    return 2 * 256 * 256 * 9 * 32 * 32 * 16 / (ms / 1000) / 1e9


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
    parser.add_argument("--glibc-malloc", action="store_true",
                        help="keep glibc's default mmap/trim thresholds (pools raise them)")
    args = parser.parse_args()
    if not args.glibc_malloc:
        keep_buffers_in_heap()
    device = torch.device(args.device)
    groups = [int(g) for g in args.groups.split(",")]
    names = [list(WORKLOADS)[int(i)] for i in args.workloads.split(",")]
    rows, bounds = [], []
    for threads in (int(t) for t in args.threads.split(",")):
        if threads:
            torch.set_num_threads(threads)
        peak = conv_gflops(device, args.repeats)
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
            best_single = min(v for v in row[2:4] if isinstance(v, float))
            work = step_gflop(model, shape, batch, device)
            rate = work / (best_single / 1000)
            bounds.append([name, row[1], work, rate, peak, rate / peak, peak / rate])
            print(" | ".join(str(v if not isinstance(v, float) else round(v, 1))
                             for v in row), flush=True)
    header = ["workload", "threads", "local_train NCHW", "local_train NHWC"]
    for clients in groups:
        header += [f"G={clients} NCHW", f"G={clients} NHWC"]
    print()
    print("ms per client per step (lower is better)")
    print(markdown_table(header, rows))
    print()
    print("how close one client at a time already is to the rate of a large convolution")
    print(markdown_table(["workload", "threads", "GFLOP per step", "GFLOP/s one at a time",
                          "GFLOP/s large conv", "fraction of large-conv rate",
                          "speed-up bound (all FLOPs at large-conv rate)"], bounds))


if __name__ == "__main__":
    main()
