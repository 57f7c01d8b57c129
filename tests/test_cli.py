"""The ``ray-lips`` command as a user runs it, in subprocesses."""

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


def test_gpu_request_on_a_cpu_cluster_stops_before_training(tmp_path, tiny_config):
    result = _cli("run", str(_config(tmp_path, tiny_config)), "--set",
                  "resources.gpus_per_pool=0.5")
    assert result.returncode == 2
    assert "gpus_per_pool" in result.stderr and "no GPU" in result.stderr
    assert not list((tmp_path / "runs").glob("*/rounds.parquet"))


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
    from ray_lips.engine.experiment import run_local

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
    from ray_lips.engine.experiment import FederatedRun
    from ray_lips.results import run_lock

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
             "from ray_lips.cli import _load, _preflight\n"
             f"_preflight(_load({str(path)!r}, ()))\n"
             "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
