"""An algorithm of the user's, named by import path as a dataset or a model is: the README's
FedAvgM, run through the command line as a user runs it, and the one-line errors of a path
that cannot be used."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ray_lips.algorithms import registry
from ray_lips.config import ConfigError, validate_config
from ray_lips.config.checks import check_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
TINY = {
    "name": "own", "seed": 1,
    "data": {"dataset": "digits", "clients": 4, "train_per_client": 30, "test_per_client": 15},
    "model": "smallcnn",
    "train": {"rounds": 3, "local_epochs": 1, "batch_size": 15, "lr": 0.05, "finetune_epochs": 0,
              "checkpoint_every": 1, "eval_test_samples": 60},
    "resources": {"pools": 2, "cpus_per_pool": 1},
}
ACCURACY = ["acc_global", "acc_after", "acc_before", "acc_test"]


def _readme_block(heading: str, lang: str) -> str:
    """The one ``lang`` block below ``heading`` in the README."""
    text = README.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    found = text.split(f"```{lang}\n")[1:]
    assert len(found) == 1, f"the README's {heading!r} has one {lang} block"
    return found[0].split("```", 1)[0]


def _readme_fedavgm() -> str:
    """The worked example's module, as the README shows it."""
    return _readme_block("Bring your own algorithm", "python")


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """A folder holding ``mypkg`` (the README's FedAvgM and a few broken algorithms), on the
    path of this process and of the commands it starts."""
    pkg = tmp_path / "lib" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "algos.py").write_text(_readme_fedavgm())
    (pkg / "broken.py").write_text(textwrap.dedent("""
        from ray_lips.algorithms.base import Algorithm

        class NotAnAlgorithm:
            name = "nope"

        class Nameless(Algorithm):
            pass

        class Personal(Algorithm):
            name = "personal"
            sparse_handout = False

        class Taken(Algorithm):
            name = "train"

        class Unkept(Algorithm):
            name = "unkept"

            def personalise(self, individual, global_state, round_idx, server_state):
                return {}
        """))
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    for module in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        monkeypatch.delitem(sys.modules, module)
    return tmp_path / "lib"


def _config(**keys) -> dict:
    tree = copy.deepcopy(TINY)
    tree.update(keys)
    return tree


# ----- the schema and the checks --------------------------------------------------------------
def test_the_schema_keeps_an_import_path_and_its_section_without_importing():
    cfg = validate_config(_config(algorithm="nowhere.algos:Mine", mine={"knob": 3}))
    assert cfg.algorithm == "nowhere.algos:Mine" and cfg.model_extra == {"mine": {"knob": 3}}
    assert cfg.to_dict()["mine"] == {"knob": 3}  # what config.yaml records
    with pytest.raises(ConfigError, match=r"^invalid config: mine: unknown key$"):
        validate_config(_config(algorithm="fedavg", mine={"knob": 3}))
    with pytest.raises(ConfigError, match=r"algorithm: unknown algorithm 'fedsgd'; choose one of "
                                          + ", ".join(registry.names())):
        validate_config(_config(algorithm="fedsgd"))


def test_check_config_validates_the_section_with_the_class_and_writes_it_whole(package):
    cfg = check_config(validate_config(_config(algorithm="mypkg.algos:FedAvgM",
                                               fedavgm={"beta": 0.5})))
    assert cfg.model_extra == {"fedavgm": {"beta": 0.5, "server_lr": 1.0}}
    assert cfg.method == "fedavgm"
    again = check_config(validate_config(yaml.safe_load(cfg.to_yaml())))  # as --resume reads it
    assert again == cfg


@pytest.mark.parametrize(("keys", "message"), [
    ({"algorithm": "nowhere.algos:Mine"},
     r"algorithm: cannot import 'nowhere.algos' for 'nowhere.algos:Mine': no module 'nowhere'"),
    ({"algorithm": "mypkg.algos:FedAvgN"},
     r"algorithm: 'mypkg.algos:FedAvgN': 'mypkg.algos' has no attribute 'FedAvgN'"),
    ({"algorithm": "mypkg.broken:NotAnAlgorithm"},
     r"algorithm: 'mypkg.broken:NotAnAlgorithm' is not a class derived from "
     r"ray_lips.algorithms.base.Algorithm"),
    ({"algorithm": "mypkg.broken:Nameless"}, r"algorithm: 'mypkg.broken:Nameless' has no name"),
    ({"algorithm": "mypkg.broken:Taken"}, r"algorithm: 'mypkg.broken:Taken' is named 'train'"),
    ({"algorithm": "mypkg.broken:Unkept"},
     r"algorithm: 'mypkg.broken:Unkept' overrides personalise but its personalised_slot '' is "
     r"not one of its client_slots"),
    ({"algorithm": "mypkg.algos:FedAvgM", "fedavgm": {"beta": 1.5}},
     r"fedavgm.beta: Input should be less than 1"),
    ({"algorithm": "mypkg.algos:FedAvgM", "fedavgm": {"momentum": 0.9}},
     r"fedavgm.momentum: unknown key"),
    ({"algorithm": "mypkg.algos:FedAvgM", "fedavgn": {"beta": 0.9}},
     r"fedavgn: unknown key \(the section of 'mypkg.algos:FedAvgM' is 'fedavgm'\)"),
    ({"algorithm": "mypkg.broken:Personal", "handout": "lips"},
     r"handout: 'lips' cannot be combined with algorithm: 'mypkg.broken:Personal'"),
])
def test_an_unusable_algorithm_stops_with_one_line_naming_the_key(package, keys, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_config(validate_config(_config(**keys)))
    assert "\n" not in str(caught.value)


def test_run_folders_name_the_algorithm_by_its_name(package, tmp_path):
    from ray_lips.core.run_folder import new_run_dir

    cfg = check_config(validate_config(_config(algorithm="mypkg.algos:FedAvgM")))
    assert new_run_dir(cfg, tmp_path).name.startswith("own_fedavgm_s1_")


# ----- through the command line ---------------------------------------------------------------
def _user_env(package: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(package), RAY_DEDUP_LOGS="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["ray-lips", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def test_fedavgm_runs_from_the_command_line_and_is_fedavg_without_momentum(package, tmp_path):
    env = _user_env(package, tmp_path / "home")
    (tmp_path / "home").mkdir()
    runs = {}
    for name, keys in {
        "fedavg": {"algorithm": "fedavg"},
        "plain": {"algorithm": "mypkg.algos:FedAvgM",
                  "fedavgm": {"beta": 0.0, "server_lr": 1.0}},
        "momentum": {"algorithm": "mypkg.algos:FedAvgM", "fedavgm": {"beta": 0.9}},
    }.items():
        config = _write(tmp_path / f"{name}.yaml", _config(name=name, output="runs", **keys))
        done = _run(["run", str(config), "--local"], tmp_path, env)
        assert done.returncode == 0, done.stderr
        runs[name] = Path(done.stdout.strip().splitlines()[-1])
        assert (runs[name] / "model_final.pt").is_file()
    recorded = yaml.safe_load((runs["momentum"] / "config.yaml").read_text())
    assert recorded["algorithm"] == "mypkg.algos:FedAvgM"
    assert recorded["fedavgm"] == {"beta": 0.9, "server_lr": 1.0}
    tables = {name: pd.read_parquet(run / "rounds.parquet") for name, run in runs.items()}
    pd.testing.assert_frame_equal(tables["plain"][ACCURACY], tables["fedavg"][ACCURACY],
                                  check_exact=True)
    assert not tables["momentum"][ACCURACY].equals(tables["fedavg"][ACCURACY])
    done = _run(["run", "--resume", str(runs["momentum"]), "--local"], tmp_path, env)
    assert done.returncode == 0 and "is finished" in done.stderr, done.stderr
    from analysis.loaders import load  # the analysis names it by its name and knobs

    loaded = load(tmp_path / "runs").runs
    labels = dict(zip(loaded["name"], loaded["method"], strict=True))
    assert labels == {"fedavg": "fedavg", "plain": "fedavgm(beta=0)",
                      "momentum": "fedavgm(beta=0.9)"}
    # read where the algorithm cannot be imported (no PYTHONPATH): the report still shows its
    # family and local work, as the runs recorded them
    env.pop("PYTHONPATH")
    done = _run(["report", "runs", "--out", "report"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    final = pd.read_csv(tmp_path / "report" / "tables" / "final.csv").set_index("method")
    assert final.loc["fedavgm(beta=0.9)", "family"] == "global model"
    assert str(final.loc["fedavgm(beta=0.9)", "local_work"]) == "1"


def test_an_algorithm_that_does_not_import_stops_the_command_in_one_line(package, tmp_path):
    env = _user_env(package, tmp_path)
    config = _write(tmp_path / "bad.yaml", _config(algorithm="mypkg.algos:FedAvgN"))
    done = _run(["run", str(config), "--local"], tmp_path, env)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: invalid config: algorithm: 'mypkg.algos:FedAvgN': "
                                   "'mypkg.algos' has no attribute 'FedAvgN'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_fedavgm_runs_on_ray_pools(package, tmp_path):
    """On Ray the pools import the algorithm in their own processes, found through the
    PYTHONPATH the command hands to the local Ray's workers."""
    env = _user_env(package, tmp_path)
    config = _write(tmp_path / "ray.yaml",
                    _config(algorithm="mypkg.algos:FedAvgM", handout="lips",
                            fedavgm={"beta": 0.5}, lips={"sparsity": 0.5, "period": 1}))
    done = _run(["run", str(config)], tmp_path, env)
    assert done.returncode == 0, done.stderr
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert len(pd.read_parquet(run_dir / "rounds.parquet")) == TINY["train"]["rounds"]


def test_the_readme_config_of_the_example_is_valid(package):
    cfg = check_config(validate_config(yaml.safe_load(
        _readme_block("Bring your own algorithm", "yaml"))))
    assert (cfg.method, cfg.model_extra) == ("fedavgm+lips",
                                             {"fedavgm": {"beta": 0.9, "server_lr": 1.0}})
