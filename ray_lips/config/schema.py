"""Experiment configuration: one validated schema, YAML in, a typed object out.

The key names here are public: sweeps, docs and analysis use them. Every check that can be made
from the values alone is made here, so a bad value stops with one message naming its key.
Validation is pure: it reads no file and imports none of the user's code (that is
:mod:`ray_lips.config.checks`, run once per command before Ray starts).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ray_lips.algorithms import registry

DATASETS = ("cifar10", "cifar100", "tinyimagenet", "digits", "mnist1d", "synthetic")
MODELS = (
    "resnet4", "resnet6", "resnet8", "resnet10", "resnet18", "vgg11_bn", "smallcnn",
    "resnet8_1d", "resnet10_1d", "vgg11_bn_1d",
)
PARTITIONS = ("dirichlet", "pathological", "iid", "uniform")
SCORERS = ("sensitivity", "magnitude", "gradient", "random")
# lips.mask shared: fp16 |g| (< 2^16) on the 2^-32 grid, summed in int64 (< 2^63)
MAX_SHARED_MASK_CLIENTS = 2**15
_NAME = r"[A-Za-z_]\w*"
IMPORT_PATH = re.compile(rf"{_NAME}(?:\.{_NAME})*:{_NAME}(?:\.{_NAME})*")


def is_import_path(text: str) -> bool:
    """Whether ``text`` has the form ``package.module:name`` (dotted names on both sides): a
    dataset, model or algorithm of the user's."""
    return bool(IMPORT_PATH.fullmatch(text))


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    shape: tuple[int, ...] = (3, 32, 32)
    classes: int = Field(10, ge=2)
    train_size: int = Field(5000, ge=1)
    test_size: int = Field(1000, ge=1)
    noise: float = Field(1.0, ge=0)

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) not in (2, 3) or any(v < 1 for v in value):
            raise ValueError("must be [channels, length] or [channels, height, width], all >= 1")
        return value


class SourceRecord(_Strict):
    """What a file or folder dataset was: written by the validator, checked on every load."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DataConfig(_Strict):
    # a built-in name (DATASETS), an import path "package.module:function", or the path of a
    # .npz file or an image folder (see ray_lips/data/byo.py); resolved and checked by
    # ray_lips.config.checks.check_config
    dataset: str = "digits"
    root: str = "~/.cache/ray-lips"
    partition: Literal["dirichlet", "pathological", "iid", "uniform"] = "dirichlet"
    alpha: float = Field(0.1, gt=0)
    clients: int = Field(20, ge=1)
    train_per_client: int = Field(50, ge=1)
    test_per_client: int = Field(20, ge=1)
    classes_per_client: int = Field(2, ge=1)
    augment: bool | Literal["auto", "reference"] = "auto"
    synthetic: SyntheticConfig = SyntheticConfig()
    image_size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None
    source: SourceRecord | None = None  # filled in by check_config for a file or folder dataset


class TrainConfig(_Strict):
    rounds: int = Field(60, ge=1)
    local_epochs: int = Field(5, ge=1)
    batch_size: int = Field(50, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    participation: float = Field(1.0, gt=0, le=1)
    eval_every: int = Field(1, ge=1)
    finetune_epochs: int = Field(5, ge=0)
    final_window: int = Field(10, ge=1)
    inertia_ref_round: int = Field(2, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    checkpoint_every: int = Field(10, ge=1)
    eval_test_samples: int = Field(2000, ge=0)
    batched: bool | Literal["auto"] = "auto"
    batch_clients: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"


class LipsConfig(_Strict):
    """The LIPS hand-out's knobs. ``schedule`` picks when hand-outs are sparse and how sparse
    (:mod:`ray_lips.algorithms.handouts.schedule`); ``step_round`` belongs to ``step``,
    ``window``, ``trigger`` and ``min_gap`` to ``inertia`` (:mod:`ray_lips.core.inertia`)."""

    sparsity: float = Field(0.5, ge=0, lt=1)
    period: int = Field(5, ge=1)
    schedule: Literal["linear", "constant", "cosine", "step", "inertia"] = "linear"
    scorer: Literal["sensitivity", "magnitude", "gradient", "random"] = "sensitivity"
    step_round: int | None = Field(None, ge=1)  # step: first dense round (null: rounds // 2)
    window: int = Field(3, ge=1)  # inertia: rounds averaged into the signal
    trigger: float = Field(0.5, ge=0)  # inertia: sparse when signal < trigger x its reference
    min_gap: int | None = Field(None, ge=1)  # inertia: rounds between sparse ones (null: period)
    # the remembered gradient g_k: the last mini-batch's (reference) or the last epoch's mean
    gradient: Literal["last_batch", "epoch_mean"] = "last_batch"
    # per_client (reference): ranked by each client's own g_k; shared: one mask for every
    # client from the participants' summed |g_k|
    mask: Literal["per_client", "shared"] = "per_client"

    @model_validator(mode="after")
    def _gradient_needs_a_gradient_scorer(self) -> LipsConfig:
        if self.gradient != "last_batch" and self.scorer not in ("sensitivity", "gradient"):
            raise ValueError(f"lips.gradient: {self.gradient!r} changes the gradient the "
                             f"scorer ranks by, but lips.scorer {self.scorer!r} reads no "
                             "gradient; use lips.scorer sensitivity or gradient, or "
                             "lips.gradient: last_batch")
        return self

    @property
    def gap(self) -> int:
        """The fewest rounds between two sparse hand-outs of the ``inertia`` schedule."""
        return self.period if self.min_gap is None else self.min_gap

    def check_rounds(self, rounds: int) -> None:
        """The checks that need ``train.rounds``: ``step_round`` must fall inside the run (a
        step at or after the last round is the ``constant`` schedule under another name)."""
        if self.schedule == "step" and self.step_round is not None and self.step_round >= rounds:
            raise ConfigError(f"lips.step_round: {self.step_round} is not before train.rounds "
                             f"({rounds}), so every sparsity round would keep d0; use "
                             "lips.schedule: constant, or a step_round < train.rounds")


class FreezeConfig(_Strict):
    """The ``freeze`` hand-out's knobs (:mod:`ray_lips.core.freeze`): when its trigger fires
    (``period``: rounds r % ``lips.period`` == 0; ``inertia``: when LIPS's inertia trigger fires,
    with ``lips.window``, ``lips.trigger``, ``lips.min_gap``) and how many rounds a stalled
    layer then stays frozen."""

    when: Literal["period", "inertia"] = "inertia"
    rounds: int = Field(5, ge=1)  # rounds a stalled layer stays frozen after the trigger fires


class ResourcesConfig(_Strict):
    pools: int = Field(2, ge=1)
    cpus_per_pool: float = Field(1, gt=0)
    gpus_per_pool: float = Field(0, ge=0)
    # Where pools train: ``auto`` is CUDA when gpus_per_pool > 0 (a run stops if torch sees no
    # CUDA device there) and the CPU otherwise; ``cpu`` always trains on the CPU, even on GPUs
    # Ray has reserved (logical GPUs, or to compare with a GPU run); ``cuda`` requires CUDA.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    driver_cpus: float = Field(0, ge=0)
    timeout_s: float = Field(3600, gt=0)  # the longest any one step may take
    # A pool whose call takes hang_factor x the slowest earlier call of the same kind (at least
    # hang_min_s) counts as hung; ray-lips run/compare then restart the run's pools from the last
    # checkpoint, at most pool_restarts times (a pool that dies is restarted the same way).
    hang_factor: float = Field(5, gt=1)
    hang_min_s: float = Field(120, gt=0)
    pool_restarts: int = Field(2, ge=0)
    client_state_mb: float = Field(4096, gt=0)  # per pool; beyond it client state spills to disk
    spill_dir: str | None = None  # where spilled client state goes (default: the system temp)


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def _either(names: tuple[str, ...]) -> str:
    """``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def freeze_conflict(algorithm: str, why: str = "") -> str:
    """Why ``handout: freeze`` cannot be combined with ``algorithm`` (one whose class says
    ``sparse_handout = False``): the rule is LIPS's."""
    reason = f"; as for LIPS: {why}" if why else ""
    return (f"handout: 'freeze' cannot be combined with algorithm: {algorithm!r} (freezing "
            "stalled layers acts on a global body every client is handed and trains, the "
            f"same rule as LIPS's hand-out, and {algorithm} says sparse_handout = False{reason}; "
            f"use {_either(registry.composable_with_lips())}, or handout: dense)")


def _own_section(tree: dict[str, Any]) -> None:
    """The keys beside the schema's of a config whose algorithm is the user's: at most one,
    its section (a mapping), named after the class; which name it must have is known only
    once the class is imported (``check_config``)."""
    extra = [key for key in tree if key not in ExperimentConfig.model_fields]
    if len(extra) > 1:
        raise ValueError(f"{', '.join(map(str, extra))}: unknown keys (an algorithm of your own "
                         "has one section, under its name)")
    for key in extra:
        if not (isinstance(key, str) and key.isidentifier()):
            raise ValueError(f"{key}: unknown key")
        if tree[key] is not None and not isinstance(tree[key], dict):
            raise ValueError(f"{key}: expected a section of keys (your algorithm's), got "
                             f"{tree[key]!r}")


class _RunKeys(_Strict):
    """The keys before the algorithms' sections, in the order a config file lists them."""

    name: str = "experiment"
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    model: str = "smallcnn"  # a name of MODELS, or an import path "package.module:builder"
    train: TrainConfig = TrainConfig()
    # a built-in algorithm's name (ray_lips.algorithms.registry), or an import path
    # "package.module:Class" to one of the user's (imported by config.checks.check_config)
    algorithm: str = "fedavg"
    handout: Literal["dense", "lips", "freeze"] = "dense"
    lips: LipsConfig = LipsConfig()
    freeze: FreezeConfig = FreezeConfig()


# One section per built-in algorithm with options, its keys and defaults its class's Options.
_AlgorithmSections = create_model(
    "_AlgorithmSections", __base__=_RunKeys,
    **{name: (options, Field(default_factory=options))
       for name, options in registry.sections().items()})


class ExperimentConfig(_AlgorithmSections):  # type: ignore[misc,valid-type]
    """A run's configuration. An algorithm of the user's (``algorithm`` an import path) has its
    section under its class's ``name``, kept here as given (``model_extra``) and validated by
    that class's Options in :func:`ray_lips.config.checks.check_config`."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    resources: ResourcesConfig = ResourcesConfig()
    output: str = "runs"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, tree: Any) -> Any:
        """``algorithm: lips`` (and a config naming neither key, as before hand-outs were
        separate) is FedAvg with the LIPS hand-out; keys of no section are refused, but the
        one section of an algorithm of the user's."""
        if not isinstance(tree, dict):
            return tree
        algorithm, handout = tree.get("algorithm"), tree.get("handout")
        if isinstance(algorithm, str) and is_import_path(algorithm):
            _own_section(tree)
        else:
            unknown = [str(key) for key in tree if key not in cls.model_fields]
            if unknown:
                raise ValueError("; ".join(f"{key}: unknown key" for key in unknown))
        if algorithm == "lips" or (algorithm is None and handout is None):
            if handout not in (None, "lips"):
                raise ValueError(f"algorithm: 'lips' is FedAvg with the LIPS hand-out, but "
                                 f"handout is {handout!r}; use algorithm: fedavg")
            return {**tree, "algorithm": "fedavg", "handout": "lips"}
        return tree

    @field_validator("algorithm")
    @classmethod
    def _algorithm_name(cls, value: str) -> str:
        """A built-in name or an import path; whether the path imports is a check
        (:func:`ray_lips.config.checks.check_config`), not part of the schema."""
        if value not in registry.builtin() and not is_import_path(value):
            raise ValueError(f"unknown algorithm {value!r}; choose one of "
                             f"{', '.join(registry.names())} (lips: fedavg with handout: "
                             "lips), or give an import path package.module:Class")
        return value

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        """A name of the zoo or an import path; whether the path imports is a check
        (:func:`ray_lips.config.checks.check_config`), not part of the schema."""
        if value not in MODELS and not is_import_path(value):
            raise ValueError(f"unknown model {value!r}; choose one of {', '.join(MODELS)}, or "
                             "give an import path package.module:builder")
        return value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not SAFE_NAME.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"{value!r} must be one safe folder name (letters, digits and "
                             "._+=-, starting with a letter or digit): it names run folders")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        builtin = registry.builtin().get(self.algorithm)
        if self.handout == "lips" and builtin is not None and not builtin.sparse_handout:
            why = (builtin.sparse_handout_conflict
                   or "LIPS sparsifies a global body each client is handed")
            raise ValueError(
                f"handout: 'lips' cannot be combined with algorithm: {self.algorithm!r} ({why}; "
                f"use {_either(registry.composable_with_lips())}, or handout: dense)")
        if self.handout == "freeze" and builtin is not None and not builtin.sparse_handout:
            raise ValueError(freeze_conflict(self.algorithm, builtin.sparse_handout_conflict))
        if self.handout == "lips":
            self.lips.check_rounds(self.train.rounds)
        if (self.handout == "lips" and self.lips.mask == "shared"
                and self.data.clients > MAX_SHARED_MASK_CLIENTS):
            raise ValueError(
                f"lips.mask: 'shared' sums the participants' fp16 |g| exactly in int64, which "
                f"holds at most {MAX_SHARED_MASK_CLIENTS} clients; data.clients is "
                f"{self.data.clients}: use lips.mask: per_client")
        if self.resources.pools > self.data.clients:
            raise ValueError(
                f"resources.pools: {self.resources.pools} pools for {self.data.clients} "
                "clients; a pool must host at least one client"
            )
        return self

    @property
    def algorithm_name(self) -> str:
        """The algorithm's name: a built-in's, or for an import path its section's key (which
        :func:`~ray_lips.config.checks.check_config` always writes; before it, the class's
        name in lower case)."""
        if self.algorithm in registry.builtin():
            return self.algorithm
        extra = list(self.model_extra or {})
        return extra[0] if extra else self.algorithm.rpartition(":")[2].rpartition(".")[2].lower()

    @property
    def algorithm_section(self) -> Any:
        """The algorithm's config section as given: validated options for a built-in, the raw
        mapping (or None) for an algorithm of the user's."""
        name = self.algorithm_name
        if name in type(self).model_fields:
            return getattr(self, name)
        return (self.model_extra or {}).get(name)

    @property
    def method(self) -> str:
        """How run folders and summaries name the run: ``fedprox``, ``fedavg+lips``."""
        name = self.algorithm_name
        return name if self.handout == "dense" else f"{name}+{self.handout}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (numbers, booleans, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_key(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating intermediate dicts."""
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted_key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def set_keys(tree: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set dotted keys in place. Setting ``algorithm`` without ``handout`` also resets the
    hand-out to what that algorithm value alone means (``lips``: the LIPS hand-out; any other
    algorithm: dense), so a sweep variant or ``--set algorithm=fedavg`` on a LIPS config is
    plain FedAvg, whatever hand-out the base names. Setting a built-in ``algorithm`` drops the
    section of an algorithm of the user's the tree had."""
    if "algorithm" in overrides and "handout" not in overrides:
        tree.pop("handout", None)
    algorithm = overrides.get("algorithm")
    if isinstance(algorithm, str) and not is_import_path(algorithm):
        for key in [k for k in tree if k not in ExperimentConfig.model_fields]:
            if not any(o == key or o.startswith(f"{key}.") for o in overrides):
                del tree[key]
    for key, value in overrides.items():
        set_key(tree, key, value)


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`set_key`: ``{"lips": {"sparsity": 0.5}}`` ->
    ``{"lips.sparsity": 0.5}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_keys(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _names_lips(tree: dict[str, Any]) -> bool:
    """Whether a config tree asks for the LIPS hand-out (explicitly, by the ``lips``
    shorthand, or by naming neither ``algorithm`` nor ``handout``)."""
    algorithm, handout = tree.get("algorithm"), tree.get("handout")
    return handout == "lips" or algorithm == "lips" or (algorithm is None and handout is None)


def apply_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...],
                    notes: list[str] | None = None) -> dict:
    """Return a copy of ``tree`` with ``key=value`` overrides applied.

    ``--set algorithm=X`` alone means X with the dense hand-out, as a sweep variant does; when
    that drops the config's LIPS hand-out, a one-line note saying so goes to ``notes``.
    ``--set handout=...`` on an ``algorithm: lips`` config replaces the shorthand's hand-out.
    """
    tree = copy.deepcopy(tree)
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parsed[key.strip()] = parse_value(raw)
    if "handout" in parsed and "algorithm" not in parsed and tree.get("algorithm") == "lips":
        tree["algorithm"] = "fedavg"  # the shorthand was FedAvg + LIPS; the hand-out is set now
    drops_lips = ("algorithm" in parsed and "handout" not in parsed
                  and parsed["algorithm"] != "lips" and _names_lips(tree))
    set_keys(tree, parsed)
    if drops_lips and notes is not None:
        algorithm = parsed["algorithm"]
        builtin = registry.builtin().get(algorithm)
        keep = (f" ({algorithm} does not compose with LIPS)"
                if builtin is not None and not builtin.sparse_handout else
                f"; add --set handout=lips to keep LIPS ({algorithm}+lips)")
        notes.append(f"--set algorithm={algorithm}: the config's LIPS hand-out is dropped, "
                     f"this run is dense {algorithm}{keep}")
    return tree


def error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    """Each of pydantic's errors as ``key: what is wrong``, keys after ``prefix``."""
    lines = []
    for e in err.errors():
        key = prefix + ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; {msg.lower()}"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{key}: {msg}" if key.strip(".") else msg)
    return lines


def _format_error(err: ValidationError) -> str:
    return "invalid config: " + "; ".join(error_lines(err))


def validate_config(tree: dict[str, Any]) -> ExperimentConfig:
    """Validate a config tree; raise ConfigError with one readable message."""
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong and where."""
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if tree is None or tree == {}:
        raise ConfigError(f"{path}: the config file is empty; write at least the keys that "
                          "differ from the defaults (see sweeps/quickstart.yaml)")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return tree


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                notes: list[str] | None = None) -> ExperimentConfig:
    """Read a run config (a sweep spec's `sweep` section is ignored) and apply overrides;
    what an override changed beyond its own key goes to ``notes``."""
    tree = read_yaml(path)
    tree.pop("sweep", None)  # a sweep spec is a run config plus a `sweep` section
    tree = apply_overrides(tree, overrides, notes)
    tree.pop("track", None)  # experiment trackers (ray_lips.tracking): not the experiment
    return validate_config(tree)
