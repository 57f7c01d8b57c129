"""``ray-lips compare`` as a user runs it: more methods than the cluster holds at once, run
locks on the folders it writes, and a figure of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from same_runs import assert_same_tables
from test_cli import CLI, ENV, _config

from ray_lips.config import validate_config
from ray_lips.core.run import run_local

pytestmark = pytest.mark.slow

# A private local Ray of 2 CPUs, as on the README's 2-core machine, whatever this machine has.
TWO_CPUS = {**ENV, "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2})}


def _compare(config: Path, methods: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "compare", str(config), "--algorithms", methods],
                          capture_output=True, text=True, timeout=timeout, env=TWO_CPUS)


def _run_dirs(stdout: str) -> dict[str, Path]:
    """``METHOD: RUN_DIR`` lines at the end of compare's output."""
    found = {}
    for line in stdout.splitlines():
        method, sep, where = line.strip().partition(": ")
        if sep and where.startswith("/") and " " not in method:
            found[method] = Path(where)
    return found


def test_three_methods_on_two_cpus_run_two_at_a_time_with_the_numbers_of_separate_runs(
        tmp_path, tiny_config):
    tiny_config["resources"]["pools"] = 1  # 1 CPU a run: the cluster holds two at a time
    path = _config(tmp_path, tiny_config, rounds=3, checkpoint_every=2)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "inertia.png").write_bytes(b"an earlier compare's figure")

    result = _compare(path, "scaffold,scaffold+lips,ditto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compare: 3 run(s), 2 at a time on this cluster" in result.stderr
    dirs = _run_dirs(result.stdout)
    assert list(dirs) == ["scaffold", "scaffold+lips", "ditto"], result.stdout
    for method, run_dir in dirs.items():
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "finished", (method, status)

    # each run as if it had run alone, in this process with the pools' one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, run_dir in dirs.items():
            cfg = validate_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
            run_local(cfg, tmp_path / "alone" / method)
    finally:
        torch.set_num_threads(threads)
    for method, run_dir in dirs.items():
        assert_same_tables(run_dir, tmp_path / "alone" / method)

    # the figure is this compare's own, beside its runs; an earlier one is left alone
    assert (runs / "inertia.png").read_bytes() == b"an earlier compare's figure"
    figure = Path(result.stdout.strip().splitlines()[-1].removeprefix("inertia figure: "))
    assert figure.parent == runs and figure.is_file()
    first = dirs["scaffold"].name
    assert figure.name == first.replace("_scaffold_", "_compare_", 1) + "_inertia.png"


def test_a_resume_of_a_folder_that_compare_is_writing_is_refused(tmp_path, tiny_config):
    tiny_config["resources"]["pools"] = 1
    path = _config(tmp_path, tiny_config, rounds=500, checkpoint_every=2)
    runs = tmp_path / "runs"
    proc = subprocess.Popen([*CLI, "compare", str(path), "--algorithms", "fedavg,lips"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=TWO_CPUS)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(_training(runs)) < 2:
            time.sleep(0.2)
        assert len(_training(runs)) == 2, "compare never started its two runs"
        os.kill(proc.pid, signal.SIGSTOP)  # it keeps its locks, and its runs stay unfinished
        try:
            resumed = subprocess.run([*CLI, "run", "--resume", str(_training(runs)[0]),
                                      "--local"], capture_output=True, text=True, env=ENV,
                                     timeout=120)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert resumed.returncode == 2, resumed.stderr
        assert f"is in use by pid {proc.pid}" in resumed.stderr
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    dirs = sorted(runs.iterdir())
    assert last == ("error: stopped by SIGTERM; resume with: "
                    + " && ".join(f"ray-lips run --resume {d}" for d in
                                  sorted(dirs, key=lambda d: "lips" in d.name))), last
    for run_dir in dirs:
        assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"


def _training(runs: Path) -> list[Path]:
    """Run folders whose status says a round is done (read while being written)."""
    found = []
    for status in sorted(runs.glob("*/status.json")):
        try:
            if json.loads(status.read_text()).get("round", 0) >= 1:
                found.append(status.parent)
        except (OSError, ValueError):
            continue
    return found
