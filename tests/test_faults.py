"""Faults injected into a real ``ray-lips run`` on a private local Ray: a pool that hangs
(SIGSTOP) or dies (SIGKILL), SIGTERM of the command, and a module planted in the working
directory. Every signal goes to a process this test started (the CLI or one of its own Ray
workers, found by walking /proc from the CLI's PID)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from same_runs import assert_same_tables
from test_cli import CLI, ENV, _config


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pools_of(pid: int) -> list[int]:
    pools = []
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::ClientPoolActor"):
            pools.append(child)
    return sorted(pools)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _rounds_written(runs: Path) -> int:
    for table in runs.glob("*/rounds.parquet"):
        try:
            return len(pd.read_parquet(table))
        except Exception:  # noqa: BLE001 - being written right now
            return 0
    return 0


def _run_until_three_rounds(config: Path, runs: Path) -> subprocess.Popen:
    """``ray-lips run CONFIG`` started in the background, returned once three rounds are
    written (killed if they never are)."""
    proc = subprocess.Popen([*CLI, "run", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for(lambda: _rounds_written(runs) >= 3, 180, "three rounds")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_hung_pool_then_a_killed_pool_are_restarted_and_the_numbers_do_not_change(
        tmp_path, tiny_config):
    tiny_config["resources"].update(hang_min_s=4, hang_factor=3, pool_restarts=2)
    path = _config(tmp_path, tiny_config, rounds=12, checkpoint_every=2)
    straight = subprocess.run([*CLI, "run", str(path), "--local", "--set",
                               f"output={tmp_path / 'straight'}"],
                              capture_output=True, text=True, env=ENV, timeout=300)
    assert straight.returncode == 0, straight.stderr
    straight_dir = Path(straight.stdout.strip().splitlines()[-1])

    runs = tmp_path / "runs"
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([*CLI, "run", str(path)], stdout=subprocess.PIPE, stderr=log,
                            text=True, env=ENV)
    stopped: list[int] = []
    try:
        _wait_for(lambda: _rounds_written(runs) >= 3, 180, "three rounds")
        first_pools = _pools_of(proc.pid)
        assert len(first_pools) == 2, first_pools
        os.kill(first_pools[0], signal.SIGSTOP)
        stopped.append(first_pools[0])
        hung_at = time.time()
        _wait_for(lambda: len([p for p in _pools_of(proc.pid) if p not in first_pools]) == 2,
                  120, "two new pools after the hang")
        detected_s = time.time() - hung_at
        # the hung pool does not keep its CPU: the restart kills it with its driver
        _wait_for(lambda: _gone(first_pools[0]), 60, "the hung pool's process to end")
        new_pools = [p for p in _pools_of(proc.pid) if p not in first_pools]
        _wait_for(lambda: _rounds_written(runs) >= 6, 180, "rounds after the restart")
        os.kill(new_pools[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        for pid in stopped:  # ours; normally gone with its driver already
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
        log.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr
    # each message names the pool by its process: the one this test stopped, then killed
    assert re.search(rf"PoolHungError: client pool \d \(pid {first_pools[0]} on .*"
                     "resources.hang_factor", stderr)
    assert re.search(rf"PoolLostError: client pool \d \(pid {new_pools[1]} on .*died during",
                     stderr)
    assert "restart 2 of resources.pool_restarts 2" in stderr
    assert detected_s < 60  # hang_min_s 4, a tiny round; generous for a loaded machine
    run_dir = Path(out.strip().splitlines()[-1])
    assert_same_tables(straight_dir, run_dir)


@pytest.mark.slow
def test_sigterm_stops_the_run_as_an_interruption_that_resumes(tmp_path, tiny_config):
    path = _config(tmp_path, tiny_config, rounds=40, checkpoint_every=2)
    runs = tmp_path / "runs"
    proc = _run_until_three_rounds(path, runs)
    try:
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM; resume with: ray-lips run --resume" in stderr
    assert "Traceback" not in stderr
    assert took < 30
    run_dir = next(runs.glob("*/status.json")).parent
    time.sleep(2)  # nothing may overwrite the status after the command ended
    status = yaml.safe_load((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted"

    resumed = subprocess.run([*CLI, "run", "--resume", str(run_dir), "--local"],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(pd.read_parquet(run_dir / "rounds.parquet")) == 40


def test_workers_do_not_import_modules_from_the_working_directory(tmp_path, tiny_config):
    path = _config(tmp_path, tiny_config, rounds=1)
    planted = tmp_path / "cwd" / "sklearn"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-module-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    result = subprocess.run([*CLI, "run", str(path)], capture_output=True, text=True,
                            env=ENV, timeout=300, cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_a_pool_lost_past_its_restarts_ends_with_the_command_that_resumes_this_run(
        tmp_path, tiny_config):
    tiny_config["resources"].update(pool_restarts=0)
    path = _config(tmp_path, tiny_config, rounds=200, checkpoint_every=2)
    runs = tmp_path / "runs"
    proc = _run_until_three_rounds(path, runs)
    try:
        pools = _pools_of(proc.pid)
        assert len(pools) == 2, pools
        os.kill(pools[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stderr
    (run_dir,) = runs.iterdir()
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: PoolLostError: client pool \d \(pid {pools[1]} on .*\) died "
                        rf"during .*; resume with: ray-lips run --resume {re.escape(str(run_dir))}",
                        last), last
    assert "Traceback" not in stderr
    status = yaml.safe_load((run_dir / "status.json").read_text())
    assert status["status"] == "failed"
    assert status["error"] == last.removeprefix("error: ").split("; resume with")[0]
