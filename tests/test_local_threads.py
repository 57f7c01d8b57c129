"""`--local` trains with the threads a Ray pool of the same config has (`cpus_per_pool`)."""

import torch
from same_runs import assert_same_tables

from ray_lips.cluster.driver import run_on_ray
from ray_lips.config import validate_config
from ray_lips.core.run import run_local

# Every table: the pools' work runs with a Ray pool's threads, the driver's with a driver actor's.


def test_in_process_run_uses_the_pools_threads_and_ends_as_the_ray_run(
        ray_local, tmp_path, tiny_config):
    cfg = validate_config(tiny_config)
    assert cfg.resources.cpus_per_pool == 1  # each Ray pool trains with 1 thread
    run_on_ray([("ray", cfg, tmp_path / "ray")])

    caller_threads = torch.get_num_threads()
    torch.set_num_threads(3)  # a caller's count other than the pools'
    try:
        run_local(cfg, tmp_path / "local")
        assert torch.get_num_threads() == 3  # the caller's count is back
    finally:
        torch.set_num_threads(caller_threads)
    assert_same_tables(tmp_path / "ray", tmp_path / "local")
