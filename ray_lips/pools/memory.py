"""Resident memory of this process, for the pools' stats, benchmarks and tests."""

from __future__ import annotations

import resource
from pathlib import Path


def current_rss_mb() -> float:
    """Resident memory now (Linux ``/proc``; NaN where that is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return float("nan")
    return float("nan")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports ``ru_maxrss`` in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
