"""bench_peers.py compares like with like: its serial loop trains the clients ray-lips trains,
in the same order, from the same model, and ends where ray-lips's FedAvg ends; its memory
reading covers the whole process tree."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_peers  # noqa: E402

from ray_lips.config import validate_config  # noqa: E402
from ray_lips.core.run import FederatedRun  # noqa: E402


def _tiny_config(output: Path) -> dict:
    config = bench_peers.run_config(clients=4, samples=20, epochs=2, rounds=2, cpus=2,
                                    output=str(output))
    config["data"]["synthetic"].update(shape=[3, 16, 16], test_size=40)
    config["train"].update(batch_size=10, batched=False)  # the pools' plain local_train path
    return config


@pytest.fixture
def one_thread():
    """Both sides on one intra-op thread (the config's ``cpus_per_pool``), whatever the
    machine's default: thread count decides how some kernels split their sums. The serial
    worker sets the count for this process; it is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _serial(workload: Path, final: Path, average: str) -> dict[str, torch.Tensor]:
    out = bench_peers.serial_worker({"workload": str(workload), "final_state": str(final),
                                     "cpus": 1, "average": average})
    assert len(out["round_ends"]) == torch.load(workload, weights_only=True)["rounds"]
    return torch.load(final, weights_only=True)


def test_serial_loop_ends_where_ray_lips_fedavg_ends(tmp_path: Path, one_thread) -> None:
    """Averaged as ray-lips averages, the serial loop runs the very operations ray-lips runs
    (same clients, order, batches, start model, kernels and thread count), so both end on
    the same bits, on any CPU. A different batch order or start model moves weights by
    more than 1e-3."""
    config = _tiny_config(tmp_path / "runs")
    bench_peers.export_workload(config, tmp_path / "workload.pt")
    final = _serial(tmp_path / "workload.pt", tmp_path / "serial.pt", "fixed")

    run = FederatedRun(validate_config(config), tmp_path / "run")  # in-process pools
    try:
        while not run.done:
            run.run_round()
    finally:
        run.close()
    initial = torch.load(tmp_path / "workload.pt", weights_only=True)["init"]
    moved = max(float((run.global_state[k] - initial[k]).abs().max())
                for k in final if final[k].is_floating_point())
    assert moved > 1e-3  # training did something
    assert final.keys() == run.global_state.keys()
    for name, value in final.items():
        assert value.dtype == run.global_state[name].dtype, name
        assert torch.equal(value, run.global_state[name]), name


def test_the_benchmarks_float64_average_is_fedavg_up_to_the_fixed_point_grid(
        tmp_path: Path, one_thread) -> None:
    """The benchmark's own averaging (a float64 weighted sum) differs from ray-lips's only by
    the fixed-point grid: one round in float64, where both average the same trained clients.
    ray-lips rounds each client's weighted term to the nearest multiple of 2^-32, an error of
    at most 2^-33 per client; the float64 sums' own rounding (2^-53 relative, of weights below
    2^3, a few times per client) stays under 2^-40."""
    config = _tiny_config(tmp_path / "runs")
    config["train"]["rounds"] = 1
    bench_peers.export_workload(config, tmp_path / "workload.pt")
    workload = torch.load(tmp_path / "workload.pt", weights_only=True)
    workload["x_train"] = [x.double() for x in workload["x_train"]]
    workload["init"] = {k: v.double() if v.is_floating_point() else v
                        for k, v in workload["init"].items()}
    torch.save(workload, tmp_path / "workload64.pt")
    grid_bound = len(workload["y_train"]) * 2.0**-33 + 2.0**-40

    fixed = _serial(tmp_path / "workload64.pt", tmp_path / "fixed.pt", "fixed")
    summed = _serial(tmp_path / "workload64.pt", tmp_path / "summed.pt", "float64")
    floats = [k for k, v in summed.items() if v.is_floating_point()]
    assert max(float(summed[k].abs().max()) for k in floats) < 2.0**3
    for name in floats:
        assert summed[name].dtype == fixed[name].dtype == torch.float64, name
        torch.testing.assert_close(summed[name], fixed[name], rtol=0, atol=grid_bound)
    # two different averagings, not one run twice
    assert any(not torch.equal(summed[k], fixed[k]) for k in floats)
    assert max(float((summed[k] - workload["init"][k]).abs().max()) for k in floats) > 1e-3


def test_tree_memory_counts_descendants() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                              "'-c', 'import time; time.sleep(30)']); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rss, pss, processes = bench_peers.tree_memory_mb(child.pid)
            if processes == 2:
                break
            time.sleep(0.1)
        assert processes == 2  # the child and its own child
        assert 0 < pss <= rss
    finally:
        for pid in bench_peers._children().get(child.pid, []):
            subprocess.run(["kill", str(pid)], check=False)
        child.kill()
        child.wait()
