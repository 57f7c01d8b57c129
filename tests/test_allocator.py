"""The pools' malloc setting: training steps stop faulting fresh pages in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

STEPS = textwrap.dedent("""
    import resource, sys
    import torch
    from torch import nn
    from ray_lips.allocator import keep_buffers_in_heap
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
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(15):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_steps_reuse_heap_buffers_instead_of_faulting_pages():
    default, tuned = _page_faults("default"), _page_faults("tuned")
    # glibc's defaults hand large buffers back to the OS and fault them in again every step;
    # with the pools' thresholds the steps after warm-up reuse the heap.
    assert tuned * 3 < default, (tuned, default)
