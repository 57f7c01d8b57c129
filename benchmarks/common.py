"""Shared pieces of the benchmark scripts: load readings, subprocess workers, tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def load() -> float:
    """1-minute load average: other work on the machine shows up here."""
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float, max_wait_s: float = 900.0) -> float:
    """Wait (up to ``max_wait_s``) until the 1-minute load average drops below ``threshold``;
    return it. On a shared machine other jobs' threads otherwise stall multi-threaded steps."""
    import time

    deadline = time.monotonic() + max_wait_s
    while load() >= threshold and time.monotonic() < deadline:
        time.sleep(15)
    return load()


def run_worker(script: str, job: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``script --worker JOB`` in a fresh interpreter and return its JSON result.

    A fresh process per measurement gives each one a clean peak-RSS counter, its own thread
    settings and its own private Ray instance.
    """
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RuntimeError(f"benchmark worker failed ({done.returncode}): {job}")
    return json.loads(lines[-1][len("RESULT "):])


def emit(result: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def start_ray(cpus: int, gpus: int) -> None:
    import ray

    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
             log_to_driver=False)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
