from pathlib import Path

import pytest
import yaml

from ray_lips.config import ConfigError, load_config, validate_config
from ray_lips.config.checks import check_config


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_quickstart_keys_load_and_overrides_apply(tmp_path, tiny_config):
    cfg = load_config(_write(tmp_path, tiny_config),
                      ["train.rounds=3", "lips.sparsity=0.7", "data.augment=false"])
    assert cfg.train.rounds == 3 and cfg.lips.sparsity == 0.7 and cfg.data.augment is False
    assert cfg.data.dataset == "digits" and cfg.resources.pools == 2


def test_sweep_section_is_ignored_by_run_configs(tmp_path, tiny_config):
    tiny_config["sweep"] = {"grid": {"seed": [0, 1]}}
    assert load_config(_write(tmp_path, tiny_config)).seed == 0


@pytest.mark.parametrize("override, key", [
    ("data.dataset=imagenet", "data.dataset"),
    ("model=resnet99", "model"),
    ("data.alpha=0", "data.alpha"),
    ("data.alpha=-1", "data.alpha"),
    ("lips.sparsity=1.0", "lips.sparsity"),
    ("lips.sparsity=-0.1", "lips.sparsity"),
    ("lips.period=0", "lips.period"),
    ("lips.scorer=snip", "lips.scorer"),
    ("train.rounds=0", "train.rounds"),
    ("train.bogus=1", "train.bogus"),
    ("resources.pools=0", "resources.pools"),
    ("data.augment=sometimes", "data.augment"),
    ("data.image_size=[8,8]", "data.image_size"),
    ("model=mypkg_that_is_absent.nets:build", "model"),
    ("data.dataset=mypkg_that_is_absent.data:load", "data.dataset"),
])
def test_invalid_values_name_their_key(tmp_path, tiny_config, override, key):
    """Whether from the schema (values alone) or from the checks a command makes next
    (imports, files, what the dataset allows), the message names the key."""
    with pytest.raises(ConfigError) as err:
        check_config(load_config(_write(tmp_path, tiny_config), [override]))
    assert key in str(err.value)


def test_validation_reads_no_file_and_imports_no_user_code(tmp_path, tiny_config):
    """The schema is pure: a dataset file that is not there, or a module that does not import,
    is the checks' business, once per command."""
    tiny_config["data"]["dataset"] = str(tmp_path / "absent.npz")
    tiny_config["model"] = "mypkg_that_is_absent.nets:build"
    cfg = validate_config(tiny_config)
    assert cfg.data.source is None
    with pytest.raises(ConfigError, match="data.dataset: .*absent.npz"):
        check_config(cfg)


def test_more_samples_than_a_partition_can_give(tiny_config):
    tiny_config["data"].update(partition="uniform", clients=100, train_per_client=100)
    with pytest.raises(ConfigError, match="data.train_per_client"):
        check_config(validate_config(tiny_config))


def test_model_must_fit_the_data_dimension(tiny_config):
    tiny_config["data"]["dataset"] = "mnist1d"
    tiny_config["model"] = "resnet8"
    with pytest.raises(ConfigError, match="model"):
        check_config(validate_config(tiny_config))
    tiny_config["model"] = "resnet8_1d"
    assert check_config(validate_config(tiny_config)).model == "resnet8_1d"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)


def test_setting_the_algorithm_alone_resets_the_handout_it_implies(tmp_path):
    """A LIPS config with ``--set algorithm=fedavg`` (or a sweep variant ``algorithm: fedavg``)
    is plain FedAvg, whether the file says ``algorithm: lips`` or the resolved form."""
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text("algorithm: lips\n")
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(validate_config({"algorithm": "lips"}).to_yaml())
    for path in (legacy, resolved):
        assert load_config(path).handout == "lips"
        assert load_config(path, ["algorithm=fedavg"]).handout == "dense"
        assert load_config(path, ["algorithm=fedprox", "handout=lips"]).handout == "lips"
        assert load_config(path, ["algorithm=lips"]).algorithm == "fedavg"


def test_an_override_that_drops_lips_says_so_and_handout_dense_works(tmp_path):
    """``--set algorithm=scaffold`` on a LIPS config is dense SCAFFOLD and says so in one
    line; ``--set handout=dense`` on ``algorithm: lips`` is plain FedAvg instead of an error."""
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text("algorithm: lips\n")
    notes: list[str] = []
    cfg = load_config(legacy, ["algorithm=scaffold"], notes)
    assert (cfg.algorithm, cfg.handout) == ("scaffold", "dense")
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "dense scaffold" in notes[0] and "--set handout=lips" in notes[0]
    notes.clear()
    load_config(legacy, ["algorithm=ditto"], notes)
    assert "ditto does not compose with LIPS" in notes[0]
    notes.clear()
    cfg = load_config(legacy, ["handout=dense"], notes)
    assert (cfg.algorithm, cfg.handout, notes) == ("fedavg", "dense", [])
    cfg = load_config(legacy, ["algorithm=scaffold", "handout=lips"], notes)
    assert (cfg.algorithm, cfg.handout, notes) == ("scaffold", "lips", [])
    dense = tmp_path / "dense.yaml"
    dense.write_text("algorithm: fedavg\n")
    load_config(dense, ["algorithm=scaffold"], notes)
    assert notes == []  # nothing was dropped


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  rounds: 3\n lr: [0.1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    message = str(caught.value)
    assert "\n" not in message and "not valid YAML" in message and "line 3" in message


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", ".", "..", "", "x y"])
def test_run_names_are_one_safe_folder_name(name):
    with pytest.raises(ConfigError, match="name: .*one safe folder name"):
        validate_config({"name": name})


def test_augment_reference_is_accepted_everywhere_and_recorded(tiny_config):
    """``reference`` is the reference's pipeline for CIFAR and Tiny-ImageNet and ``auto``
    for the datasets it has none for (so a paper spec shrunk to synthetic data still runs)."""
    for dataset in ("cifar10", "cifar100", "tinyimagenet", "digits", "synthetic"):
        tiny_config["data"].update(dataset=dataset, augment="reference")
        cfg = validate_config(tiny_config)
        assert cfg.data.augment == "reference" and "augment: reference" in cfg.to_yaml()
