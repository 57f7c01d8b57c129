"""A run folder may be shared: a link planted in it is never written through, a folder whose
files are links is refused before a run starts, every run (Tune trials too) holds its folder's
lock, and a full disk still leaves a status that says the run failed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun
from ray_lips.core.run_folder import RunLockedError, UnsafeRunFolderError, run_lock, run_locks

PRECIOUS = b"someone else's file\n"


def _victim(tmp_path: Path, name: str = "victim") -> Path:
    """A file outside the run folder that a planted link points to."""
    path = tmp_path / "elsewhere" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(PRECIOUS)
    return path


def _started(tmp_path: Path, tiny_config: dict, rounds_done: int = 1) -> tuple[Path, object]:
    tiny_config["train"].update(rounds=3, checkpoint_every=1, local_epochs=1, finetune_epochs=0)
    cfg = validate_config(tiny_config)
    run = FederatedRun(cfg, tmp_path / "run")
    for _ in range(rounds_done):
        run.run_round()
    run.close()
    return tmp_path / "run", cfg


@pytest.mark.parametrize("name", [
    ".lock", "status.json", "config.yaml", "rounds.parquet", "model_final.pt",
    "checkpoints/round_00000.pt", "checkpoints/round_00000.clients/00000.pt", "checkpoints"])
def test_a_run_folder_with_a_link_where_ray_lips_writes_is_refused(tmp_path, tiny_config, name):
    run_dir, _ = _started(tmp_path, tiny_config)
    victim = _victim(tmp_path)
    link = run_dir / name
    if name == "checkpoints":  # a link to a folder: the checkpoints would be written there
        victim = tmp_path / "elsewhere" / "folder"
        shutil.move(link, victim)
    elif link.exists():
        link.unlink()
    link.symlink_to(victim)
    with pytest.raises(UnsafeRunFolderError, match=rf"{name} is a symbolic link; .* remove it"):
        with run_lock(run_dir):
            pass
    assert victim.is_dir() or victim.read_bytes() == PRECIOUS
    with pytest.raises(UnsafeRunFolderError, match=rf"{name} is a symbolic link"):
        FederatedRun(validate_config(tiny_config), run_dir)
    assert victim.is_dir() or victim.read_bytes() == PRECIOUS


def test_links_planted_while_a_run_goes_on_are_replaced_never_written_through(tmp_path,
                                                                              tiny_config):
    """The names ray-lips once wrote first (``status.json.tmp``, ...) and the files themselves,
    planted after the run started: every write replaces the link."""
    run_dir, cfg = _started(tmp_path, tiny_config, rounds_done=0)
    run = FederatedRun(cfg, run_dir)
    planted = {}
    for name in ("status.json.tmp", "status.json", "rounds.parquet.tmp", "layers.parquet",
                 "model_final.pt", "model_final.pt.tmp", "checkpoints/round_00002.pt.tmp",
                 "checkpoints/round_00002.pt", "checkpoints/round_00001.clients.tmp"):
        (run_dir / name).unlink(missing_ok=True)
        planted[name] = _victim(tmp_path, name.replace("/", "_"))
        (run_dir / name).symlink_to(planted[name])
    try:
        while not run.done:
            run.run_round()
        run.finish()
    finally:
        run.close()
    assert all(victim.read_bytes() == PRECIOUS for victim in planted.values())
    for name in ("status.json", "layers.parquet", "model_final.pt", "checkpoints/round_00002.pt"):
        assert (run_dir / name).is_file() and not (run_dir / name).is_symlink()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert not list(run_dir.rglob(".*.tmp"))  # no temporary file left behind


def test_the_command_refuses_a_planted_lock_link_in_one_line_before_ray(tmp_path, tiny_config):
    run_dir, _ = _started(tmp_path, tiny_config)
    victim = _victim(tmp_path)
    (run_dir / ".lock").unlink(missing_ok=True)
    (run_dir / ".lock").symlink_to(victim)
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "ray_lips.cli", "run", "--resume",
                             str(run_dir)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ".lock is a symbolic link" in errors[0]
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr
    assert victim.read_bytes() == PRECIOUS
    assert json.loads((run_dir / "status.json").read_text())["round"] == 1  # untouched


def test_run_locks_takes_every_folder_or_none(tmp_path):
    folders = [tmp_path / name for name in ("a", "b", "c")]
    for folder in folders:
        folder.mkdir()
    with run_lock(folders[1]):
        with pytest.raises(RunLockedError, match="b is in use by pid"):
            with run_locks(folders):
                pass
        with run_lock(folders[0]):  # the first one was let go
            pass
    with run_locks(folders):
        for folder in folders:
            with pytest.raises(RunLockedError, match="in use"):
                with run_lock(folder):
                    pass


def test_a_tune_trial_holds_its_run_folder_lock_while_it_runs(ray_local, tmp_path, tiny_config):
    from ray_lips.cluster.sweep_spec import parse_spec
    from ray_lips.cluster.tune_trial import run_sweep

    tiny_config["train"].update(rounds=1, local_epochs=1, finetune_epochs=0)
    tiny_config["resources"]["pools"] = 1
    spec = parse_spec({**tiny_config, "sweep": {"storage_path": str(tmp_path)}})

    def try_the_lock(row: dict, run_dir: Path) -> None:  # runs in the trial, mid-run
        try:
            with run_lock(run_dir):
                seen = "taken"
        except RunLockedError as err:
            seen = f"refused: {err}"
        (run_dir / "lock_seen.txt").write_text(seen)

    results = run_sweep(spec, after_round=try_the_lock)
    assert results.num_errors == 0
    (seen,) = tmp_path.rglob("lock_seen.txt")
    assert seen.read_text().startswith("refused:") and "is in use by pid" in seen.read_text()
    with run_lock(seen.parent):  # let go when the trial ended
        pass


FULL_DISK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from ray_lips.config import validate_config
    from ray_lips.core import run as experiment

    run_dir = Path(sys.argv[1]) / "run"
    cfg = validate_config(json.loads(Path(sys.argv[2]).read_text()))
    first_round = experiment.FederatedRun.run_round

    def fill_the_disk_then_run(run):  # the disk fills up while the run goes on
        with open(run_dir.parent / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"x" * 4096)
            except OSError:
                pass
        return first_round(run)

    experiment.FederatedRun.run_round = fill_the_disk_then_run
    try:
        experiment.run_local(cfg, run_dir)
    except OSError as err:
        print("raised:", type(err).__name__, err.errno)
    print("status:", (run_dir / "status.json").read_text().replace(chr(10), " "))
    print("left:", sorted(p.name for p in run_dir.rglob(".*.tmp")))
""")


def test_a_full_disk_leaves_a_failed_status_with_a_one_line_error(tmp_path, tiny_config):
    """On a real (private, tiny) file system that fills up mid-run: the run stops with the disk's
    error and status.json says ``failed``, not ``running`` forever."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a private tmpfs")
    tiny_config["train"].update(rounds=2, local_epochs=1, finetune_epochs=0)
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config))
    script = (f"mount -t tmpfs -o size=4m tmpfs {disk} && exec {sys.executable} "
              f"{tmp_path / 'full_disk.py'} {disk} {tmp_path / 'config.json'}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if "mount" in result.stderr and "status:" not in result.stdout:
        pytest.skip(f"no private tmpfs here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["raised"] == "OSError 28"  # ENOSPC: the error that stopped the run
    status = json.loads(lines["status"])
    assert status["status"] == "failed"
    assert status["error"].startswith("OSError: [Errno 28] No space left on device")
    assert "\n" not in status["error"]
    assert lines["left"] == "[]"
