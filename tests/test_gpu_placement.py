"""Fractional GPUs on a real Ray cluster without a GPU: `ray start --head --num-gpus 2` on
loopback declares two logical GPUs, and the pools say, from inside, which one Ray gave them
(`ray.get_gpu_ids()`, the `CUDA_VISIBLE_DEVICES` they see). They train on the CPU
(`resources.device: cpu`); with `device: auto` a pool given GPUs that torch cannot see stops
the run in one line. One cluster for the module; stopped by PID as in tests/test_cluster.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from same_runs import assert_same_tables
from test_cluster import (
    _env,
    _free_ports,
    _sweep_command,
    _wait_for,
    global_cluster_file,  # noqa: F401 - nothing here writes Ray's global file
    ray_node,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
QUARTER_GPU = {"pools": 8, "cpus_per_pool": 0.5, "gpus_per_pool": 0.25, "device": "cpu"}

# Runs in its own process, connected to the cluster: 8 pools of a quarter GPU train a short
# run; the same config with no GPU trains in this process (the same threads: 1 per pool, as
# `cpus_per_pool` 0.5 gives, and 1 for the driver, OMP_NUM_THREADS); 2 pools of a quarter GPU
# with `device: auto` try to start. Prints what the pools reported, as JSON.
DRIVER = '''
import dataclasses, json, sys
from pathlib import Path

import ray

from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.pools.client_pool import CudaUnavailableError
from ray_lips.pools.ray_actors import RayPoolFactory

address, config, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
ray.init(address=address, log_to_driver=False)
cfg = validate_config(config)
run = FederatedRun(cfg, out / "logical-gpus", RayPoolFactory(cfg.resources))
try:
    devices = [dataclasses.asdict(device) for device in run.pools.devices()]
    while not run.done:
        run.run_round()
    run.finish()
finally:
    run.close()
cpu = {**config, "resources": {**config["resources"], "gpus_per_pool": 0, "device": "auto"}}
run_local(validate_config(cpu), out / "cpu")
auto = validate_config({**config, "resources": {**config["resources"], "pools": 2,
                                                 "device": "auto"}})
error = None
try:
    FederatedRun(auto, out / "auto", RayPoolFactory(auto.resources)).close()
except CudaUnavailableError as err:
    error = str(err)
print(json.dumps({"devices": devices, "error": error}))
'''


@pytest.fixture(scope="module")
def gpu_head(tmp_path_factory, global_cluster_file) -> Iterator[str]:  # noqa: F811
    """A head node with 8 CPUs and 2 logical GPUs (no dashboard); yields its GCS address."""
    log_dir = tmp_path_factory.mktemp("gpu-head")
    (port,) = _free_ports(1)
    args = ["--head", "--port", str(port), "--num-cpus", "8", "--num-gpus", "2",
            "--include-dashboard", "false"]
    with ray_node(args, log_dir / "head.log") as node:
        cluster_file = node.temp_dir / "ray_current_cluster"
        _wait_for(cluster_file.exists, "head", node)
        yield cluster_file.read_text().strip()


def _tiny(tiny_config: dict, tmp_path: Path) -> dict:
    tiny_config["data"]["clients"] = 8
    tiny_config["train"].update(rounds=2, checkpoint_every=2)
    tiny_config["resources"].update(QUARTER_GPU)
    tiny_config["output"] = str(tmp_path / "runs")
    return tiny_config


@pytest.fixture(scope="module")
def quarter_gpu_run(gpu_head, tmp_path_factory) -> tuple[dict, Path]:
    from conftest import TINY

    out = tmp_path_factory.mktemp("quarter-gpu")
    config = out / "config.json"
    config.write_text(json.dumps(_tiny(json.loads(json.dumps(TINY)), out)))
    script = out / "driver.py"
    script.write_text(DRIVER)
    result = subprocess.run([sys.executable, str(script), gpu_head, str(config), str(out)],
                            capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**_env(), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), out


def _four_per_gpu(devices: list[dict]) -> None:
    for device in devices:
        assert len(device["gpu_ids"]) == 1, device  # a fraction of one GPU
        assert device["cuda_visible_devices"] == device["gpu_ids"][0], device
        assert device["device"] == "cpu", device
    assert Counter(d["gpu_ids"][0] for d in devices) == {"0": 4, "1": 4}


def test_eight_pools_of_a_quarter_gpu_land_four_per_gpu(quarter_gpu_run):
    report, _ = quarter_gpu_run
    devices = report["devices"]
    assert [d["pool"] for d in devices] == list(range(8))
    _four_per_gpu(devices)
    assert {d["threads"] for d in devices} == {1}


def test_a_run_on_logical_gpus_ends_with_the_cpu_runs_numbers(quarter_gpu_run):
    _, out = quarter_gpu_run
    assert_same_tables(out / "logical-gpus", out / "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here")
def test_pools_given_gpus_that_torch_cannot_see_stop_the_run_in_one_line(quarter_gpu_run):
    report, out = quarter_gpu_run
    error = report["error"]
    assert error is not None, "device: auto trained without the GPUs Ray gave its pools"
    assert "\n" not in error
    assert "resources.gpus_per_pool 0.25" in error and "resources.device: cpu" in error
    assert f"torch.version.cuda {torch.version.cuda}" in error
    assert "torch.cuda.device_count() 0" in error
    assert "CUDA_VISIBLE_DEVICES '0'" in error or "CUDA_VISIBLE_DEVICES '1'" in error
    assert f"on {socket.gethostname()} (" in error  # the node, and its address
    assert not (out / "auto" / "rounds.parquet").exists()


def test_more_gpus_than_the_cluster_has_are_refused_before_training(gpu_head, tmp_path,
                                                                     tiny_config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_tiny(tiny_config, tmp_path)))
    result = subprocess.run(
        [sys.executable, "-m", "ray_lips.cli", "run", str(path), "--address", gpu_head,
         "--set", "resources.pools=5", "--set", "resources.gpus_per_pool=0.5"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**_env(), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert "2.5 GPUs, but the cluster has 2" in result.stderr
    assert not list((tmp_path / "runs").glob("*/rounds.parquet"))


def test_a_sweep_packs_two_trials_of_four_quarter_gpu_pools_into_the_two_gpus(gpu_head,
                                                                             tmp_path):
    storage = tmp_path / "results"
    sets = ["data.clients=4", "data.train_per_client=20", "data.test_per_client=10",
            "train.rounds=1", "train.local_epochs=1", "train.finetune_epochs=0",
            "train.eval_test_samples=20", "resources.pools=4", "resources.cpus_per_pool=0.5",
            "resources.gpus_per_pool=0.25", "resources.device=cpu", "resources.driver_cpus=0",
            "sweep.grid.seed=[0, 1]", "sweep.variants=[{algorithm: lips}]",
            f"sweep.storage_path={storage}"]
    command = [*_sweep_command(), "sweeps/quickstart.yaml", "--address", gpu_head]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**_env(), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = sorted(p for p in (storage / "quickstart").iterdir()
                    if (p / "params.json").exists())
    assert len(trials) == 2
    devices = []
    for trial in trials:
        status = json.loads((trial / "status.json").read_text())
        assert status["status"] == "finished"
        assert [d["pool"] for d in status["devices"]] == [0, 1, 2, 3]
        devices += status["devices"]
    _four_per_gpu(devices)
