"""The device a pool trains on: never the CPU in place of a CUDA device it was promised, and
reported by every pool group. Without Ray: the in-process pools (``--local``)."""

import socket

import pytest
import torch

from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.pools.client_pool import CudaUnavailableError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here")


@no_cuda
@pytest.mark.parametrize(("resources", "named"), [
    ({"gpus_per_pool": 0.25}, "resources.gpus_per_pool 0.25"),  # device: auto
    ({"gpus_per_pool": 0, "device": "cuda"}, "resources.device cuda"),
])
def test_a_pool_that_must_train_on_cuda_and_sees_none_stops_the_run_in_one_line(
        tmp_path, tiny_config, monkeypatch, resources, named):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    tiny_config["resources"].update(resources)
    with pytest.raises(CudaUnavailableError) as stopped:
        run_local(validate_config(tiny_config), tmp_path / "run")
    message = str(stopped.value)
    assert "\n" not in message
    for said in ("client pool 0", f"on {socket.gethostname()}", named,
                 f"torch.version.cuda {torch.version.cuda}", "torch.cuda.device_count() 0",
                 "CUDA_VISIBLE_DEVICES '0'", "resources.device: cpu"):
        assert said in message, (said, message)
    assert not (tmp_path / "run" / "rounds.parquet").exists()


def test_in_process_pools_report_the_device_and_threads_they_train_with(tmp_path, tiny_config):
    tiny_config["resources"].update(gpus_per_pool=0.25, device="cpu", cpus_per_pool=2)
    caller_threads = torch.get_num_threads()
    run = FederatedRun(validate_config(tiny_config), tmp_path / "run")
    try:
        devices = run.pools.devices()
    finally:
        run.close()
    assert [d.pool for d in devices] == [0, 1]
    assert {d.device for d in devices} == {"cpu"}
    assert {d.threads for d in devices} == {2}  # int(cpus_per_pool), as a Ray pool's
    assert {d.node for d in devices} == {socket.gethostname()}
    assert all(d.gpu_ids == [] and d.ip is None for d in devices)
    assert torch.get_num_threads() == caller_threads
