"""End to end on a real local Ray: driver actor, pool actors, files on disk."""

import pandas as pd
import torch

from ray_lips.config import validate_config
from ray_lips.engine.experiment import run_local
from ray_lips.launch import run_on_ray
from ray_lips.results import RunWriter


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

    from ray_lips.launch import Progress

    stream = io.StringIO()
    progress = Progress("run", rounds=100, stream=stream, already_done=50)
    progress.update({"acc_global": 0.5}, elapsed=10.0, done=55)  # 5 rounds in 10 s
    progress.update({"acc_global": 0.6}, elapsed=20.0, done=60)
    line = stream.getvalue().strip().splitlines()[-1]
    assert "round 60/100" in line
    assert "2.00 s/round" in line and "ETA 80 s" in line
    assert "acc_global 0.600" in line
