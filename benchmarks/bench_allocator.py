"""What the pools' malloc thresholds (ray_lips.pools.allocator) are worth: page faults and
seconds of
15 smallcnn training steps (50 samples of 3x32x32, one thread), glibc's defaults against the
pools' setting, each in a fresh interpreter, repeated.

    .venv/bin/python benchmarks/bench_allocator.py --repeats 5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

STEPS = textwrap.dedent("""
    import resource, sys, time
    import torch
    from torch import nn
    from ray_lips.pools.allocator import keep_buffers_in_heap
    from ray_lips.models import build_model

    torch.set_num_threads(1)
    if sys.argv[1] == "tuned":
        assert keep_buffers_in_heap()
    torch.manual_seed(0)
    model = build_model("smallcnn", (3, 32, 32), 10)
    x, y = torch.randn(50, 3, 32, 32), torch.randint(0, 10, (50,))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimiser.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()

    for _ in range(3):
        step()
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(15):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
          time.perf_counter() - started)
""")


def run(mode: str) -> tuple[int, float]:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                          check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    faults, seconds = done.stdout.split()[-2:]
    return int(faults), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'mode':<8s} {'page faults':>12s} {'seconds':>9s}")
    for _ in range(args.repeats):
        for mode in ("default", "tuned"):
            faults, seconds = run(mode)
            print(f"{mode:<8s} {faults:12d} {seconds:9.2f}")


if __name__ == "__main__":
    main()
