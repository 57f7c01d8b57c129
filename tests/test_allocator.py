"""The pools' malloc setting: a training step's large buffers stay in the heap.

glibc's own bookkeeping (``mallinfo2``) says where an allocation went, so this checks the
behaviour exactly, without timing or page-fault counts (benchmarks/bench_allocator.py measures
what the setting is worth in page faults and seconds).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from ray_lips.pools.allocator import keep_buffers_in_heap

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    tuned = keep_buffers_in_heap() if sys.argv[1] == "tuned" else False
    before = libc.mallinfo2()
    buffer = torch.empty(6 * 2**20)  # 24 MB, the size of a large activation buffer
    during = libc.mallinfo2()
    del buffer
    after = libc.mallinfo2()
    print(json.dumps({"tuned": tuned, "mmapped": during.hblks - before.hblks,
                      "kept_free_mb": after.fordblks / 2**20}))
""")


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_buffers_stay_in_the_heap_with_the_pools_setting():
    default, tuned = _probe("default"), _probe("tuned")
    # glibc's default serves a 24 MB buffer with its own mmap and unmaps it when freed, so the
    # next step faults its pages in again ...
    assert default["mmapped"] == 1, default
    # ... with the pools' thresholds it comes from the heap, and stays there once freed.
    assert tuned["tuned"] is True
    assert tuned["mmapped"] == 0, tuned
    assert tuned["kept_free_mb"] >= 24, tuned
