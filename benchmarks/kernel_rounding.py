"""How far batched training drifts from one-at-a-time training through kernel rounding alone.

The two training paths compute the same thing with different kernels (grouped vs dense
convolutions), so float32 results differ in the last bits, by an amount that depends on the
CPU's vector unit (AVX2, AVX-512, ...). This script measures the largest relative difference of
any state tensor after one float32 SGD step, after four float32 steps and after four float64
steps, over many seeds, for each kernel set this CPU can be switched to
(``ATEN_CPU_CAPABILITY`` x ``ONEDNN_MAX_CPU_ISA``); the tolerances in tests/test_batched.py are
set from its output.

    .venv/bin/python benchmarks/kernel_rounding.py            # every kernel set, 20 seeds
    .venv/bin/python benchmarks/kernel_rounding.py --seeds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import torch

KERNEL_SETS = [
    {},
    {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"},
]
CASES = {"smallcnn": (3, 16, 16), "resnet8": (3, 16, 16), "resnet8_1d": (1, 40)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def _channels_last_batches(*args, **kwargs) -> torch.Tensor:
    from ray_lips.data.augment import prepare_batch

    batch = prepare_batch(*args, **kwargs)
    return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch


def measure(seeds: int) -> dict[str, float]:
    from ray_lips.data.augment import prepare_batch
    from ray_lips.models import build_model
    from ray_lips.training import local as training
    from ray_lips.training.batched import ClientGroup
    from ray_lips.training.local import LocalSettings, Normalisation, local_train

    torch.set_num_threads(1)
    one = LocalSettings(epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4)
    four = LocalSettings(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4)
    worst: dict[str, float] = {}
    for seed in range(seeds):
        for name, shape in CASES.items():
            for channels_last in (False, True):
                for label, settings, dtype in (("fp32_1_step", one, torch.float32),
                                               ("fp32_4_steps", four, torch.float32),
                                               ("fp64_4_steps", four, torch.float64)):
                    torch.manual_seed(seed)
                    model = build_model(name, shape, 10).to(dtype)
                    base = model.state_dict()
                    starts = [{k: (v + 0.02 * c * torch.randn_like(v) if v.is_floating_point()
                                   else v) for k, v in base.items()} for c in range(3)]
                    x = torch.randn(3, 30, *shape, dtype=dtype)
                    y = torch.randint(0, 10, (3, 30))
                    norm = Normalisation((0.1,) * shape[0], (0.9,) * shape[0], len(shape) == 3)
                    serial_model = model
                    if channels_last and len(shape) == 3:  # the serial reference in NHWC too
                        serial_model = model.to(memory_format=torch.channels_last)
                        training.prepare_batch = _channels_last_batches
                    else:
                        training.prepare_batch = prepare_batch
                    group = ClientGroup(model, 3, channels_last=channels_last)
                    group.load(starts)
                    gens = [(torch.Generator().manual_seed(100 + c),
                             torch.Generator().manual_seed(200 + c)) for c in range(3)]
                    group.train(x, y, settings, norm, [g[0] for g in gens],
                                [g[1] for g in gens])
                    states = group.states()
                    for c in range(3):
                        serial_model.load_state_dict(starts[c])
                        local_train(serial_model, x[c], y[c], settings, norm,
                                    torch.Generator().manual_seed(100 + c),
                                    torch.Generator().manual_seed(200 + c))
                        for key, value in copy.deepcopy(serial_model.state_dict()).items():
                            if value.is_floating_point():
                                worst[label] = max(worst.get(label, 0.0),
                                                   _rel(value, states[c][key]))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(measure(args.seeds)))
        return
    print(f"{'kernels':<44s} {'capability':>10s} {'fp32 1 step':>12s} {'fp32 4 steps':>13s} "
          f"{'fp64 4 steps':>13s}")
    overall: dict[str, float] = {}
    for extra in KERNEL_SETS:
        env = {**os.environ, **extra, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, "--worker", "--seeds", str(args.seeds)],
                              capture_output=True, text=True, env=env)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not line:
            print(f"{json.dumps(extra):<44s} failed: {done.stderr[-300:]}")
            continue
        worst = json.loads(line[0][len("RESULT "):])
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu."
                                "get_cpu_capability())"], capture_output=True, text=True, env=env)
        print(f"{json.dumps(extra) or 'defaults':<44s} {probe.stdout.strip():>10s} "
              f"{worst['fp32_1_step']:12.2e} {worst['fp32_4_steps']:13.2e} "
              f"{worst['fp64_4_steps']:13.2e}")
        for key, value in worst.items():
            overall[key] = max(overall.get(key, 0.0), value)
    print("max over kernel sets: " + ", ".join(f"{k} {v:.2e}" for k, v in overall.items()))


if __name__ == "__main__":
    main()
