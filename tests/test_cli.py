"""The ``ray-lips`` command as a user runs it, in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

CLI = [sys.executable, "-m", "ray_lips.cli"]


def _config(tmp_path: Path, tree: dict, **train) -> Path:
    tree["output"] = str(tmp_path / "runs")
    tree["train"].update(train)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# One torch thread per CLI process: on a busy 2-core machine, OpenMP threads competing for
# cores can slow a tiny run by orders of magnitude.
ENV = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = ENV
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_bad_value_stops_before_ray_with_the_key_named(tmp_path, tiny_config):
    result = _cli("run", str(_config(tmp_path, tiny_config)), "--set", "data.alpha=0")
    assert result.returncode == 2
    assert "data.alpha" in result.stderr
    assert "Ray" not in result.stderr  # nothing was started
    assert not (tmp_path / "runs").exists()


def test_gpu_request_on_a_cpu_cluster_stops_before_a_run_folder_is_made(tmp_path, tiny_config):
    result = _cli("run", str(_config(tmp_path, tiny_config)), "--set",
                  "resources.gpus_per_pool=0.5")
    assert result.returncode == 2
    assert "gpus_per_pool" in result.stderr and "no GPU" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers(tmp_path, tiny_config):
    path = _config(tmp_path, tiny_config, rounds=30, checkpoint_every=4, local_epochs=3)
    straight = _cli("run", str(path), "--local", "--set", "output=" + str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    straight_dir = Path(straight.stdout.strip().splitlines()[-1])

    proc = subprocess.Popen([*CLI, "run", str(path), "--local"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    run_dir = None
    while time.time() < deadline:
        found = list((tmp_path / "runs").glob("*/checkpoints/round_*.pt"))
        if len(found) >= 2:
            run_dir = found[0].parent.parent
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert run_dir is not None, "the run never checkpointed"
    assert len(pd.read_parquet(run_dir / "rounds.parquet")) < 30

    resumed = _cli("run", "--resume", str(run_dir), "--local")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("rounds.parquet", "layers.parquet", "clients.parquet"):
        a = pd.read_parquet(straight_dir / name).drop(columns="seconds", errors="ignore")
        b = pd.read_parquet(run_dir / name).drop(columns="seconds", errors="ignore")
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_run_on_local_ray_prints_the_run_directory(tmp_path, tiny_config):
    result = _cli("run", str(_config(tmp_path, tiny_config, rounds=3)))
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs"
    assert len(pd.read_parquet(run_dir / "rounds.parquet")) == 3
    assert "round 3/3" in result.stderr
    assert "acc_global" in result.stdout


# ----- refusals that need no Ray ---------------------------------------------------------------
def test_an_empty_config_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    result = _cli("run", str(empty))
    assert result.returncode == 2 and "the config file is empty" in result.stderr
    assert not (tmp_path / "runs").exists() and not Path("runs", "experiment").exists()


def test_resume_of_a_folder_that_is_not_a_run_changes_nothing(tmp_path):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    result = _cli("run", "--resume", str(folder))
    assert result.returncode == 2 and "holds no config.yaml" in result.stderr
    assert list(folder.iterdir()) == []


def test_resume_of_a_finished_run_says_so_without_training(tmp_path, tiny_config):
    from ray_lips.config import validate_config
    from ray_lips.core.run import run_local

    tiny_config["train"].update(rounds=1, finetune_epochs=0)
    run_local(validate_config(tiny_config), tmp_path / "done")
    before = (tmp_path / "done" / "clients.parquet").stat().st_mtime_ns
    result = _cli("run", "--resume", str(tmp_path / "done"))
    assert result.returncode == 0, result.stderr
    assert "is finished (1 of 1 rounds); nothing to resume" in result.stderr
    assert "acc_global" in result.stdout  # its summary
    assert (tmp_path / "done" / "clients.parquet").stat().st_mtime_ns == before


def test_a_second_resume_of_a_run_in_use_is_refused_naming_the_holder(tmp_path, tiny_config):
    from ray_lips.config import validate_config
    from ray_lips.core.run import FederatedRun
    from ray_lips.core.run_folder import run_lock

    tiny_config["train"].update(rounds=3)
    run = FederatedRun(validate_config(tiny_config), tmp_path / "busy")
    run.run_round()
    run.close()
    with run_lock(tmp_path / "busy"):  # this test process holds the run, as a running CLI would
        result = _cli("run", "--resume", str(tmp_path / "busy"), "--local")
    assert result.returncode == 2
    assert f"is in use by pid {os.getpid()}" in result.stderr
    result = _cli("run", "--resume", str(tmp_path / "busy"), "--local")  # free again
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_diverging_local_run_ends_with_one_message_that_says_what_to_change(tmp_path,
                                                                             tiny_config):
    tiny_config["train"].update(rounds=2, lr=1.0e6)
    result = _cli("run", str(_config(tmp_path, tiny_config)), "--local")
    assert result.returncode == 1
    assert "DivergenceError" in result.stderr and "lower train.lr" in result.stderr
    assert "--resume" not in result.stderr and "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert yaml.safe_load((run_dir / "status.json").read_text())["status"] == "diverged"


def test_an_output_below_a_regular_file_stops_before_ray(tmp_path, tiny_config):
    path = _config(tmp_path, tiny_config)
    (tmp_path / "afile").write_text("not a folder")
    result = _cli("run", str(path), "--set", f"output={tmp_path / 'afile' / 'runs'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: output:")
    assert "is a file" in result.stderr and "Traceback" not in result.stderr


def test_cifar_without_its_files_or_a_network_stops_before_ray_naming_the_root(tmp_path,
                                                                               tiny_config):
    tiny_config["data"]["dataset"] = "cifar10"
    tiny_config["data"]["root"] = str(tmp_path / "empty")
    path = _config(tmp_path, tiny_config)
    env = {**ENV, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([*CLI, "run", str(path)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.root:") and "cifar-10-python.tar.gz" in last
    assert "Traceback" not in result.stderr and "Started a local Ray" not in result.stderr


def test_more_samples_than_the_dataset_has_is_a_warning_before_ray(tmp_path, tiny_config):
    path = _config(tmp_path, tiny_config, rounds=1)
    result = _cli("run", str(path), "--local", "--set", "data.train_per_client=400")
    assert result.returncode == 0, result.stderr
    assert "warning: data: 6 clients x data.train_per_client 400 = 2400" in result.stderr


def test_a_model_importable_only_from_the_working_directory_stops_before_ray(tmp_path,
                                                                             tiny_config):
    (tmp_path / "cwdnets_q7").mkdir()
    (tmp_path / "cwdnets_q7" / "__init__.py").write_text(
        "from ray_lips.models import build_model\n\n"
        "def build(shape, classes):\n    return build_model('smallcnn', shape, classes)\n")
    tiny_config["model"] = "cwdnets_q7:build"
    path = _config(tmp_path, tiny_config, rounds=1)
    env = {**ENV, "PYTHONPATH": ""}
    ray_run = subprocess.run([*CLI, "run", str(path)], capture_output=True, text=True,
                             timeout=300, env=env, cwd=tmp_path)
    assert ray_run.returncode == 2, ray_run.stderr
    assert "error: model: 'cwdnets_q7:build' imports only from the current folder" in \
        ray_run.stderr
    assert "Started a local Ray" not in ray_run.stderr
    local = subprocess.run([*CLI, "run", str(path), "--local"], capture_output=True, text=True,
                           timeout=300, env=env, cwd=tmp_path)
    assert local.returncode == 0, local.stderr


def test_the_command_checks_a_run_without_loading_torch(tmp_path, tiny_config):
    """Validation and the pre-Ray checks never import torch, so a bad config fails at once,
    and Ray starts while torch loads in the background (``runtime.connect``)."""
    path = _config(tmp_path, tiny_config)
    probe = ("import sys\n"
             "from ray_lips.cli.commands import _load, _preflight\n"
             f"_preflight(_load({str(path)!r}, ()))\n"
             "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ----- what a run leaves and says when it fails ---------------------------------------------
def _ray_lines_removed(stderr: str) -> list[str]:
    """The lines ray-lips printed: without Ray's own log lines (``2025-01-01 12:00:00,000
    INFO ...`` at start-up)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line[:4].isdigit() and not line.startswith("[20")]


def test_a_dataset_function_that_raises_on_ray_ends_in_one_line_and_leaves_no_run_folder(
        tmp_path, tiny_config):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "broken_q7.py").write_text(
        "def load():\n    raise OSError('the data disk is gone')\n")
    tiny_config["data"]["dataset"] = "broken_q7:load"
    path = _config(tmp_path, tiny_config, rounds=2)
    env = {**ENV, "PYTHONPATH": os.pathsep.join(
        p for p in (str(tmp_path / "mods"), ENV.get("PYTHONPATH")) if p)}
    result = subprocess.run([*CLI, "run", str(path)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 1, result.stderr
    ours = _ray_lines_removed(result.stderr)
    assert ours[-1] == ("error: data.dataset: broken_q7:load() raised OSError: the data disk "
                        "is gone")
    assert len([line for line in ours if "the data disk is gone" in line]) == 1, ours
    for noise in ("Traceback", "ActorDiedError", "RayTaskError", "\x1b[", "--resume", "RUN_DIR"):
        assert noise not in result.stderr
    assert list((tmp_path / "runs").iterdir()) == []  # the run never trained: no folder


class _Foreign:
    """A class no checkpoint may hold."""


def test_a_refused_checkpoint_on_ray_is_one_line_with_no_resume_hint_and_the_folder_stays(
        tmp_path, tiny_config):
    import pickle

    import torch

    from ray_lips.config import validate_config
    from ray_lips.core.run import FederatedRun

    tiny_config["train"].update(rounds=4, checkpoint_every=1)
    run = FederatedRun(validate_config(tiny_config), tmp_path / "run")
    run.run_round()
    run.close()
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("round_*.pt")
    torch.save({"next_round": 1, "state": _Foreign()}, checkpoint, pickle_module=pickle)
    before = [p.name for p in (tmp_path / "run").iterdir()]

    result = _cli("run", "--resume", str(tmp_path / "run"))
    assert result.returncode == 1, result.stderr
    last = _ray_lines_removed(result.stderr)[-1]
    assert last.startswith(f"error: CheckpointError: {checkpoint}: refused to load"), last
    assert "--resume" not in last and "Traceback" not in result.stderr
    assert "\x1b[" not in result.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed"
    assert status["error"] == last.removeprefix("error: ")  # the same line, nothing more
    # a resume never removes the folder it was given
    assert set(before) <= {p.name for p in (tmp_path / "run").iterdir()}
    assert list((tmp_path / "run" / "checkpoints").glob("round_*.pt")) == [checkpoint]


def test_a_gain_is_shown_only_against_another_method():
    from ray_lips.cli.commands import _summary_table

    summary = {"acc_global_window": 0.5, "acc_after_window": 0.6, "seconds_per_round": 1.0}
    alone = _summary_table({"fedavg": summary})
    assert "gain" not in alone
    pair = _summary_table({"fedavg": summary, "lips": {**summary, "acc_global_window": 0.75},
                           "scaffold": summary})
    header = pair.splitlines()[0]
    assert "gain lips" in header
    assert "gain fedavg" not in header and "gain scaffold" not in header
    assert "+0.2500" in pair
    assert pair.splitlines()[-1] == "gain: against the same algorithm with the dense hand-out " \
        "(lips - fedavg)"


def test_a_relative_output_inside_a_ray_job_goes_below_the_home_folder(tmp_path, tiny_config):
    """``ray job submit --working-dir .`` runs the command in an unpacked copy of the working
    directory among Ray's temporary files: results written there would vanish with them."""
    tree = {**tiny_config, "output": "runs"}
    tree["train"] = {**tiny_config["train"], "rounds": 1, "finetune_epochs": 0}
    job_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    job_dir.mkdir(parents=True)
    (job_dir / "mine.yaml").write_text(yaml.safe_dump(tree))
    home = tmp_path / "home"
    home.mkdir()
    env = {**ENV, "HOME": str(home), "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}
    result = subprocess.run([*CLI, "run", "mine.yaml", "--local"], capture_output=True,
                            text=True, timeout=300, env=env, cwd=job_dir)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (home / "runs").iterdir()
    assert f"run directory: {run_dir}" in result.stderr  # at the start of the job's log
    assert result.stdout.strip().splitlines()[-1] == str(run_dir)  # and at its end
    assert len(pd.read_parquet(run_dir / "rounds.parquet")) == 1
    assert not (job_dir / "runs").exists()
