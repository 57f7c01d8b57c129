"""The README's examples as a user runs them: its commands (shrunk to tiny rounds and
clients by appending ``--set``), its Python snippets, its config example and its complete
reference of keys and defaults, so a README that drifts from the code fails the suite."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ray_lips.config import ExperimentConfig, flatten_keys, validate_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
# Appended to every run and compare: what a README command does, in seconds.
SHRINK = ("train.rounds=2", "data.clients=4", "data.train_per_client=20",
          "data.test_per_client=10", "train.local_epochs=1", "train.finetune_epochs=1",
          "train.eval_test_samples=50", "train.checkpoint_every=1", "resources.pools=1")
SWEEP_SHRINK = (*SHRINK, "sweep.grid.seed=[0]")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # where the block starts in README.md
    heading: str  # the nearest heading above it


def blocks(lang: str) -> list[Block]:
    found, heading, inside, start, body, kind = [], "", False, 0, [], ""
    for number, line in enumerate(README.splitlines(), 1):
        if not inside and line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("```"):
            if inside:
                if kind == lang:
                    found.append(Block(kind, "\n".join(body), start, heading))
                inside = False
            else:
                inside, start, body, kind = True, number, [], line[3:].strip()
        elif inside:
            body.append(line)
    return found


def commands(block: Block) -> list[str]:
    """The block's ``ray-lips`` command lines, comments stripped, continuations joined."""
    text = block.text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" # ")[0].strip()
        if re.match(r"^(PYTHONPATH=\S+ )?ray-lips ", line):
            out.append(line)
    return out


def test_readme_config_example_is_a_valid_config():
    example = next(b for b in blocks("yaml") if b.heading == "Configuration")
    cfg = validate_config(yaml.safe_load(example.text))
    assert cfg.algorithm == "fedavg" and cfg.handout == "lips"


def test_readme_reference_lists_every_key_with_its_default():
    """The "Every key and its default" block is exactly the schema's defaults."""
    reference = next(b for b in blocks("yaml") if b.heading == "Every key and its default")
    documented = flatten_keys(yaml.safe_load(reference.text))
    defaults = flatten_keys(ExperimentConfig().to_dict())
    defaults.pop("data.source")  # written by ray-lips, not by you (documented in the table)
    assert documented == defaults
    unexplained = []  # every key is explained in a table: by name, or as `section.*`
    for key in defaults:
        parts = key.split(".")
        names = [f"`{key}`", f"`{parts[0]}`"]
        names += [f"`{'.'.join(parts[:i])}.*`" for i in range(1, len(parts))]
        if not any(name in README for name in names):
            unexplained.append(key)
    assert unexplained == []


def _user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_DEDUP_LOGS="0")
    env.pop("PYTHONPATH", None)
    return env


def _run(line: str, cwd: Path, env: dict[str, str], timeout: float = 420) -> str:
    """``line`` through bash, as a user types it, with the shrinking ``--set``s appended."""
    words = shlex.split(line)
    while "=" in words[0]:  # PYTHONPATH=. ray-lips ...
        words.pop(0)
    command, extra = words[1], []
    if command in ("run", "compare") and "--resume" not in words:
        extra = [arg for item in SHRINK for arg in ("--set", item)]
    elif command == "sweep" and "--resume" not in words:
        extra = [arg for item in SWEEP_SHRINK for arg in ("--set", item)]
    done = subprocess.run(["bash", "-c", f"{line} {shlex.join(extra)}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"README: `{line}` exited {done.returncode}:\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A user's folder: the shipped sweeps beside them, a home of their own."""
    base = tmp_path_factory.mktemp("readme")
    work, home = base / "work", base / "home"
    work.mkdir()
    home.mkdir()
    shutil.copytree(ROOT / "sweeps", work / "sweeps")
    return work, _user_env(home)


@pytest.mark.slow
def test_readme_commands_work_as_written(workspace):
    """Every ``ray-lips`` line of "Running experiments", "Run on a cluster" and "Reports" (but
    those that name a cluster address or a paper dataset that needs a download), in order."""
    work, env = workspace
    wanted = ("Running experiments", "Run on a cluster", "Reports")
    lines = [line for block in blocks("bash") if block.heading in wanted
             for line in commands(block)]
    assert len(lines) >= 10
    ran = []
    for line in lines:
        if "--address" in line or "paper_" in line:
            continue  # tests/test_cluster.py and tests/test_sweep_spec.py cover these
        if "--resume runs/" in line:
            example = line.split("--resume ", 1)[1].split()[0]
            made = sorted((work / "runs" / "quickstart").glob("quickstart_fedavg+lips_s0_*"))
            assert made, "no quickstart run to resume"
            stamped = re.sub(r"\d{8}-\d{6}", "STAMP", example)
            pattern = re.escape(stamped).replace("STAMP", r"\d{8}-\d{6}")
            assert re.fullmatch(pattern, str(made[0].relative_to(work))), (example, made[0])
            line = line.replace(example, str(made[0].relative_to(work)))
        _run(line, work, env)
        ran.append(line)
    assert any(" compare " in line and "--algorithms" in line for line in ran)
    snippet = next(b for b in blocks("python") if b.heading == "Reports")
    done = subprocess.run([sys.executable, "-c", snippet.text], cwd=work, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "fedavg+lips" in done.stdout


@pytest.mark.slow
def test_readme_bring_your_own_example_runs(workspace, tmp_path):
    """The worked example: ``mypkg/data.py``, ``mypkg/nets.py``, ``mine.yaml`` and the command,
    exactly as the README shows them."""
    _, env = workspace
    section = [b for b in blocks("python") + blocks("yaml") + blocks("bash")
               if b.heading == "Bring your own dataset and model"]
    by_start = {b.line: b for b in section}
    data, nets = (by_start[line] for line in sorted(b.line for b in section
                                                      if b.lang == "python"))
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "data.py").write_text(data.text)
    (tmp_path / "mypkg" / "nets.py").write_text(nets.text)
    config = next(b for b in section if b.lang == "yaml" and "name: mine" in b.text)
    (tmp_path / "mine.yaml").write_text(config.text)
    line = next(cmd for b in section if b.lang == "bash" for cmd in commands(b))
    out = _run(line, tmp_path, env)
    assert "acc_global" in out and (tmp_path / "runs").is_dir()


def test_readme_algorithm_table_says_what_each_class_declares():
    """One row per built-in algorithm, in the registry's order, with the class's label, its
    family, its global model (acc_global) and whether the LIPS hand-out composes with it."""
    from ray_lips.algorithms import registry

    section = README.split("### Algorithms\n", 1)[1].split("\n### ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `")][1:]  # under the header
    assert [row[0].strip("`") for row in rows] == list(registry.names())
    for row, cls in zip(rows, registry.builtin().values(), strict=True):
        assert row[1] == cls.label
        assert row[2] == cls.family, row
        assert row[6].startswith("NaN") == (not cls.has_global_model), row
        assert row[7] == ("yes" if cls.sparse_handout else "no"), row
