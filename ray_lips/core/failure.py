"""How a run's failure is told: its cause out of Ray's wrappers, the one line a user reads, and
the status the run ends with (``diverged``, ``interrupted``, ``failed``).

Ray-aware without importing Ray: a Ray exception exists only once ``ray.exceptions`` is
imported, so the Ray cases are looked up in ``sys.modules`` (the command line and the analysis
read run folders without loading Ray).
"""

from __future__ import annotations

import re
import sys
from types import ModuleType

from ray_lips.config import ConfigError

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.+)$")


class DivergenceError(RuntimeError):
    """A client produced non-finite or exploding weights (e.g. a NaN loss)."""


class RunFailedError(RuntimeError):
    """One of several runs failed (the others were stopped): ``label`` names it, ``cause`` is
    what it raised, out of Ray's wrappers."""

    def __init__(self, label: str, cause: BaseException):
        super().__init__(f"{label}: {error_line(cause)}")
        self.label, self.cause = label, cause


def _ray_exceptions() -> ModuleType | None:
    return sys.modules.get("ray.exceptions")


def root_cause(err: BaseException) -> BaseException:
    """The exception that user code, the data or the engine raised, out of Ray's wrappers
    (``RayTaskError.cause``, however deep the actors that passed it on) and ``RunFailedError``."""
    ray_errors = _ray_exceptions()
    wrappers: tuple[type, ...] = (RunFailedError,) if ray_errors is None else (
        RunFailedError, ray_errors.RayTaskError)
    for _ in range(32):  # a chain of wrappers is short; never loop on a cyclic one
        cause = getattr(err, "cause", None)
        if not isinstance(err, wrappers) or not isinstance(cause, BaseException) or cause is err:
            return err
        err = cause
    return err


def error_line(err: BaseException) -> str:
    """``err`` as the one line a user reads: ``Type: first line of the message``, without
    Ray's tracebacks or colour codes. A ``ConfigError`` already names the key, and an actor
    that failed in its constructor is told by the exception that failed it."""
    err = root_cause(err)
    text = _ANSI.sub("", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    name = type(err).__name__
    ray_errors = _ray_exceptions()
    if ray_errors is not None and isinstance(err, ray_errors.RayActorError):
        if err.actor_init_failed:
            # Ray keeps only the text of the constructor's traceback: its last line is the error
            found = _EXCEPTION_LINE.match(lines[-1]) if lines else None
            if found:
                kind, message = found.group(1).rsplit(".", 1)[-1], found.group(2)
                return message if kind == ConfigError.__name__ else f"{kind}: {message}"
        elif len(lines) > 1:
            return f"{name}: {lines[0]} {lines[-1]}"  # the last line says why the actor died
    if isinstance(err, ConfigError) and lines:
        return lines[0]
    return f"{name}: {lines[0]}" if lines else name


def end_status(err: BaseException) -> str:
    """The status a run that ``err`` ended has: ``diverged`` (deterministic: a resume would
    diverge again), ``interrupted`` (Ctrl+C, SIGTERM) or ``failed``."""
    cause = root_cause(err)
    if isinstance(cause, DivergenceError):
        return "diverged"
    if isinstance(cause, KeyboardInterrupt):
        return "interrupted"
    return "failed"
