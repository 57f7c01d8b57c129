"""The round tables are written with checkpoints, at the end and when a round fails, not every
round: a run stopped between two writes loses only rounds that its resume runs again."""

import io

import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_lips.config import validate_config
from ray_lips.core.failure import DivergenceError
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.core.run_folder import LAYERS_FILE, ROUNDS_FILE, TABLE_FILES, RunWriter


def _bytes(path) -> bytes:
    """A table's file as written; ``rounds.parquet`` without its wall-clock ``seconds``,
    written again the same way (the one column that never repeats)."""
    table = pq.read_table(path)
    if "seconds" not in table.column_names:
        return path.read_bytes()
    buffer = io.BytesIO()
    pq.write_table(table.drop_columns(["seconds"]), buffer)
    return buffer.getvalue()


def _rounds_on_disk(run_dir) -> list[int]:
    path = run_dir / ROUNDS_FILE
    return pd.read_parquet(path)["round"].tolist() if path.exists() else []


@pytest.fixture
def cfg(tiny_config):
    tiny_config["train"].update(rounds=8, checkpoint_every=3)  # checkpoints after rounds 2, 5
    return validate_config(tiny_config)


def test_a_run_stopped_between_table_writes_resumes_to_the_same_tables(tmp_path, cfg):
    run_local(cfg, tmp_path / "straight")

    run = FederatedRun(cfg, tmp_path / "stopped")
    for done in range(1, 6):
        run.run_round()
        # written with the checkpoint after round 2, not after every round
        assert _rounds_on_disk(tmp_path / "stopped") == ([] if done < 3 else [0, 1, 2])
    run.close()  # the process dies after round 4: rounds 3 and 4 were never written
    del run

    resumed = FederatedRun(cfg, tmp_path / "stopped")
    assert resumed.round == 3
    while not resumed.done:
        resumed.run_round()
    resumed.finish()
    resumed.close()
    for name in TABLE_FILES.values():
        assert _bytes(tmp_path / "stopped" / name) == _bytes(tmp_path / "straight" / name), name


def test_a_run_folder_written_every_round_still_resumes_to_the_same_tables(tmp_path, cfg):
    """Before, the tables were rewritten every round: an older run stopped after round 4 holds
    rows past its last checkpoint, which its resume drops and runs again."""
    run_local(cfg, tmp_path / "straight")
    run = FederatedRun(cfg, tmp_path / "old")
    for _ in range(5):
        run.run_round()
    run.write_tables()  # what the earlier version had on disk when it died
    run.close()
    assert _rounds_on_disk(tmp_path / "old") == [0, 1, 2, 3, 4]

    resumed = FederatedRun(cfg, tmp_path / "old")
    assert resumed.round == 3 and [r["round"] for r in resumed.rounds_rows] == [0, 1, 2]
    while not resumed.done:
        resumed.run_round()
    resumed.finish()
    resumed.close()
    for name in TABLE_FILES.values():
        assert _bytes(tmp_path / "old" / name) == _bytes(tmp_path / "straight" / name), name


def test_a_round_that_fails_leaves_the_rounds_before_it_on_disk(tmp_path, cfg, monkeypatch):
    run = FederatedRun(cfg, tmp_path / "run")
    run.run_round()
    run.run_round()

    def diverge(*args, **kwargs):
        raise DivergenceError("client 0 produced non-finite or exploding values in 'w'")

    monkeypatch.setattr(run.pools, "train_round", diverge)
    with pytest.raises(DivergenceError):
        run.run_round()
    run.close()
    assert _rounds_on_disk(tmp_path / "run") == [0, 1]
    assert pd.read_parquet(tmp_path / "run" / LAYERS_FILE)["round"].max() == 1


def test_a_run_that_fails_in_its_first_round_writes_no_table(tmp_path, cfg, monkeypatch):
    run = FederatedRun(cfg, tmp_path / "run")

    def fail(*args, **kwargs):
        raise RuntimeError("the user's data cannot be read")

    monkeypatch.setattr(run.pools, "train_round", fail)
    with pytest.raises(RuntimeError):
        run.run_round()
    run.close()
    assert not (tmp_path / "run" / ROUNDS_FILE).exists()  # `run` removes such a folder


def test_status_follows_every_round_between_table_writes(tmp_path, cfg):
    run = FederatedRun(cfg, tmp_path / "run")
    run.run_round()
    run.run_round()
    status = RunWriter(tmp_path / "run").read_status()
    run.close()
    assert (status["status"], status["round"]) == ("running", 2)
