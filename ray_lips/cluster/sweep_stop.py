"""Ending a sweep on SIGTERM (``ray job stop``, ``kill``, a batch scheduler).

Ray Tune ends a sweep gracefully on SIGINT (Ctrl+C): it saves its state, stops the trials and
returns, and ``ray-lips sweep`` then marks the trials that had not finished ``interrupted``.
SIGTERM escaped that: ``ray.init`` installs a SIGTERM handler that raises SystemExit, which
goes straight through Tune and past that marking; Ray then kills the trials with the driver,
and every running trial's ``status.json`` stayed at ``running`` (or said ``failed``, when a
trial saw its pools die first). Tune's graceful path does not fit: ``ray job stop``
sends SIGKILL 3 s after SIGTERM (``RAY_JOB_STOP_WAIT_TIME_S`` on the head), often before Tune's
last state save and its wait of up to 5 s for trials to stop are through, so it is not
used here either. Instead:

1. the handler marks every trial whose ``status.json`` says ``running`` as ``interrupted`` (file
   writes only, done before anything can be cut short), notes that SIGTERM came, and raises
   ``SweepTerminated`` out of Tune's loop. Where the signal arrives inside ``ray.wait`` or
   ``ray.get``, Ray turns any KeyboardInterrupt into a plain one, so the caller asks
   ``sigterm_received()`` rather than looking at the exception's type;
2. the caller kills the trials' actors (their pools go with them), so that no trial writes
   ``running`` (or ``failed``, on seeing its pools go) at the end of a round, and marks once
   more.

Tune's experiment state is the one it last saved; ``ray-lips sweep SPEC --resume`` continues
the trials from their checkpoints, as after a lost driver.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ray_lips.core.run_folder import STATUS_FILE, RunWriter

INTERRUPTED_BY_SIGTERM = ("the sweep was stopped by SIGTERM before this trial finished; "
                          "ray-lips sweep SPEC --resume continues it")
_ACTOR_STOP_WAIT_S = 2.0  # for the killed actors' deaths to be known; within ray job stop's 3 s


class SweepTerminated(KeyboardInterrupt):
    """SIGTERM arrived while the sweep ran."""


class TrialActorsCallback(tune.Callback):
    """Keeps the sweep's trials at hand (the Tune controller's own list), so that SIGTERM can
    kill their actors. Stateless itself: it is saved with the experiment and restored with
    ``--resume``."""

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        _LIVE["trials"] = trials


_LIVE: dict[str, list[Any]] = {"trials": []}
_SIGTERM = {"received": False}


def sigterm_received() -> bool:
    """Whether SIGTERM arrived inside ``terminate_on_sigterm``."""
    return _SIGTERM["received"]


def mark_if_running(trial_dir: Path, error: str) -> bool:
    """Mark ``trial_dir``'s run ``interrupted`` (with ``error``) if its ``status.json`` says
    ``running``; returns whether it did. A folder or status that is a link, damaged or
    vanishing is left as it is."""
    status_file = trial_dir / STATUS_FILE
    if trial_dir.is_symlink() or not trial_dir.is_dir() or status_file.is_symlink():
        return False
    try:
        if not status_file.is_file():
            return False
        writer = RunWriter(trial_dir)
        if writer.read_status().get("status") != "running":
            return False
        writer.write_status("interrupted", error=error)
        return True
    except (OSError, ValueError):
        return False


def mark_running_interrupted(experiment_dir: Path) -> int:
    """Mark every trial of ``experiment_dir`` whose ``status.json`` says ``running`` as
    ``interrupted``; returns how many."""
    if not experiment_dir.is_dir():
        return 0
    return sum(mark_if_running(trial_dir, INTERRUPTED_BY_SIGTERM)
               for trial_dir in sorted(experiment_dir.iterdir()))


def stop_trial_actors() -> None:
    """Kill the actors of the trials Tune is running and wait (briefly) until Ray knows they
    are dead: a call to a killed actor then fails."""
    actors = [trial.temporary_state.ray_actor for trial in _LIVE["trials"]
              if trial.temporary_state.ray_actor is not None]
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    with contextlib.suppress(Exception):
        pings = [actor.__ray_ready__.remote() for actor in actors]
        ray.wait(pings, num_returns=len(pings), timeout=_ACTOR_STOP_WAIT_S)


@contextlib.contextmanager
def terminate_on_sigterm(experiment_dir: Path):
    """While the block runs, SIGTERM marks the running trials interrupted and raises
    ``SweepTerminated`` (or a plain KeyboardInterrupt: see ``sigterm_received``); a second
    SIGTERM ends the process at once. Replaces, for the block, the handler ``ray.init``
    installs, which raises SystemExit straight through Tune."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _SIGTERM["received"] = True
        mark_running_interrupted(experiment_dir)
        raise SweepTerminated("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            if signal.getsignal(signal.SIGTERM) is handler:
                signal.signal(signal.SIGTERM, previous)
