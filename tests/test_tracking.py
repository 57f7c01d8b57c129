"""Experiment trackers (``--track`` / ``track:``): what MLflow, W&B (offline) and TensorBoard
hold after a run, read back with their own readers, and the errors before any work starts."""

import contextlib
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

from ray_lips.config import ConfigError
from ray_lips.tracking import choose, flatten, parse_track

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytest.importorskip("tensorboard")

CLI = [sys.executable, "-m", "ray_lips.cli"]


def _env(tmp_path: Path) -> dict[str, str]:
    """W&B offline in tmp_path, quiet, and no network to reach (a dead proxy)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "MLFLOW_"))}
    return {**env, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "WANDB_DIR": str(tmp_path / "wandb_home"), "WANDB_SILENT": "true",
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": ""}


def _config(tmp_path: Path, tree: dict, rounds: int = 3, **top) -> Path:
    tree.update(output=str(tmp_path / "runs"), **top)
    tree["train"].update(rounds=rounds, checkpoint_every=rounds)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _cli(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(tmp_path), cwd=tmp_path)


def _mlflow_runs(store: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {store}"
    return client, client.search_runs([found.experiment_id])


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ----- W&B's offline run file, read back with W&B's own record protos -------------------------
def _wandb_records(path: Path):
    """The records of a ``run-*.wandb`` file (a LevelDB-style log of W&B's protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # a block's zero padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def _wandb_run(folder: Path) -> dict:
    """The run's name, its history rows (by step) and its final summary."""
    out: dict = {"history": {}, "summary": {}, "config": {}}
    for record in _wandb_records(folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["group"] = record.run.display_name, record.run.run_group
            out["project"] = record.run.project
            out["config"] = {_key(i): json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            out["history"].setdefault(record.history.step.num, {}).update(row)
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json)
                                   for i in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def _events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    events = _events(logdir)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


# ----- run --local -----------------------------------------------------------------------------
def test_a_local_run_is_in_mlflow_wandb_and_tensorboard_round_by_round(tmp_path, tiny_config):
    """The config as parameters, each round's row with the round as the step, the summary as
    final metrics; the track: section never reaches the run's config.yaml."""
    path = _config(tmp_path, tiny_config, track={"wandb": {"project": "tiny-test"}})
    result = _cli(tmp_path, "run", str(path), "--local", "--track", "mlflow,tensorboard")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    summary = json.loads((run_dir / "status.json").read_text())["summary"]
    assert "track" not in yaml.safe_load((run_dir / "config.yaml").read_text())

    # MLflow: the default file store beside the runs, one experiment per config name
    client, runs = _mlflow_runs(tmp_path / "runs" / "mlruns", "tiny")
    assert [r.info.run_name for r in runs] == [run_dir.name]
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["data.dataset"] == "digits" and params["lips.sparsity"] == "0.5"
    assert params["train.rounds"] == "3" and params["model"] == "smallcnn"
    assert run.data.tags["method"] == "fedavg+lips"
    for key in ("acc_global", "train_loss", "density", "seconds"):
        assert _history(client, run.info.run_id, key) == list(
            zip(rounds["round"], rounds[key], strict=True)), key
    for key in ("acc_global_window", "acc_after_last", "acc_finetune_mean"):
        assert run.data.metrics[key] == pytest.approx(summary[key], abs=0, rel=0)

    # W&B: an offline run under $WANDB_DIR, project from the track: section
    files = list((tmp_path / "wandb_home" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged = _wandb_run(files[0])
    assert logged["name"] == run_dir.name and logged["group"] == "tiny"
    assert logged["project"] == "tiny-test"
    assert logged["config"]["data.dataset"] == "digits", logged["config"]
    assert logged["exit_code"] == 0
    assert sorted(logged["history"]) == list(rounds["round"])
    for _, row in rounds.iterrows():
        assert logged["history"][row["round"]]["acc_global"] == row["acc_global"]
        assert logged["history"][row["round"]]["train_loss"] == row["train_loss"]
    assert logged["summary"]["acc_global_window"] == summary["acc_global_window"]

    # TensorBoard: an event file per run below OUTPUT/tensorboard
    scalars = _tensorboard_scalars(tmp_path / "runs" / "tensorboard" / run_dir.name)
    assert [step for step, _ in scalars["acc_global"]] == list(rounds["round"])
    assert [v for _, v in scalars["acc_global"]] == pytest.approx(list(rounds["acc_global"]),
                                                                  rel=1e-6)
    (step, value), = scalars["final/acc_global_window"]
    assert step == rounds["round"].iloc[-1]
    assert value == pytest.approx(summary["acc_global_window"], rel=1e-6)


def test_track_uri_and_no_tracker_leave_the_numbers_alone(tmp_path, tiny_config):
    """``--track-uri`` picks the MLflow store; the rounds are those of a run without a tracker
    (a tracker is never on the training path)."""
    path = _config(tmp_path, tiny_config, rounds=2)
    store = tmp_path / "elsewhere"
    tracked = _cli(tmp_path, "run", str(path), "--local", "--track", "mlflow",
                   "--track-uri", store.as_uri())
    plain = _cli(tmp_path, "run", str(path), "--local")
    assert tracked.returncode == 0 and plain.returncode == 0, tracked.stderr + plain.stderr
    assert not (tmp_path / "runs" / "mlruns").exists()
    _, runs = _mlflow_runs(store, "tiny")
    assert len(runs) == 1
    frames = [pd.read_parquet(Path(r.stdout.strip().splitlines()[-1]) / "rounds.parquet")
              for r in (tracked, plain)]
    pd.testing.assert_frame_equal(*(f.drop(columns="seconds") for f in frames))


# ----- an interrupted run, resumed -------------------------------------------------------------
def _stop_after(proc: subprocess.Popen, runs: Path, logged: int) -> None:
    """SIGTERM ``proc`` once its trackers have ``logged`` rounds (``trackers.json``)."""
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        for path in runs.glob("*/trackers.json"):
            with contextlib.suppress(ValueError, OSError):
                if json.loads(path.read_text())["last_step"] >= logged - 1:
                    proc.send_signal(signal.SIGTERM)
                    proc.communicate(timeout=60)
                    return
        time.sleep(0.1)
    proc.kill()
    proc.communicate()
    raise AssertionError("the run never logged enough rounds")


def test_a_resumed_run_continues_its_tracker_runs_and_logs_each_round_once(tmp_path,
                                                                            tiny_config):
    """``run --resume`` without ``--track``: the same MLflow run (finished), a W&B run with the
    same id, the same TensorBoard folder; every round once in each, with its number."""
    path = _config(tmp_path, tiny_config, rounds=30)
    tiny_config["train"]["checkpoint_every"] = 4
    path.write_text(yaml.safe_dump(tiny_config))
    runs = tmp_path / "runs"
    proc = subprocess.Popen([*CLI, "run", str(path), "--local", "--track",
                             "mlflow,wandb,tensorboard"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=tmp_path)
    _stop_after(proc, runs, logged=6)
    assert proc.returncode == 143
    run_dir = next(runs.glob("*/trackers.json")).parent
    stopped_at = json.loads((run_dir / "trackers.json").read_text())["last_step"]
    assert stopped_at < 29

    resumed = _cli(tmp_path, "run", "--resume", str(run_dir), "--local")
    assert resumed.returncode == 0, resumed.stderr
    assert "mlflow: continuing the run of" in resumed.stderr
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert list(rounds["round"]) == list(range(30))

    client, found = _mlflow_runs(runs / "mlruns", "tiny")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    for key in ("train_loss", "acc_global"):
        assert _history(client, found[0].info.run_id, key) == list(
            zip(rounds["round"], rounds[key], strict=True)), key

    files = sorted((tmp_path / "wandb_home" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # run-<the same id>.wandb
    first, second = (_wandb_run(f)["history"] for f in files)
    assert max(first) == stopped_at and min(second) == stopped_at + 1
    assert sorted({**first, **second}) == list(range(30))

    scalars = _tensorboard_scalars(runs / "tensorboard" / run_dir.name)
    assert [step for step, _ in scalars["train_loss"]] == list(range(30))


def test_trackers_json_names_runs_never_paths(tmp_path):
    """A crafted ``trackers.json`` (a link, ids that are paths, unknown trackers) is not
    used: only plain ids of known trackers are."""
    from ray_lips.tracking import read_logged

    (tmp_path / "trackers.json").write_text(json.dumps({
        "ids": {"mlflow": "ab12", "wandb": "../../etc", "neptune": "x", "tensorboard": ""},
        "last_step": 7}))
    logged = read_logged(tmp_path)
    assert logged.ids == {"mlflow": "ab12", "tensorboard": ""} and logged.last_step == 7
    (tmp_path / "real.json").write_text(json.dumps({"ids": {"mlflow": "cd34"}}))
    (tmp_path / "trackers.json").unlink()
    (tmp_path / "trackers.json").symlink_to(tmp_path / "real.json")
    assert read_logged(tmp_path).ids == {}
    (tmp_path / "trackers.json").unlink()
    (tmp_path / "trackers.json").write_text("[1, 2]")
    assert read_logged(tmp_path).ids == {}


def test_a_report_is_one_tracker_run_beside_its_runs_with_every_file(tmp_path, tiny_config):
    """``report --track``: report.md, its tables and figures as artifacts of one run in the
    runs' MLflow experiment and store; the figures as TensorBoard images and report.md as its
    text; reporting again logs on to the same run."""
    path = _config(tmp_path, tiny_config, rounds=2)
    assert _cli(tmp_path, "run", str(path), "--local", "--track", "mlflow").returncode == 0
    runs = tmp_path / "runs"
    for _ in range(2):
        done = _cli(tmp_path, "report", str(runs), "--track", "mlflow,tensorboard,wandb")
        assert done.returncode == 0, done.stderr
        assert "warning" not in done.stderr
    report_dir = runs / "report"
    client, found = _mlflow_runs(runs / "mlruns", "tiny")
    assert len(found) == 2 and "report-runs" in {r.info.run_name for r in found}
    logged = next(r for r in found if r.info.run_name == "report-runs")
    assert logged.info.status == "FINISHED" and logged.data.params["baseline"] == "own"

    def files(folder: str = "") -> set[str]:
        return {a.path for a in client.list_artifacts(logged.info.run_id, folder or None)}

    assert "report.md" in files()
    assert {f"tables/{p.name}" for p in (report_dir / "tables").iterdir()} == files("tables")
    figures = {f"figures/{p.name}" for p in (report_dir / "figures").iterdir()}
    assert figures and figures == files("figures")
    events = _events(runs / "tensorboard" / "report-runs")
    assert {f"figures/{Path(f).stem}" for f in figures} <= set(events.Tags()["images"])
    assert "report/text_summary" in events.Tags()["tensors"]
    saved = list((tmp_path / "wandb_home" / "wandb").glob("offline-run-*/files/report.md"))
    assert len(saved) == 2  # one per report, the second continuing the first's run id
    assert saved[0].read_text() == (report_dir / "report.md").read_text()


# ----- refusals before any work ------------------------------------------------------------------
def test_a_tracker_not_installed_is_one_line_naming_its_extra_before_anything(tmp_path,
                                                                              tiny_config):
    path = _config(tmp_path, tiny_config)
    probe = ("import sys\n"
             "sys.modules['mlflow'] = None  # as if mlflow were not installed\n"
             "from ray_lips.cli import main\n"
             f"main(['run', {str(path)!r}, '--track', 'tensorboard,mlflow'])\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --track mlflow: mlflow is not installed; pip install 'ray-lips[mlflow]'"]
    assert not (tmp_path / "runs").exists()


def test_an_unknown_tracker_stops_the_sweep_before_ray(tmp_path, tiny_config):
    path = _config(tmp_path, tiny_config, sweep={"storage_path": str(tmp_path / "results")})
    done = _cli(tmp_path, "sweep", str(path), "--track", "neptune", timeout=120)
    assert done.returncode == 2
    assert "--track: unknown tracker 'neptune'; expected one of mlflow, wandb, tensorboard" \
        in done.stderr
    assert not (tmp_path / "results").exists()


def test_track_sections_and_the_command_line_combine():
    assert parse_track("mlflow, wandb").names == ["mlflow", "wandb"]
    assert parse_track(["tensorboard"]).names == ["tensorboard"]
    section = {"mlflow": {"experiment": "paper"}, "wandb": False, "tensorboard": None}
    track = choose(section, ["wandb"], uri="sqlite:///m.db")
    assert track.names == ["mlflow", "wandb", "tensorboard"]
    assert track.mlflow.experiment == "paper" and track.mlflow.uri == "sqlite:///m.db"
    assert choose(section, ["none"]).names == []
    assert choose(None, (), uri="file:///x").names == ["mlflow"]
    with pytest.raises(ConfigError, match=r"track.wandb.mode: Input should be 'online'"):
        parse_track({"wandb": {"mode": "sometimes"}})
    with pytest.raises(ConfigError, match="track.mlflow.url: Extra inputs"):
        parse_track({"mlflow": {"url": "x"}})
    assert flatten({"data": {"alpha": 0.1, "synthetic": {"shape": [3, 8]}}, "seed": 0}) == {
        "data.alpha": "0.1", "data.synthetic.shape": "[3, 8]", "seed": "0"}


# ----- Ray: compare and sweep ------------------------------------------------------------------
@pytest.mark.slow
def test_compare_and_sweep_on_ray_log_every_run_with_the_figure(tmp_path, tiny_config):
    """compare: one MLflow run per method, its rounds, and the inertia figure as an artifact;
    sweep: one MLflow run per trial with the trial's whole config and its rounds."""
    tiny_config["resources"]["pools"] = 1
    path = _config(tmp_path, tiny_config, rounds=2,
                   sweep={"storage_path": str(tmp_path / "results"), "name": "sw",
                          "variants": [{"algorithm": "fedavg"}, {"algorithm": "lips"}]})
    compared = _cli(tmp_path, "compare", str(path), "--track", "mlflow", timeout=400)
    assert compared.returncode == 0, compared.stderr
    client, runs = _mlflow_runs(tmp_path / "runs" / "mlruns", "tiny")
    assert sorted(r.data.tags["method"] for r in runs) == ["fedavg", "fedavg+lips"]
    for run in runs:
        assert [s for s, _ in _history(client, run.info.run_id, "acc_global")] == [0, 1]
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
        assert len(artifacts) == 1 and artifacts[0].endswith("_inertia.png")

    swept = _cli(tmp_path, "sweep", str(path), "--track", "mlflow", timeout=400)
    assert swept.returncode == 0, swept.stderr
    client, runs = _mlflow_runs(tmp_path / "results" / "sw" / "mlruns", "sw")
    assert sorted(r.data.params["handout"] for r in runs) == ["dense", "lips"]
    assert sorted(r.data.tags["method"] for r in runs) == ["fedavg", "fedavg+lips"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["data.dataset"] == "digits"
        assert [s for s, _ in _history(client, run.info.run_id, "acc_global")] == [0, 1]
        trial_dir = Path(run.data.tags["ray_lips.run_dir"])
        summary = json.loads((trial_dir / "status.json").read_text())["summary"]
        assert run.data.metrics["acc_global_window"] == summary["acc_global_window"]
