"""Sweep specs without Ray: expansion, validation messages, cluster fit, the shipped specs."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ray_lips.cli.sweep import sweep
from ray_lips.cluster.sweep_spec import (
    ClusterError,
    SpecError,
    check_cluster,
    describe,
    load_spec,
    parse_spec,
    trial_bundles,
    trial_label,
)
from ray_lips.config import ConfigError, load_config

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"


def _spec(tiny_config: dict, **section) -> dict:
    return {**tiny_config, "sweep": section}


def test_every_shipped_spec_validates_and_is_also_a_run_config():
    files = sorted(SWEEPS.glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"quickstart", "paper_cifar10", "paper_cifar100", "paper_tinyimagenet",
            "ablation_scorer", "multi_dataset", "mnist1d_resnet8"} <= names
    for path in files:
        spec = load_spec(path)
        assert spec.total_trials >= 1
        load_config(path)  # `ray-lips run` reads the same file


def test_paper_grids_keep_fedavg_out_of_the_lips_axes():
    spec = load_spec(SWEEPS / "paper_cifar10.yaml")
    assert spec.total_trials == 3 * (1 + 3 * 2)
    fedavg = [t for t in spec.trials if t["algorithm"] == "fedavg"]
    assert len(fedavg) == 3 and all(set(t) == {"algorithm", "seed"} for t in fedavg)
    lips = [t for t in spec.trials if t["algorithm"] == "lips"]
    assert {(t["lips.sparsity"], t["lips.period"]) for t in lips} == {
        (s, p) for s in (0.3, 0.5, 0.7) for p in (5, 10)}
    cfg = spec.trial_configs()[0]
    assert (cfg.model, cfg.data.clients, cfg.train.rounds, cfg.resources.gpus_per_pool) == (
        "vgg11_bn", 100, 300, 0.25)
    tiny = load_spec(SWEEPS / "paper_tinyimagenet.yaml").trial_configs()[0]
    assert (tiny.model, tiny.data.clients, tiny.lips.sparsity, tiny.lips.period) == (
        "resnet10", 40, 0.9, 10)


def test_named_variant_axes_are_crossed():
    spec = load_spec(SWEEPS / "multi_dataset.yaml")
    assert spec.total_trials == 3 * 7 * 3
    configs = spec.trial_configs()
    assert {(c.data.dataset, c.model) for c in configs} == {
        ("cifar10", "vgg11_bn"), ("cifar100", "resnet8"), ("tinyimagenet", "resnet10")}
    assert {c.data.clients for c in configs if c.data.dataset == "tinyimagenet"} == {40}
    assert sum(c.handout == "dense" for c in configs) == 3 * 3


def test_mnist1d_spec_matches_issue_6():
    spec = load_spec(SWEEPS / "mnist1d_resnet8.yaml")
    configs = spec.trial_configs()
    assert len(configs) == 15
    assert {(c.handout, c.lips.sparsity if c.handout == "lips" else None) for c in configs} \
        == {("dense", None), ("lips", 0.5), ("lips", 0.7)}
    assert {c.algorithm for c in configs} == {"fedavg"}
    c = configs[0]
    assert (c.data.dataset, c.model, c.data.clients, c.data.train_per_client, c.data.alpha,
            c.train.rounds, c.train.batch_size, c.train.local_epochs, c.train.lr,
            c.lips.period, c.resources.gpus_per_pool) == (
        "mnist1d", "resnet8_1d", 20, 100, 0.1, 100, 100, 5, 0.1, 5, 0)


def test_no_sweep_section_is_one_trial(tiny_config):
    spec = parse_spec(tiny_config)
    assert spec.trials == [{}] and spec.total_trials == 1 and spec.name == "tiny"


def test_grid_random_dims_and_set_overrides(tmp_path, tiny_config):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(
        tiny_config, grid={"lips": {"sparsity": [0.3, 0.6]}}, uniform={"train.lr": [0.01, 0.1]},
        choice={"lips.scorer": ["magnitude", "random"]}, num_samples=3)))
    spec = load_spec(path, ["sweep.max_concurrent_trials=1", "train.rounds=2",
                            "sweep.storage_path=results", "data.root=datasets"])
    assert spec.trials == [{"lips.sparsity": 0.3}, {"lips.sparsity": 0.6}]
    assert spec.total_trials == 6 and spec.max_concurrent_trials == 1
    assert {d.key: d.kind for d in spec.random} == {"train.lr": "uniform",
                                                      "lips.scorer": "choice"}
    assert spec.base["train"]["rounds"] == 2
    assert spec.storage_path == Path.cwd() / "results" and spec.storage_is_relative
    # trials run in their own working directories, so a relative data.root is pinned here
    assert spec.base["data"]["root"] == str(Path.cwd() / "datasets")



JOB_ENV = ('{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, '
           '"metadata": {"job_submission_id": "raysubmit_abc", "job_name": "raysubmit_abc"}}')


def test_a_relative_storage_path_inside_a_ray_job_is_below_home(tmp_path, tiny_config,
                                                                  monkeypatch):
    """`ray job submit` runs the sweep in a temporary copy of the working directory; Ray's job
    supervisor marks the entrypoint's environment with RAY_JOB_CONFIG_JSON_ENV_VAR."""
    home, package = tmp_path / "home", tmp_path / "_ray_pkg_0123456789abcdef"
    home.mkdir()
    package.mkdir()
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tiny_config, storage_path="results")))
    monkeypatch.chdir(package)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_ENV)
    spec = load_spec(path)
    assert spec.storage_path == home / "results" and spec.storage_is_relative
    assert spec.experiment_dir == home / "results" / "tiny"
    assert load_spec(path, [f"sweep.storage_path={tmp_path / 'abs'}"]).storage_path == \
        tmp_path / "abs"
    assert load_spec(path, ["sweep.storage_path=~/r"]).storage_path == home / "r"
    # the data a job brings with its working directory stays where the job runs
    assert load_spec(path, ["data.root=datasets"]).base["data"]["root"] == \
        str(package / "datasets")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert load_spec(path).storage_path == package / "results"

@pytest.mark.parametrize(("section", "needle"), [
    ({"grids": {"seed": [0]}}, "sweep.grids: unknown key"),
    ({"grid": {"lips.sparsty": [0.1]}}, "sweep.grid.lips.sparsty: unknown config key: lips has "
                                        "no 'sparsty'"),
    ({"grid": {"seed.x": [0.1]}}, "sweep.grid.seed.x: unknown config key: seed is a value"),
    ({"grid": {"lips": [0.1]}}, "sweep.grid.lips: lips is a section; name one of its keys "
                                "(lips.sparsity, lips.period"),
    ({"grid": {"seed": []}}, "sweep.grid.seed: empty list"),
    ({"grid": {"seed": 3}}, "sweep.grid.seed: expected a list"),
    ({"grid": {"lips.sparsity": [0.5, 1.5]}}, "sweep.grid.lips.sparsity: value 1.5 is invalid"),
    ({"grid": {"algorithm": ["fedavg", "fedsgd"]}}, "sweep.grid.algorithm: value 'fedsgd'"),
    ({"variants": [{"algorithm": "lips", "grid": {"train.lr": [0]}}]},
     "sweep.variants[0].grid.train.lr: value 0 is invalid"),
    ({"variants": {"algo": [{"algorithm": "lips", "lips.period": 0}]}},
     "sweep.variants.algo[0].lips.period: value 0 is invalid"),
    ({"variants": [{}]}, "sweep.variants[0]: expected a mapping"),
    ({"grid": {"seed": [0, 1]}, "variants": [{"seed": 3}]}, "seed: also set by"),
    ({"uniform": {"seed": [0, 5]}}, "sweep.uniform.seed: seed is not a float"),
    ({"uniform": {"train.lr": [0.1, 0.01]}}, "sweep.uniform.train.lr: low 0.1 must be below"),
    ({"loguniform": {"train.momentum": [0.0, 0.9]}}, "loguniform bounds must be positive"),
    ({"uniform": {"train.momentum": [0.5, 1.5]}}, "sweep.uniform.train.momentum: value 1.5"),
    ({"choice": {"lips.scorer": ["magnitude", "psychic"]}}, "sweep.choice.lips.scorer: value"),
    ({"grid": {"seed": [0]}, "choice": {"seed": [1, 2]}}, "both a random dimension"),
    ({"scheduler": {"type": "pbt"}}, "sweep.scheduler.type"),
    ({"scheduler": {"metric": "accuracy"}}, "sweep.scheduler.metric: 'accuracy' is not reported"),
    ({"scheduler": {"grace_period": 50}}, "sweep.scheduler.grace_period: 50 exceeds max_t 6"),
    ({"scheduler": {"patience": 3}}, "sweep.scheduler.patience: unknown key"),
    ({"max_concurrent_trials": 0}, "sweep.max_concurrent_trials: expected an integer >= 1"),
    ({"storage_path": "s3://bucket/results"}, "sweep.storage_path: 's3://bucket/results'"),
    ({"name": "a/b"}, "sweep.name: 'a/b'"),
    ({"grid": {"resources.gpus_per_pool": [1.5]}}, "resources.gpus_per_pool: 1.5"),
])
def test_bad_specs_name_the_key(tiny_config, section, needle):
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(tiny_config, **section))
    assert needle in str(err.value)


def test_a_trial_its_dataset_does_not_fit_stops_the_sweep_before_ray(tiny_config, tmp_path):
    """The schema checks values alone; what a dataset allows is checked once per distinct
    trial by ``ray-lips sweep`` before Ray starts, naming the trial."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tiny_config, grid={"model": ["smallcnn",
                                                                      "resnet8_1d"]})))
    parse_spec(yaml.safe_load(path.read_text()))  # the spec itself is well-formed
    result = CliRunner().invoke(sweep, [str(path)])
    assert result.exit_code == 2
    assert "the trial model=resnet8_1d is invalid: model: 'resnet8_1d' does not fit" in \
        result.output


def test_bad_base_config_is_reported_like_ray_lips_run(tiny_config):
    tiny_config["data"]["alpha"] = 0
    with pytest.raises(ConfigError, match="data.alpha"):
        parse_spec(_spec(tiny_config, grid={"seed": [0, 1]}))


def test_labels_are_short_and_file_safe():
    overrides = {"algorithm": "lips", "lips.sparsity": 0.5, "lips.period": 5, "seed": 1,
                 "data.synthetic.shape": [1, 40]}
    assert trial_label(overrides) == "lips_sparsity=0.5_period=5_s1_shape=1x40"
    assert describe(overrides).startswith("algorithm=lips lips.sparsity=0.5 lips.period=5")
    assert trial_label({}) == "base"


def _node(cpu: float, gpu: float = 0, alive: bool = True) -> dict:
    resources = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return {"Alive": alive, "Resources": resources}


def test_cluster_fit(tiny_config):
    tiny_config["resources"] = {"pools": 4, "cpus_per_pool": 1, "gpus_per_pool": 0.25,
                                "driver_cpus": 1}
    spec = parse_spec(tiny_config)
    pool = {"CPU": 1.0, "GPU": 0.25}
    assert trial_bundles(spec.trial_configs()[0]) == [{"CPU": 1.0}] + [pool] * 4
    check_cluster(spec, [_node(8, 1)])
    check_cluster(spec, [_node(2, 1), _node(3, 0)])  # spread over two nodes
    with pytest.raises(ClusterError, match="resources.gpus_per_pool: .* no node of the cluster "
                                           "has a GPU"):
        check_cluster(spec, [_node(64)])
    with pytest.raises(ClusterError, match="resources.pools: .* = 5 CPU, but the whole cluster "
                                           "has 4"):
        check_cluster(spec, [_node(4, 1)])
    with pytest.raises(ClusterError, match="= 1 GPU, but the whole cluster has 0.5"):
        check_cluster(spec, [_node(8, 0.5)])
    with pytest.raises(ClusterError, match="GPU"):
        check_cluster(spec, [_node(8, 1, alive=False), _node(8)])

    tiny_config["resources"] = {"pools": 1, "cpus_per_pool": 4}
    with pytest.raises(ClusterError, match="resources.cpus_per_pool: a client pool needs 4 CPU"):
        check_cluster(parse_spec(tiny_config), [_node(2), _node(2)])
    tiny_config["resources"] = {"pools": 1, "cpus_per_pool": 1, "driver_cpus": 3}
    with pytest.raises(ClusterError, match="resources.driver_cpus"):
        check_cluster(parse_spec(tiny_config), [_node(2), _node(2)])


def test_cli_rejects_bad_specs_before_ray_starts(tmp_path, tiny_config):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tiny_config, grid={"lips.sparsity": [0.2, 1.0]})))
    result = CliRunner().invoke(sweep, [str(path), "--set",
                                        f"sweep.storage_path={tmp_path / 'out'}"])
    assert result.exit_code == 2
    assert "sweep.grid.lips.sparsity: value 1.0 is invalid" in result.output
    assert not (tmp_path / "out").exists()

    path.write_text(yaml.safe_dump(_spec(tiny_config, grid={"lips.sparsity": [0.2, 0.4]})))
    result = CliRunner().invoke(sweep, [str(path), "--set", "sweep.grid.seed=[]"])
    assert result.exit_code == 2 and "sweep.grid.seed: empty list" in result.output
    result = CliRunner().invoke(sweep, [str(path), "--set", "sweep.colour=blue"])
    assert result.exit_code == 2 and "sweep.colour: unknown key" in result.output
    result = CliRunner().invoke(sweep, [str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_cli_resume_needs_an_experiment(tmp_path, tiny_config):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(sweep, [str(path), "--resume", "--set",
                                        f"sweep.storage_path={tmp_path}"])
    assert result.exit_code == 2
    assert "--resume: no sweep to resume in" in result.output


def _methods(spec) -> set[tuple]:
    return {(c.algorithm, c.handout, c.fedprox.mu if c.algorithm == "fedprox" else None)
            for c in spec.trial_configs()}


@pytest.mark.parametrize("name", ["baselines_mnist1d", "paper_baselines_cifar10"])
def test_baseline_specs_cover_every_algorithm_each_composable_one_with_lips(name):
    from ray_lips.algorithms import registry

    spec = load_spec(SWEEPS / f"{name}.yaml")
    dense = {(algorithm, "dense") for algorithm in registry.names()}
    lips = {(algorithm, "lips") for algorithm in registry.composable_with_lips()}
    methods = _methods(spec)
    assert {(algorithm, handout) for algorithm, handout, _ in methods} == dense | lips
    assert {mu for algorithm, _, mu in methods if algorithm == "fedprox"} == {0.01, 0.1}
    assert len(methods) == len(dense | lips) + 2  # FedProx at two mu, dense and LIPS
    assert spec.total_trials == len(methods) * 3
    assert {c.seed for c in spec.trial_configs()} == {0, 1, 2}


def test_the_paper_baselines_grid_runs_every_method_when_shrunk(tmp_path):
    """Each of the 26 methods of the CIFAR-10 baselines grid, two rounds on tiny synthetic data
    (two clients of five samples, one step an epoch) with the grid's model (VGG11-BN) and every
    other setting as shipped."""
    from ray_lips.core.run import run_local

    shrink = ["data.dataset=synthetic", "data.clients=2", "data.train_per_client=5",
              "data.test_per_client=5", "train.rounds=2", "train.local_epochs=1",
              "train.batch_size=5", "train.finetune_epochs=0", "train.eval_test_samples=10",
              "resources.pools=2", "resources.gpus_per_pool=0", "sweep.grid.seed=[0]",
              "data.synthetic.train_size=100", "data.synthetic.test_size=50"]
    spec = load_spec(SWEEPS / "paper_baselines_cifar10.yaml", shrink)
    assert spec.total_trials == 26
    for k, cfg in enumerate(spec.trial_configs()):
        assert cfg.model == "vgg11_bn" and cfg.lips.sparsity == 0.5
        summary = run_local(cfg, tmp_path / f"t{k}")
        assert summary["rounds_done"] == 2 and summary["acc_after_last"] >= 0


def test_the_printed_resume_command_survives_the_shell():
    import shlex

    from ray_lips.cli.sweep import resume_command

    overrides = ("sweep.grid={seed: [0, 1]}", "name=my run")
    command = resume_command("specs/my sweep.yaml", overrides)
    assert shlex.split(command) == ["ray-lips", "sweep", "specs/my sweep.yaml", "--resume",
                                    "--set", overrides[0], "--set", overrides[1]]


def test_a_trial_not_started_is_named_by_its_grid_point_not_as_the_base():
    from ray_lips.cluster.tune_trial import _grid_point

    grid = [{"algorithm": "fedavg", "seed": 0}, {"algorithm": "scaffold", "seed": 2}]
    assert _grid_point("2c0c9_00001", grid) == "algorithm=scaffold seed=2"
    assert _grid_point("2c0c9_00007", grid) == "(not started)"
    assert _grid_point("2c0c9_00001", None) == "(not started)"

