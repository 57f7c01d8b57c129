"""End to end on a real local Ray: driver actor, pool actors, files on disk."""

import pandas as pd
import pytest
import torch

from ray_lips.cluster.driver import run_on_ray
from ray_lips.config import ConfigError, validate_config
from ray_lips.core.run import run_local
from ray_lips.core.run_folder import RunWriter


def test_ray_run_matches_the_in_process_run(ray_local, tmp_path, tiny_config):
    cfg = validate_config(tiny_config)
    summaries = run_on_ray([("lips", cfg, tmp_path / "ray")])
    assert RunWriter(tmp_path / "ray").read_status()["status"] == "finished"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool actors run with cpus_per_pool = 1 thread
    try:
        local = run_local(cfg, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    for name in ("rounds.parquet", "clients.parquet", "layers.parquet"):
        a = pd.read_parquet(tmp_path / "ray" / name).drop(columns="seconds", errors="ignore")
        b = pd.read_parquet(tmp_path / "local" / name).drop(columns="seconds", errors="ignore")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert summaries["lips"]["acc_global_window"] == local["acc_global_window"]


def test_progress_eta_of_a_resumed_run_counts_only_the_rounds_run_now():
    import io

    from ray_lips.cluster.driver import Progress

    stream = io.StringIO()
    progress = Progress("run", rounds=100, stream=stream, already_done=50)
    progress.update({"acc_global": 0.5}, elapsed=10.0, done=55)  # 5 rounds in 10 s
    progress.update({"acc_global": 0.6}, elapsed=20.0, done=60)
    line = stream.getvalue().strip().splitlines()[-1]
    assert "round 60/100" in line
    assert "2.00 s/round" in line and "ETA 80 s" in line
    assert "acc_global 0.600" in line


def test_pools_started_before_the_data_are_stopped_when_the_data_fail_to_load(
        ray_local, tmp_path, monkeypatch, tiny_config):
    """The pools start while the driver loads the data; a dataset that fails to load (here a
    user's function that raises) must not leave them holding their CPUs."""
    import ray

    from ray_lips.core.run import FederatedRun
    from ray_lips.pools.ray_actors import RayPoolFactory

    (tmp_path / "broken_data.py").write_text(
        "def load():\n    raise OSError('the data disk is gone')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny_config["data"]["dataset"] = "broken_data:load"
    cfg = validate_config(tiny_config)
    started = []

    def pools_kept(cfg):
        pools = RayPoolFactory(cfg.resources)(cfg)
        started.extend(pools.actors)
        return pools

    with pytest.raises(ConfigError, match="raised OSError: the data disk is gone"):
        FederatedRun(cfg, tmp_path / "run", make_pools=pools_kept)
    assert len(started) == cfg.resources.pools
    for actor in started:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.location.remote(), timeout=60)
