"""Sweep specs: a run config plus a ``sweep:`` section, expanded into concrete trials up front.

A spec is a file ``ray-lips run`` can read (the ``sweep`` section is ignored there). The
``sweep`` section describes the search space over dotted config keys:

- ``grid``: key -> list of values, the Cartesian product;
- ``variants``: a list of override dicts (one axis), or a mapping of named axes, each a list of
  override dicts; the product of the axes is taken. A variant may carry its own ``grid``, so a
  LIPS-only axis (``lips.sparsity``) is not crossed with the FedAvg baseline;
- ``choice`` / ``uniform`` / ``loguniform``: random-search dimensions, drawn ``num_samples``
  times for every grid point;
- ``scheduler``, ``max_concurrent_trials``, ``max_failures``, ``time_budget_s``,
  ``storage_path``, ``name``, ``check_resources``: how Tune runs it. A relative
  ``storage_path`` is taken from the current folder, or inside a ``ray job submit`` job from the
  home folder (``ray_lips.cluster.jobpaths``).

Everything is pure Python and checked here, before Ray starts: every grid point becomes a
complete config that passes ``validate_config``. Ray Tune receives the list of grid points as one
``tune.grid_search``.
"""

from __future__ import annotations

import copy
import itertools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ray_lips.cluster.jobpaths import durable_path
from ray_lips.cluster.resources import ClusterError, RunNeed
from ray_lips.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    flatten_keys,
    read_yaml,
    set_keys,
    validate_config,
)

SWEEP_KEYS = (
    "name", "grid", "variants", "choice", "uniform", "loguniform", "num_samples", "scheduler",
    "max_concurrent_trials", "max_failures", "time_budget_s", "storage_path", "check_resources",
)
SCHEDULER_KEYS = ("type", "metric", "mode", "grace_period", "max_t", "reduction_factor")
DEFAULT_STORAGE = "~/ray_results"
# Metrics every report carries (see ray_lips.cluster.tune_trial.round_metrics); a scheduler
# needs one.
METRICS = (
    "acc_global_window", "acc_after_window", "acc_before_window", "acc_test_window",
    "acc_global", "acc_after", "acc_before", "acc_test", "train_loss",
)
# The time axis of the scheduler: rounds completed, whatever eval_every is.
TIME_ATTR = "rounds_done"

Overrides = dict[str, Any]


class SpecError(ConfigError):
    """A sweep spec is invalid; the message names the key."""


@dataclass(frozen=True)
class Dimension:
    """One random-search dimension: ``choice`` values, or ``uniform``/``loguniform`` bounds."""

    key: str
    kind: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SchedulerSpec:
    metric: str
    mode: str
    grace_period: int
    max_t: int
    reduction_factor: float | None = None
    type: str = "asha"


@dataclass
class SweepSpec:
    """A validated sweep: the base run config and every grid point's overrides."""

    name: str
    base: dict[str, Any]
    trials: list[Overrides]
    random: list[Dimension] = field(default_factory=list)
    num_samples: int = 1
    scheduler: SchedulerSpec | None = None
    max_concurrent_trials: int | None = None
    max_failures: int = 2
    time_budget_s: float | None = None
    storage_path: Path = Path(DEFAULT_STORAGE).expanduser()
    storage_is_relative: bool = False
    check_resources: bool = True
    section: dict[str, Any] = field(default_factory=dict)
    # every grid point's config, validated once by ``parse_spec`` (see ``trial_configs``)
    validated: list[ExperimentConfig] = field(default_factory=list, repr=False)

    @property
    def experiment_dir(self) -> Path:
        return self.storage_path / self.name

    @property
    def total_trials(self) -> int:
        return len(self.trials) * self.num_samples

    def trial_configs(self) -> list[ExperimentConfig]:
        """Every grid point's config (random dimensions at their first value or lower bound),
        as ``parse_spec`` validated them."""
        if len(self.validated) != len(self.trials):
            self.validated = [_validate_trial(self.base, o, self.random) for o in self.trials]
        return self.validated


# ----- small helpers --------------------------------------------------------------------------
def trial_config(base: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    """The base config tree with dotted overrides applied (a new tree)."""
    tree = copy.deepcopy(base)
    set_keys(tree, overrides)
    return tree


def _field(key: str) -> Any:
    """The pydantic field a dotted key names; KeyError says what is wrong with the key."""
    model: type[BaseModel] = ExperimentConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        section = ".".join(parts[:i]) or "the config"
        info = model.model_fields.get(part)
        if info is None:
            raise KeyError(f"unknown config key: {section} has no {part!r}")
        annotation = info.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i == len(parts) - 1:
            if is_section:
                keys = ", ".join(f"{key}.{k}" for k in annotation.model_fields)
                raise KeyError(f"{key} is a section; name one of its keys ({keys})")
            return info
        if not is_section:
            raise KeyError(f"unknown config key: {'.'.join(parts[: i + 1])} is a value, "
                           "not a section")
        model = annotation
    raise KeyError(f"unknown config key {key!r}")


def _check_key(key: str, where: str) -> None:
    try:
        _field(key)
    except KeyError as err:
        raise SpecError(f"{where}: {err.args[0]}") from None


def _is_float_field(key: str) -> bool:
    annotation = _field(key).annotation
    return annotation is float or float in typing.get_args(annotation)


def _field_errors(base: dict[str, Any], key: str, value: Any) -> str | None:
    """Schema errors of ``key: value`` on top of ``base``, ignoring cross-key checks."""
    try:
        ExperimentConfig.model_validate(trial_config(base, {key: value}))
    except ValidationError as err:
        parts = tuple(key.split("."))
        mine = [e for e in err.errors() if tuple(str(p) for p in e["loc"])[: len(parts)] == parts]
        if mine:
            return "; ".join(e["msg"].removeprefix("Value error, ") for e in mine)
    return None


def _check_value(base: dict[str, Any], key: str, value: Any, where: str) -> None:
    problem = _field_errors(base, key, value)
    if problem:
        raise SpecError(f"{where}: value {value!r} is invalid for {key}: {problem}")


def _label_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "x".join(_label_value(v) for v in value)
    return str(value)


def trial_label(overrides: Overrides, limit: int = 80) -> str:
    """A short, file-name-safe label: ``lips_sparsity=0.5_period=5_s0``."""
    parts = []
    for key, value in overrides.items():
        if key == "algorithm":
            parts.append(str(value))
        elif key == "handout":
            if value != "dense":
                parts.append(str(value))
        elif key == "seed":
            parts.append(f"s{value}")
        elif key in ("data.dataset", "model"):
            parts.append(str(value))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={_label_value(value)}")
    label = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)) or "base"
    return label[:limit]


def describe(overrides: Overrides) -> str:
    """``algorithm=lips lips.sparsity=0.5`` for tables and messages."""
    return " ".join(f"{k}={_label_value(v)}" for k, v in overrides.items()) or "(base)"


# ----- parsing ------------------------------------------------------------------------------
def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping of config keys, got {value!r}")
    return value


def _parse_grid(base: dict[str, Any], raw: Any, where: str) -> dict[str, list[Any]]:
    grid = flatten_keys(_mapping(raw, where))
    for key, values in grid.items():
        here = f"{where}.{key}"
        _check_key(key, here)
        if not isinstance(values, list):
            raise SpecError(f"{here}: expected a list of values, got {values!r}")
        if not values:
            raise SpecError(f"{here}: empty list; give at least one value")
        for value in values:
            _check_value(base, key, value, here)
    return grid


def _product(grid: dict[str, list[Any]]) -> list[Overrides]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _parse_variant(base: dict[str, Any], raw: Any, where: str) -> list[Overrides]:
    """One variant -> its grid points (fixed overrides plus its own grid)."""
    if not isinstance(raw, dict) or not raw:
        raise SpecError(f"{where}: expected a mapping of config overrides, got {raw!r}")
    raw = dict(raw)
    grid = _parse_grid(base, raw.pop("grid", None), f"{where}.grid")
    fixed = flatten_keys(raw)
    for key, value in fixed.items():
        _check_key(key, f"{where}.{key}")
        _check_value(base, key, value, f"{where}.{key}")
        if key in grid:
            raise SpecError(f"{where}.{key}: also in {where}.grid; keep one of them")
    return [{**fixed, **point} for point in _product(grid)]


def _merge(parts: list[tuple[str, Overrides]]) -> Overrides:
    merged: Overrides = {}
    origin: dict[str, str] = {}
    for where, overrides in parts:
        for key, value in overrides.items():
            if key in merged:
                raise SpecError(f"{where}.{key}: also set by {origin[key]}; "
                                "an axis may not override another axis's key")
            merged[key], origin[key] = value, where
    return merged


def _parse_variants(base: dict[str, Any], raw: Any) -> list[list[tuple[str, Overrides]]]:
    """Variant axes -> for each axis, its (origin, overrides) points."""
    if raw is None:
        return []
    if isinstance(raw, list):
        axes = {"": raw}
    elif isinstance(raw, dict):
        axes = raw
    else:
        raise SpecError("sweep.variants: expected a list of override dicts or a mapping of "
                        "named axes, each a list of override dicts")
    out = []
    for axis, variants in axes.items():
        where = "sweep.variants" + (f".{axis}" if axis else "")
        if not isinstance(variants, list) or not variants:
            raise SpecError(f"{where}: expected a non-empty list of override dicts")
        points = []
        for i, variant in enumerate(variants):
            points += [(f"{where}[{i}]", p) for p in _parse_variant(base, variant, f"{where}[{i}]")]
        out.append(points)
    return out


def _parse_random(base: dict[str, Any], section: dict[str, Any]) -> list[Dimension]:
    dims: list[Dimension] = []
    for kind in ("choice", "uniform", "loguniform"):
        where = f"sweep.{kind}"
        for key, values in flatten_keys(_mapping(section.get(kind), where)).items():
            here = f"{where}.{key}"
            _check_key(key, here)
            if not isinstance(values, list) or not values:
                raise SpecError(f"{here}: expected a non-empty list")
            if kind == "choice":
                for value in values:
                    _check_value(base, key, value, here)
                dims.append(Dimension(key, kind, tuple(values)))
                continue
            if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
                raise SpecError(f"{here}: expected [low, high], got {values!r}")
            low, high = float(values[0]), float(values[1])
            if not low < high:
                raise SpecError(f"{here}: low {low:g} must be below high {high:g}")
            if kind == "loguniform" and low <= 0:
                raise SpecError(f"{here}: loguniform bounds must be positive, got {low:g}")
            if not _is_float_field(key):
                raise SpecError(f"{here}: {key} is not a float; use sweep.choice for it")
            for bound in (low, high):
                _check_value(base, key, bound, here)
            dims.append(Dimension(key, kind, (low, high)))
    return dims


def _int(section: dict[str, Any], key: str, default: int | None, minimum: int) -> int | None:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"sweep.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _parse_scheduler(raw: Any, max_rounds: int) -> SchedulerSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SpecError(f"sweep.scheduler: expected a mapping, got {raw!r}")
    for key in raw:
        if key not in SCHEDULER_KEYS:
            raise SpecError(f"sweep.scheduler.{key}: unknown key; expected one of "
                            f"{', '.join(SCHEDULER_KEYS)}")
    kind = raw.get("type", "asha")
    if kind != "asha":
        raise SpecError(f"sweep.scheduler.type: {kind!r} is not supported; use asha")
    metric = raw.get("metric", "acc_global_window")
    if metric not in METRICS:
        raise SpecError(f"sweep.scheduler.metric: {metric!r} is not reported; use one of "
                        f"{', '.join(METRICS)}")
    mode = raw.get("mode", "min" if metric == "train_loss" else "max")
    if mode not in ("max", "min"):
        raise SpecError(f"sweep.scheduler.mode: expected max or min, got {mode!r}")
    max_t = _int(raw, "max_t", max_rounds, 1)
    grace = _int(raw, "grace_period", max(1, max_rounds // 10), 1)
    assert max_t is not None and grace is not None
    if grace > max_t:
        raise SpecError(f"sweep.scheduler.grace_period: {grace} exceeds max_t {max_t}")
    factor = raw.get("reduction_factor")
    if factor is not None and (not isinstance(factor, int | float) or factor <= 1):
        raise SpecError(f"sweep.scheduler.reduction_factor: expected a number > 1, got {factor!r}")
    return SchedulerSpec(metric, mode, grace, max_t, factor)


def _parse_storage(raw: Any) -> tuple[Path, bool]:
    if not isinstance(raw, str) or not raw.strip():
        raise SpecError(f"sweep.storage_path: expected a directory path, got {raw!r}")
    if "://" in raw:
        raise SpecError(f"sweep.storage_path: {raw!r}: only local or shared-filesystem paths "
                        "are supported (each trial writes its run files there directly)")
    relative = not Path(raw).expanduser().is_absolute()
    return durable_path(raw).resolve(), relative  # inside a ray job: below the home folder


def _check_resources_schema(configs: list[ExperimentConfig]) -> None:
    for cfg in configs:
        gpus = cfg.resources.gpus_per_pool
        if gpus > 1 and not float(gpus).is_integer():
            raise SpecError(f"resources.gpus_per_pool: {gpus:g}: Ray accepts a fraction up to 1 "
                            "or a whole number of GPUs per pool")


def parse_spec(tree: dict[str, Any]) -> SweepSpec:
    """Validate a whole spec tree (run config + ``sweep`` section) and expand its grid."""
    tree = copy.deepcopy(tree)
    section = _mapping(tree.pop("sweep", None), "sweep")
    tree.pop("track", None)  # experiment trackers (ray_lips.tracking): not part of any trial
    for key in section:
        if key not in SWEEP_KEYS:
            raise SpecError(f"sweep.{key}: unknown key; expected one of {', '.join(SWEEP_KEYS)}")
    base = validate_config(tree).to_dict()
    root = base["data"]["root"]
    if not root.startswith("~") and not Path(root).is_absolute():
        # trials run in their own working directories: pin a relative root to this one
        base["data"]["root"] = str(Path(root).resolve())

    trials, random = _search_space(base, section)
    configs = [_validate_trial(base, overrides, random) for overrides in trials]
    _check_resources_schema(configs)
    spec = SweepSpec(name=_parse_name(section.get("name", base["name"])), base=base,
                     trials=trials, random=random, section=section, validated=configs)
    _parse_run_options(spec, section, max_rounds=max(c.train.rounds for c in configs))
    return spec


def _search_space(base: dict[str, Any],
                  section: dict[str, Any]) -> tuple[list[Overrides], list[Dimension]]:
    """Grid points (variant axes x grid) and random dimensions."""
    grid = _parse_grid(base, section.get("grid"), "sweep.grid")
    axes = _parse_variants(base, section.get("variants"))
    random = _parse_random(base, section)
    trials = [_merge([*combo, ("sweep.grid", point)])
              for combo in itertools.product(*axes) for point in _product(grid)]
    random_keys = {d.key for d in random}
    for overrides in trials:
        clash = sorted(random_keys & set(overrides))
        if clash:
            raise SpecError(f"sweep: {clash[0]} is both a random dimension and a grid/variant key")
    return trials, random


def _parse_name(name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SpecError(f"sweep.name: {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def _parse_run_options(spec: SweepSpec, section: dict[str, Any], max_rounds: int) -> None:
    """How Tune runs the sweep: samples, concurrency, retries, budget, storage, scheduler."""
    spec.num_samples = _int(section, "num_samples", 1, 1) or 1
    spec.max_concurrent_trials = _int(section, "max_concurrent_trials", None, 1)
    spec.max_failures = _int(section, "max_failures", 2, 0) or 0
    budget = section.get("time_budget_s")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                               or budget <= 0):
        raise SpecError(f"sweep.time_budget_s: expected seconds > 0, got {budget!r}")
    spec.time_budget_s = None if budget is None else float(budget)
    spec.storage_path, spec.storage_is_relative = _parse_storage(
        section.get("storage_path", DEFAULT_STORAGE))
    check = section.get("check_resources", True)
    if not isinstance(check, bool):
        raise SpecError(f"sweep.check_resources: expected true or false, got {check!r}")
    spec.check_resources = check
    spec.scheduler = _parse_scheduler(section.get("scheduler"), max_rounds)


def _validate_trial(base: dict[str, Any], overrides: Overrides,
                    random: list[Dimension]) -> ExperimentConfig:
    fixed = {d.key: d.values[0] for d in random}
    try:
        return validate_config(trial_config(base, {**overrides, **fixed}))
    except ConfigError as err:
        raise SpecError(f"sweep: the trial {describe(overrides)} is invalid: "
                        f"{str(err).removeprefix('invalid config: ')}") from None


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read a spec file, apply ``--set`` overrides (``sweep.*`` keys included), validate it."""
    return parse_spec(apply_overrides(read_yaml(path), overrides))


# ----- resources ------------------------------------------------------------------------------
def trial_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the driver's, then one per client pool."""
    res = cfg.resources
    pool: dict[str, float] = {"CPU": float(res.cpus_per_pool)}
    if res.gpus_per_pool > 0:
        pool["GPU"] = float(res.gpus_per_pool)
    driver = {"CPU": float(res.driver_cpus)} if res.driver_cpus > 0 else {}
    return [driver] + [dict(pool) for _ in range(res.pools)]


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _offer(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"


def check_cluster(spec: SweepSpec, nodes: list[dict[str, Any]]) -> None:
    """Raise ``ClusterError`` (``ray_lips.cluster.resources``'s, also importable from here)
    when some trial could never be placed on these nodes (``ray.nodes()``)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    totals: dict[str, float] = {}
    for node in alive:
        for k, v in node.items():
            totals[k] = totals.get(k, 0.0) + v
    biggest = max(alive, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    seen = set()
    for cfg in spec.trial_configs():
        res = cfg.resources
        signature = (res.pools, res.cpus_per_pool, res.gpus_per_pool, res.driver_cpus)
        if signature in seen:
            continue
        seen.add(signature)
        driver, pool = trial_bundles(cfg)[0], trial_bundles(cfg)[1]
        if res.gpus_per_pool > 0 and totals.get("GPU", 0) == 0:
            raise ClusterError(
                f"resources.gpus_per_pool: each pool asks for {res.gpus_per_pool:g} GPU but no "
                "node of the cluster has a GPU; set resources.gpus_per_pool=0 to train on CPUs")
        if not any(_fits(pool, n) for n in alive):
            key = ("resources.gpus_per_pool"
                   if any(n.get("CPU", 0) >= pool["CPU"] for n in alive)
                   else "resources.cpus_per_pool")
            raise ClusterError(
                f"{key}: a client pool needs {_offer(pool)}, but no node offers that much "
                f"(the largest offers {_offer(biggest)})")
        if driver and not any(_fits(driver, n) for n in alive):
            raise ClusterError(
                f"resources.driver_cpus: the trial driver needs {driver['CPU']:g} CPU, but no "
                f"node offers that much (the largest offers {_offer(biggest)})")
        for kind, (amount, there) in RunNeed.of(cfg).short(totals).items():
            raise ClusterError(
                f"resources.pools: one trial needs {res.pools} pools x {res.cpus_per_pool:g} "
                f"CPU / {res.gpus_per_pool:g} GPU + {res.driver_cpus:g} driver CPU = "
                f"{amount:g} {kind}, but the whole cluster has {there:g}")
