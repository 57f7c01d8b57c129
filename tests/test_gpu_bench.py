"""The GPU benchmark's CPU smoke size runs and writes what it promises; the GPU check script
is valid bash."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_gpu.py"
PHASES = ("train", "handout", "aggregate", "evaluate", "inertia", "write", "other")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _positive(value: str) -> bool:
    number = float(value)
    return math.isfinite(number) and number > 0


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench_gpu")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--quick", "--threads", "1",
         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_quick_run_writes_every_file(quick_out: Path) -> None:
    for name in ("env.json", "matmul.csv", "steps.csv", "steps.txt", "summary_steps.json",
                 "rounds.csv", "rounds_summary.csv", "rounds.txt", "summary_rounds.json",
                 "accuracy.csv", "accuracy_summary.csv", "accuracy.txt",
                 "summary_accuracy.json"):
        assert (quick_out / name).is_file(), name
    env = json.loads((quick_out / "env.json").read_text())
    assert env["device"] == "cpu" and env["quick"] and env["torch"]


def test_matmul_and_step_times_are_finite_and_positive(quick_out: Path) -> None:
    rates = _rows(quick_out / "matmul.csv")
    assert {r["precision"] for r in rates} == {"bf16", "fp32"}
    assert all(_positive(r["tflops"]) for r in rates)
    steps = _rows(quick_out / "steps.csv")
    assert {"model", "path", "clients", "precision", "layout", "ms_per_client_step",
            "gflop_per_client_step", "tflops", "fraction_of_matmul",
            "speedup_vs_serial_same_precision_layout", "peak_mem_mb"} <= set(steps[0])
    assert not [r for r in steps if r["error"]]
    assert {(r["path"], r["clients"]) for r in steps} >= {("serial", "1"), ("grouped", "1"),
                                                          ("grouped", "2")}
    assert {r["precision"] for r in steps} == {"fp32", "bf16"}
    for row in steps:
        for key in ("ms_per_call", "ms_per_client_step", "gflop_per_client_step", "tflops"):
            assert _positive(row[key]), (key, row)
    summary = json.loads((quick_out / "summary_steps.json").read_text())
    assert summary["resnet8"]["best_grouped_vs_best_serial"] > 0


def test_rounds_are_split_into_phases_and_extrapolated(quick_out: Path) -> None:
    rounds = _rows(quick_out / "rounds.csv")
    assert {(r["model"], r["mode"]) for r in rounds} == {
        ("resnet8", "auto"), ("resnet8", "2"), ("vgg11_bn", "serial")}
    for row in rounds:
        assert _positive(row["round_s"]) and _positive(row["engine_seconds"])
        assert _positive(row["train_s"]) and _positive(row["evaluate_s"])
        phases = sum(float(row[f"{p}_s"]) for p in PHASES)
        assert phases == pytest.approx(float(row["round_s"]), rel=1e-3)
    assert {r["density"] for r in rounds if r["round"] == "0"} == {"0.5", "0.3"}  # LIPS d0
    summary = _rows(quick_out / "rounds_summary.csv")
    assert len(summary) == 3 and not [r for r in summary if r["error"]]
    for row in summary:
        for key in ("setup_s", "first_round_s", "mean_round_s", "mean_train_s",
                    "est_300_rounds_s"):
            assert _positive(row[key]), (key, row)
        assert float(row["est_300_rounds_s"]) > 299 * float(row["mean_round_s"])
    assert "300 rounds" in (quick_out / "rounds.txt").read_text()


def test_accuracy_compares_fp32_with_bf16(quick_out: Path) -> None:
    runs = _rows(quick_out / "accuracy_summary.csv")
    assert [r["precision"] for r in runs] == ["fp32", "bf16"]
    for row in runs:
        assert int(row["rounds"]) == 2
        assert 0.0 <= float(row["acc_after_window"]) <= 1.0
    assert math.isfinite(float(runs[1]["bf16_minus_fp32_acc_after"]))


def test_gpu_scripts_are_valid_bash() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    for script in ("gpu_check.sh", "fetch_gpu_wheels.sh"):
        done = subprocess.run([bash, "-n", str(ROOT / "benchmarks" / script)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
