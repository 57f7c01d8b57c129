"""Where a relative output folder goes.

A command started by ``ray job submit`` runs in a folder Ray chose: with ``--working-dir .`` an
unpacked copy of the working directory inside Ray's temporary files, which disappear with the
cluster's session; without it, the folder the head node was started from. Relative ``output``
and ``storage_path`` there resolve against the home folder of the user the job runs as (on the
node that runs the job, the head node), and the commands print where their results are.

Ray 2.60's job supervisor starts the entrypoint with ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (the job's
runtime environment and ``metadata.job_submission_id``) in its environment; nothing else sets
it, and the entrypoint's children inherit it. The working folder is no sign: a job may run
without ``--working-dir``, and Ray's workers run in the unpacked copy too.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's entrypoint


def in_ray_job() -> bool:
    """Whether this process is (started by) the entrypoint of a ``ray job submit`` job."""
    return bool(os.environ.get(_JOB_ENV))


def ray_job_id() -> str | None:
    """The submission id of the job this process runs in (``raysubmit_...``), if any."""
    try:
        metadata = json.loads(os.environ.get(_JOB_ENV) or "{}").get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    job_id = metadata.get("job_submission_id") if isinstance(metadata, dict) else None
    return job_id if isinstance(job_id, str) else None


def durable_path(path: str | Path) -> Path:
    """``path`` made absolute: against the current folder, or the home folder inside a job."""
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return expanded
    base = Path.home() if in_ray_job() else Path.cwd()
    return base / expanded


def where(path: str | Path) -> str:
    """``path`` for a message; inside a job, with the node it is on (the results stay there)."""
    if not in_ray_job():
        return str(path)
    return f"{path} (on {socket.gethostname()}, the node that runs job {ray_job_id() or '?'})"
