"""Where relative output folders go, inside and outside a `ray job submit` job (no Ray here;
tests/test_cluster.py submits real jobs)."""

import json
import socket
from pathlib import Path

from ray_lips.cluster.jobpaths import durable_path, in_ray_job, ray_job_id, where

# What Ray 2.60's job supervisor puts in a job entrypoint's environment (seen in a real job)
JOB_ENV = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip",
                                      "env_vars": {}},
                      "metadata": {"job_submission_id": "raysubmit_ZwnLJ82Ebfqt9Vu6",
                                   "job_name": "raysubmit_ZwnLJ82Ebfqt9Vu6"}})


def test_outside_a_job_relative_paths_are_taken_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    work = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"  # a name only
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert not in_ray_job() and ray_job_id() is None
    assert durable_path("runs/demo") == work / "runs" / "demo"
    assert where(work) == str(work)


def test_inside_a_job_relative_paths_are_taken_from_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_ENV)
    assert in_ray_job() and ray_job_id() == "raysubmit_ZwnLJ82Ebfqt9Vu6"
    assert durable_path("runs/demo") == home / "runs" / "demo"
    assert durable_path("~/x") == home / "x"
    assert durable_path(tmp_path / "abs") == tmp_path / "abs"
    message = where(home / "runs")
    assert message.startswith(str(home / "runs")) and socket.gethostname() in message
    assert "raysubmit_ZwnLJ82Ebfqt9Vu6" in message


def test_a_damaged_job_variable_still_counts_as_a_job(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert in_ray_job() and ray_job_id() is None
    assert durable_path("runs") == Path(tmp_path) / "runs"
