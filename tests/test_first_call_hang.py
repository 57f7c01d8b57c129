"""A pool that hangs in its first call of a kind (the first round, fine-tuning, the first round
after a restart) counts as hung within a bound derived from what was timed, or from
``resources.hang_min_s``, not after ``resources.timeout_s``; the run then restarts.

The hangs are real: a pool process stopped with SIGSTOP (by this test, by PID, or by a model
of this test's own that stops its pool in its first training step)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
from same_runs import assert_same_tables
from test_cli import CLI, ENV, _config

from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun
from ray_lips.pools.ray_actors import CallDeadlines, CallTimes, PoolHungError, RayPoolFactory

HANG = {"hang_min_s": 5, "hang_factor": 2, "timeout_s": 90}


def test_first_calls_are_bounded_by_what_was_timed_or_by_hang_min_s():
    deadlines = CallDeadlines(factor=2, min_s=5, timeout_s=90)
    assert deadlines.limit("training")[0] == 10  # nothing timed: hang_factor x hang_min_s
    assert deadlines.limit("fine-tuning", 30)[0] == 10
    deadlines.record("training", 8.0, client_epochs=4)  # 2 s per client-epoch
    assert deadlines.limit("training")[0] == 16
    # fine-tuning 5 clients x (3 epochs + 2 for its scoring) at 2 s: 50 s, x 2
    assert deadlines.limit("fine-tuning", 5 * (3 + 2))[0] == 90  # at most timeout_s
    assert deadlines.limit("fine-tuning", 1 * (0 + 2))[0] == 8
    assert deadlines.limit("hand-out with evaluation")[0] == 16  # the slowest training call
    deadlines.record("fine-tuning", 1.0)
    assert deadlines.limit("fine-tuning", 1000)[0] == 5  # timed: as before, at least min_s
    # the times a restart carries over bound the new pools' first calls the same way
    carried = CallDeadlines(factor=2, min_s=5, timeout_s=90, times=deadlines.times)
    for kind in ("training", "fine-tuning", "hand-out"):
        assert carried.limit(kind, 10) == deadlines.limit(kind, 10)


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def _kill(pids: list[int]) -> None:
    """The pool processes this test stopped (normally gone with their group already)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_the_first_round_after_a_restart_is_bounded_by_the_rounds_timed_before(
        ray_local, tmp_path, tiny_config):
    tiny_config["resources"].update(HANG)
    cfg = validate_config(tiny_config)
    stopped: list[int] = []
    first = FederatedRun(cfg, tmp_path / "first", RayPoolFactory(cfg.resources))
    try:
        devices = first.pools.devices()
        assert [d.pool for d in devices] == [0, 1]
        assert {d.device for d in devices} == {"cpu"} and {d.threads for d in devices} == {1}
        first.run_round()
        stopped.append(devices[1].pid)
        _stop(devices[1].pid)
        with pytest.raises(PoolHungError) as hung:
            first.run_round()
    finally:
        first.close()
        _kill(stopped)
    times = hung.value.times
    assert hung.value.kind == "training" and hung.value.pool == 1
    assert f"pid {devices[1].pid} on" in str(hung.value)
    assert times is not None and "training" in times.slowest

    # the pools that take over start from these times: their first round is bounded by them
    second = FederatedRun(cfg, tmp_path / "second", RayPoolFactory(cfg.resources, times=times))
    try:
        pid = second.pools.devices()[0].pid
        stopped.append(pid)
        _stop(pid)
        with pytest.raises(PoolHungError) as again:
            second.run_round()
    finally:
        second.close()
        _kill(stopped)
    assert again.value.kind == "training" and again.value.pool == 0
    assert again.value.limit_s == max(5, 2 * times.slowest["training"])
    assert "its slowest earlier training" in str(again.value)


def test_new_pools_without_times_bound_their_first_round_by_hang_min_s(
        ray_local, tmp_path, tiny_config):
    tiny_config["resources"].update(HANG)
    cfg = validate_config(tiny_config)
    run = FederatedRun(cfg, tmp_path / "run", RayPoolFactory(cfg.resources, times=CallTimes()))
    pid = run.pools.devices()[0].pid
    try:
        _stop(pid)
        with pytest.raises(PoolHungError) as hung:
            run.run_round()
    finally:
        run.close()
        _kill([pid])
    assert hung.value.kind == "training"
    assert hung.value.limit_s == 2 * 5 < cfg.resources.timeout_s
    assert "first training, nothing timed yet" in str(hung.value)


HANGING_MODEL = '''
"""A tiny model whose first training step in a Ray pool stops that pool's process, once."""
import os
import signal

import torch
from torch import nn

MARKER = {marker!r}


class HangOnce(nn.Module):
    def __init__(self, features: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(features, classes)

    def forward(self, x):
        if self.training and torch.is_grad_enabled() and _in_pool():
            try:
                os.unlink(MARKER)  # one process wins, once
            except FileNotFoundError:
                pass
            else:
                with open(MARKER + ".pid", "w") as out:
                    out.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGSTOP)
        return self.linear(x.flatten(1))


def _in_pool() -> bool:
    with open("/proc/self/cmdline", "rb") as cmdline:
        return cmdline.read().startswith(b"ray::ClientPoolActor")


def build(sample_shape, num_classes):
    features = 1
    for size in sample_shape:
        features *= size
    return HangOnce(features, num_classes)
'''


def _kill_stopped_pool(pid_file: Path) -> None:
    """The pool process the model stopped, if it is still there (normally killed with its
    run's driver at the restart)."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ClientPoolActor"):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_pool_hung_in_its_first_round_is_restarted_and_the_numbers_do_not_change(
        tmp_path, tiny_config):
    marker = tmp_path / "hang-once"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "hang_once.py").write_text(textwrap.dedent(HANGING_MODEL.format(
        marker=str(marker))))
    tiny_config.update(model="hang_once:build", algorithm="fedavg", handout="dense")
    tiny_config["resources"].update(HANG, pool_restarts=1)
    path = _config(tmp_path, tiny_config, rounds=3)
    env = {**ENV, "PYTHONPATH": str(modules)}

    straight = subprocess.run([*CLI, "run", str(path), "--local", "--set",
                               f"output={tmp_path / 'straight'}"],
                              capture_output=True, text=True, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr

    marker.touch()
    pid_file = Path(f"{marker}.pid")
    try:
        result = subprocess.run([*CLI, "run", str(path)], capture_output=True, text=True,
                                env=env, timeout=400)
    finally:
        _kill_stopped_pool(pid_file)
    assert result.returncode == 0, result.stderr
    hung_pid = int(pid_file.read_text())
    assert re.search(rf"PoolHungError: client pool \d \(pid {hung_pid} on .*\) did not finish "
                     r"training within 10\.0 s \(first training, nothing timed yet",
                     result.stderr), result.stderr
    assert "restart 1 of resources.pool_restarts 1" in result.stderr
    assert_same_tables(Path(straight.stdout.strip().splitlines()[-1]),
                 Path(result.stdout.strip().splitlines()[-1]))
