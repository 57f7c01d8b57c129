"""Sweeps on the session's local Ray: trials, run files, divergence, crash retry, resume."""

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from same_runs import assert_same_tables

from ray_lips.cli.sweep import sweep
from ray_lips.cluster.sweep_spec import load_spec, parse_spec, trial_config
from ray_lips.cluster.tune_trial import (
    adopt_checkpoint,
    make_scheduler,
    mark_interrupted,
    pack_checkpoint,
    run_sweep,
    trial_table,
)
from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.core.run_folder import RunWriter

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
RUN_FILES = ("config.yaml", "status.json", "rounds.parquet", "layers.parquet", "clients.parquet")
# Shrinks any shipped spec to seconds on 2 CPUs: synthetic images, 2 clients, 1 pool, 1 round.
SHRINK = [
    "data.dataset=synthetic", "data.synthetic.shape=[3,32,32]", "data.synthetic.train_size=200",
    "data.synthetic.test_size=100", "data.clients=2", "data.train_per_client=10",
    "data.test_per_client=5", "train.rounds=1", "train.local_epochs=1", "train.batch_size=10",
    "train.finetune_epochs=0", "train.eval_test_samples=20", "resources.pools=1",
    "resources.cpus_per_pool=1", "resources.gpus_per_pool=0", "resources.driver_cpus=0",
    "sweep.grid.seed=[0]",
]


def _write(tmp_path: Path, tree: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def _invoke(*args: str):
    return CliRunner().invoke(sweep, list(args), catch_exceptions=False)


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if (p / "params.json").exists())


def _reports(trial: Path) -> list[int]:
    """Rounds of every report the trial made, across restarts (Tune's progress.csv; its
    result.json may be replaced by the storage copy when a failed trial restarts)."""
    return pd.read_csv(trial / "progress.csv")["rounds_done"].tolist()


def _local_twin(tmp_path: Path, config: dict, name: str) -> Path:
    """The same run in this process without Ray (1 thread, as a 1-CPU pool)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_local(validate_config(config), tmp_path / name)
    finally:
        torch.set_num_threads(threads)
    return tmp_path / name


def test_quickstart_shrunk_with_a_diverging_trial(ray_local, tmp_path, tiny_config):
    storage = tmp_path / "results"
    variants = "sweep.variants=[{algorithm: fedavg}, {algorithm: lips}, {train.lr: 1.0e+6}]"
    result = _invoke(str(SWEEPS / "quickstart.yaml"),
                     *_sets("sweep.grid.seed=[0]", variants, "sweep.max_failures=1",
                            "train.rounds=3", "data.clients=4", "train.local_epochs=1",
                            "train.checkpoint_every=2", f"sweep.storage_path={storage}"))
    # a diverged trial is a result, not a failure of the sweep
    assert result.exit_code == 0, result.output
    experiment = storage / "quickstart"
    assert f"storage: {experiment}" in result.output
    assert "acc_global_window" in result.output and "algorithm=fedavg seed=0" in result.output
    assert result.output.count("finished") == 2 and result.output.count("diverged") == 1
    trials = _trial_dirs(experiment)
    assert len(trials) == 3
    diverged = next(t for t in trials if "lr=1e+06" in t.name)
    for trial in set(trials) - {diverged}:
        for name in RUN_FILES:
            assert (trial / name).exists(), f"{trial.name} lacks {name}"
        assert json.loads((trial / "status.json").read_text())["status"] == "finished"
        assert len(pd.read_parquet(trial / "rounds.parquet")) == 3
        assert list(trial.glob("checkpoint_*/round_*.pt")), "no Tune checkpoint"
        assert _reports(trial) == [1, 2, 3]
        reported = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert "acc_global_window" in reported[0] and "acc_finetune_mean" in reported[-1]
    assert (experiment / "sweep_spec.yaml").exists()

    status = json.loads((diverged / "status.json").read_text())
    assert status["status"] == "diverged" and "non-finite" in status["error"]
    error = (diverged / "error.txt").read_text()
    assert "DivergenceError" in error
    assert "not retried" in error  # the retry stopped at once instead of training again

    # a trial is exactly the run `ray-lips run` would make of the same config
    lips = next(t for t in trials if t.name.endswith("lips_s0"))
    config = yaml.safe_load((lips / "config.yaml").read_text())
    assert_same_tables(lips, _local_twin(tmp_path, config, "twin"))

    again = _invoke(str(SWEEPS / "quickstart.yaml"), "--set", f"sweep.storage_path={storage}")
    assert again.exit_code == 2 and "already holds a sweep" in again.output


def test_resources_no_node_has_stop_before_tune(ray_local, tmp_path, tiny_config):
    path = _write(tmp_path, tiny_config)
    storage = f"sweep.storage_path={tmp_path / 'results'}"
    result = _invoke(str(path), *_sets("resources.gpus_per_pool=0.25", storage))
    assert result.exit_code == 2
    assert "resources.gpus_per_pool" in result.output and "no node" in result.output
    result = _invoke(str(path), *_sets("resources.cpus_per_pool=3", storage))
    assert result.exit_code == 2 and "resources.cpus_per_pool" in result.output
    assert not (tmp_path / "results" / "tiny").exists()


def test_crashed_trial_retries_from_its_checkpoint(ray_local, tmp_path, tiny_config):
    tiny_config["train"].update(rounds=6, checkpoint_every=3, local_epochs=1)
    tiny_config["resources"]["pools"] = 1
    spec = parse_spec({**tiny_config, "sweep": {"storage_path": str(tmp_path), "max_failures": 1}})
    def crash_once_after_round_4(row: dict, run_dir: Path) -> None:  # runs in the trial
        marker = run_dir / ".crash_injected"
        if row["round"] == 4 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected crash after round 4 (test)")

    results = run_sweep(spec, after_round=crash_once_after_round_4)
    assert results.num_errors == 0
    (trial,) = _trial_dirs(tmp_path / "tiny")
    assert (trial / ".crash_injected").exists()
    # rounds 1-4 reported, the crash after round 5, then a restart from the round-3 checkpoint
    assert _reports(trial) == [1, 2, 3, 4, 4, 5, 6]
    assert json.loads((trial / "status.json").read_text())["status"] == "finished"
    assert_same_tables(trial, _local_twin(tmp_path, trial_config(spec.base, {}), "twin"))


def test_a_tune_checkpoint_restores_a_trial_whose_directory_is_gone(tmp_path, tiny_config):
    """What a retried or restored trial does first: adopt the Tune checkpoint's files."""
    tiny_config["train"].update(rounds=4, checkpoint_every=2, local_epochs=1)
    straight = _local_twin(tmp_path, tiny_config, "straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the twin: the thread count can change a convolution's bits
    try:
        first = RunWriter(tmp_path / "first")
        run = FederatedRun(validate_config(tiny_config), first.dir)
        for _ in range(2):
            run.run_round()
        run.close()
        packed = tmp_path / "tune_checkpoint"
        packed.mkdir()
        pack_checkpoint(first, first.latest_checkpoint(), packed)

        moved = RunWriter(tmp_path / "moved")  # a fresh directory: nothing of the first attempt
        adopt_checkpoint(tune.Checkpoint.from_directory(str(packed)), moved)
        resumed = FederatedRun(validate_config(tiny_config), moved.dir)
        assert resumed.round == 2
        while not resumed.done:
            resumed.run_round()
        resumed.finish()
        resumed.close()
    finally:
        torch.set_num_threads(threads)
    assert_same_tables(moved.dir, straight)


def test_the_scheduler_is_asha_clocked_in_rounds(tiny_config):
    spec = parse_spec({**tiny_config, "sweep": {"scheduler": {"metric": "acc_after_window",
                                                              "grace_period": 2}}})
    scheduler = make_scheduler(spec.scheduler)
    assert isinstance(scheduler, ASHAScheduler)
    assert (scheduler._time_attr, scheduler._metric, scheduler._mode, scheduler._max_t) == (
        "rounds_done", "acc_after_window", "max", 6)
    assert make_scheduler(parse_spec(tiny_config).scheduler) is None


class _InterruptMidway(tune.Callback):
    """Ctrl+C for Tune (SIGUSR1, Tune's own graceful stop), once: after some trial finished
    and another has reported ``rounds`` rounds."""

    def __init__(self, marker: Path, rounds: int = 3):
        self.marker, self.rounds, self.completed = marker, rounds, False

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed = True

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.completed and result["rounds_done"] >= self.rounds and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, tmp_path,
                                                                      tiny_config):
    tiny_config["train"].update(rounds=2, checkpoint_every=1, local_epochs=1)
    tiny_config["resources"]["pools"] = 1
    tiny_config["sweep"] = {"variants": [{"seed": 0}, {"seed": 1, "train.rounds": 30}],
                            "storage_path": str(tmp_path)}
    path = _write(tmp_path, tiny_config)
    # interrupted (as by Ctrl+C) when the short trial has ended and the long one is mid-way
    first = run_sweep(load_spec(path), callbacks=[_InterruptMidway(tmp_path / "interrupted")])
    table = trial_table(first)
    assert list(table["status"]) == ["finished", "interrupted"], table
    short, long = _trial_dirs(tmp_path / "tiny")
    assert mark_interrupted(first) == 1  # as ray-lips sweep does before printing the table
    assert json.loads((long / "status.json").read_text())["status"] == "interrupted"
    assert json.loads((short / "status.json").read_text())["status"] == "finished"
    before = ((short / "clients.parquet").stat().st_mtime_ns, _reports(short))
    cut = _reports(long)[-1]
    assert 3 <= cut < 30

    result = _invoke(str(path), "--resume")
    assert result.exit_code == 0, result.output
    assert result.output.count("finished") == 2
    assert ((short / "clients.parquet").stat().st_mtime_ns, _reports(short)) == before
    reports = _reports(long)
    assert reports[: cut] == list(range(1, cut + 1))
    resumed_at = reports[cut]
    # from its newest checkpoint (the trial may have run on a little while Tune shut down)
    assert resumed_at > 1, reports
    assert reports[cut:] == list(range(resumed_at, 31))
    assert list(pd.read_parquet(long / "rounds.parquet")["round"]) == list(range(30))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper_cifar10", "paper_cifar100", "paper_tinyimagenet"])
def test_paper_specs_start(ray_local, tmp_path, name):
    result = _invoke(str(SWEEPS / f"{name}.yaml"),
                     *_sets(*SHRINK, "sweep.variants=[{algorithm: lips}]",
                            f"sweep.storage_path={tmp_path}"))
    assert result.exit_code == 0, result.output
    (trial,) = _trial_dirs(tmp_path / name)
    config = yaml.safe_load((trial / "config.yaml").read_text())
    original = load_spec(SWEEPS / f"{name}.yaml").base
    assert config["model"] == original["model"]  # the paper's model, on synthetic images
    assert json.loads((trial / "status.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_multi_dataset_spec_starts(ray_local, tmp_path):
    # the spec's two named axes, crossed, with the datasets swapped for synthetic images
    variants = ("sweep.variants={dataset: [{model: vgg11_bn}, {model: resnet8}], "
                "algorithm: [{algorithm: lips}]}")
    result = _invoke(str(SWEEPS / "multi_dataset.yaml"),
                     *_sets(*SHRINK, variants, f"sweep.storage_path={tmp_path}"))
    assert result.exit_code == 0, result.output
    trials = _trial_dirs(tmp_path / "multi_dataset")
    assert [yaml.safe_load((t / "config.yaml").read_text())["model"] for t in trials] == [
        "vgg11_bn", "resnet8"]


@pytest.mark.slow
def test_asha_stops_trials_early_and_their_status_says_so(ray_local, tmp_path, tiny_config):
    tiny_config["train"].update(rounds=4, local_epochs=1)
    tiny_config["resources"]["pools"] = 1
    tiny_config["sweep"] = {
        "grid": {"train.lr": [0.1, 0.0001, 0.05, 0.00001]}, "storage_path": str(tmp_path),
        "scheduler": {"metric": "acc_global_window", "grace_period": 1, "max_t": 4,
                      "reduction_factor": 2}}
    result = _invoke(str(_write(tmp_path, tiny_config)))
    assert result.exit_code == 0, result.output
    for trial in _trial_dirs(tmp_path / "tiny"):
        status = json.loads((trial / "status.json").read_text())
        assert status["status"] in ("finished", "stopped")
        assert (status["status"] == "stopped") == (status["round"] < 4)
