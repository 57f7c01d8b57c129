"""What a run's method is, what it is called, and what it is compared with.

A *method* is an algorithm, the knobs of that algorithm's own config section, and a hand-out:

- the algorithm: a built-in one (:data:`ALGORITHMS`, from ``ray_lips.algorithms.registry``) or
  one of the user's, named by import path and known here by its section's name; its knobs are
  the keys of the section named after it (``fedprox.mu``, ``ditto.lam``, ...);
- the hand-out: ``dense``, ``lips`` with the knobs of the ``lips`` section, or ``freeze``
  with the knobs of the ``freeze`` section and the ``lips`` knobs its trigger reads
  (``fedavg+freeze``; its dense twin, the baseline of its gains, is ``fedavg``).

Legacy configs are read as they were meant: ``algorithm: lips`` is FedAvg with the LIPS
hand-out, and a config without a ``handout`` key hands out dense models.

The *label* names the algorithm, then in parentheses the knobs of its own section that differ
between the runs of that algorithm being compared, then, for the LIPS hand-out, ``+lips s=.. T=..``
and any other LIPS knob that differs between the LIPS runs::

    fedavg    fedavg+lips s=0.5 T=5    fedprox(mu=0.01)+lips s=0.7 T=5 scorer=magnitude

So every knob that tells two methods apart is in the label, and a label is the same in every
table and figure. Which knobs differ is a property of a *set* of runs: compute it once with
:func:`varying_knobs` over all configs, then label each one with :func:`method_of`.

A *baseline* is what gains and paired comparisons are taken against, in the same setting and
with the same seed:

- ``own`` (the default): the same algorithm with the same knobs and the dense hand-out, so a
  gain is what the LIPS hand-out adds (``fedprox(mu=0.01)+lips ..`` against ``fedprox(mu=0.01)``);
  dense methods are baselines themselves;
- ``fedavg``: plain FedAvg with the dense hand-out, for every other method.

A method's *family* (what its clients predict with) and *local work* (a participant's local
training per round, in local epochs) are what its algorithm class declares
(:attr:`~ray_lips.algorithms.base.Algorithm.family`,
:meth:`~ray_lips.algorithms.base.Algorithm.local_work`) for the run's config; a run records
both in its ``status.json``, so a report still shows them where the class (a user's algorithm)
cannot be imported.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ray_lips.algorithms import registry
from ray_lips.algorithms.base import FAMILIES, Algorithm, AlgorithmOptions, LocalSettings
from ray_lips.config import ConfigError, ExperimentConfig, TrainConfig, is_import_path
from ray_lips.config.schema import LipsConfig

# the built-in algorithms, in the order tables list them: by family, then their own order
ALGORITHMS = tuple(sorted(registry.names(),
                          key=lambda name: FAMILIES.index(registry.builtin()[name].family)))
ALGORITHM_TITLES = {name: cls.label for name, cls in registry.builtin().items()}  # "FedProx"
UNKNOWN = "-"  # the family or local work of an algorithm that cannot be imported here
# a run's family and local work as it recorded them in status.json (runs frame columns)
RECORDED_FAMILY = "recorded_family"
RECORDED_LOCAL_WORK = "recorded_local_work"
LEGACY_LIPS = "lips"  # the old ``algorithm: lips``: FedAvg with the LIPS hand-out
LIPS_SECTION = "lips"
LIPS_ALWAYS = {"lips.sparsity": "s", "lips.period": "T"}  # named in every LIPS label
FREEZE_SECTION = "freeze"
# the ``lips`` knobs the freeze hand-out's trigger reads: they tell freeze runs apart as well
FREEZE_LIPS_KNOBS = ("lips.period", "lips.window", "lips.trigger", "lips.min_gap")
# LIPS knobs newer than some recorded runs: a LIPS run whose config lacks one ran its default
# (so ``mask=shared`` runs are told apart from older per-client ones)
LIPS_LATER_KEYS = {f"lips.{key}": LipsConfig.model_fields[key].default
                   for key in ("gradient", "mask")}
BASELINES = ("own", "fedavg")
BASELINE_TEXT = {
    "own": "the same algorithm with the same knobs and the dense hand-out "
           "(e.g. fedprox(mu=0.01)+lips against fedprox(mu=0.01))",
    "fedavg": "plain FedAvg with the dense hand-out",
}


def missing(value: Any) -> bool:
    """None, NA or a float NaN: a key this run's config did not have."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def fmt_value(value: Any) -> str:
    """A config value as a label: floats compactly (0.05, 1e+06), missing as '?'."""
    if missing(value):
        return "?"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def knob_text(value: Any) -> str:
    """A knob's value in a method label: as :func:`fmt_value`, lists as ``[a,b]``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(knob_text(v) for v in value) + "]"
    return fmt_value(value)


def short(key: str) -> str:
    """``fedprox.mu`` -> ``mu``."""
    return key.rsplit(".", 1)[-1]


def normalise(config: Mapping[str, Any]) -> tuple[str, str]:
    """(algorithm, hand-out) of a flattened config, legacy ``algorithm: lips`` included; an
    algorithm of the user's by its name."""
    raw = config.get("algorithm")
    algorithm = "?" if missing(raw) else str(raw)
    if algorithm == LEGACY_LIPS:
        return "fedavg", "lips"
    if is_import_path(algorithm):
        algorithm = own_algorithm_name(algorithm, config)
    handout = config.get("handout")
    return algorithm, "dense" if missing(handout) else str(handout)


def own_algorithm_name(path: str, config: Mapping[str, Any]) -> str:
    """The name of the user's algorithm ``path`` in a flattened config: its section's (the
    one section the schema does not know), else its class's name in lower case (as
    ``ExperimentConfig.algorithm_name``)."""
    sections = {key.split(".", 1)[0] for key, value in config.items()
                if isinstance(key, str) and "." in key and not missing(value)}
    own = sections - set(ExperimentConfig.model_fields)
    return own.pop() if len(own) == 1 else path.rpartition(":")[2].rpartition(".")[2].lower()


def _own_section(algorithm: str, key: str) -> bool:
    return key.startswith(f"{algorithm}.")


def _handout_section(handout: str, key: str) -> bool:
    """Whether ``key`` is a knob of ``handout`` (a freeze run's include the ``lips`` knobs
    of its trigger, :data:`FREEZE_LIPS_KNOBS`)."""
    if handout == FREEZE_SECTION and key in FREEZE_LIPS_KNOBS:
        return True
    return handout != "dense" and key.startswith(f"{handout}.")


def varying_knobs(configs: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The knob keys that labels must name to tell apart the methods of these configs.

    An algorithm's knob counts when it differs between the configs of that algorithm; a
    hand-out knob (other than sparsity and period, always named) when it differs between the
    configs with that hand-out. Knobs of sections a run does not use are ignored.
    """
    seen: dict[str, set[str]] = defaultdict(set)
    for config in configs:
        algorithm, handout = normalise(config)
        config = _with_later_defaults(config, handout)
        for key, value in config.items():
            if (not isinstance(key, str) or missing(value)
                    or (key in LIPS_ALWAYS and handout == LIPS_SECTION)):
                continue
            if _own_section(algorithm, key) or _handout_section(handout, key):
                seen[key].add(knob_text(value))
    return frozenset(key for key, values in seen.items() if len(values) > 1)


def _with_later_defaults(config: Mapping[str, Any], handout: str) -> Mapping[str, Any]:
    """A LIPS run's flattened config with the defaults of :data:`LIPS_LATER_KEYS` it lacks."""
    if handout != LIPS_SECTION:
        return config
    absent = {key: value for key, value in LIPS_LATER_KEYS.items() if missing(config.get(key))}
    return {**config, **absent} if absent else config


@dataclass(frozen=True)
class Method:
    """One run's method: normalised algorithm and hand-out, its label and its dense twin's."""

    algorithm: str
    handout: str
    label: str  # e.g. "fedprox(mu=0.01)+lips s=0.7 T=5"
    base: str  # the same algorithm and knobs with the dense hand-out, e.g. "fedprox(mu=0.01)"

    def baseline(self, kind: str = "own") -> str | None:
        """The label of the method this one is compared with, None when it is a baseline."""
        partner = self.base if check_baseline(kind) == "own" else "fedavg"
        return None if partner == self.label else partner


def check_baseline(kind: str) -> str:
    if kind not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {kind!r}")
    return kind


def method_of(config: Mapping[str, Any], shown: Iterable[str] = ()) -> Method:
    """The method of one flattened config; ``shown`` are the knobs to name (see
    :func:`varying_knobs`)."""
    algorithm, handout = normalise(config)
    config = _with_later_defaults(config, handout)
    shown = sorted(shown)
    own = [k for k in shown if _own_section(algorithm, k)]
    base = algorithm
    if own:
        base += "(" + ", ".join(f"{short(k)}={knob_text(config.get(k))}" for k in own) + ")"
    if handout == "dense":
        return Method(algorithm, handout, base, base)
    parts = []
    if handout == LIPS_SECTION:
        parts = [f"{name}={knob_text(config.get(key))}" for key, name in LIPS_ALWAYS.items()]
    parts += [f"{short(k)}={knob_text(config.get(k))}" for k in shown
              if _handout_section(handout, k)
              and not (handout == LIPS_SECTION and k in LIPS_ALWAYS)]
    label = f"{base}+{handout}" + (" " + " ".join(parts) if parts else "")
    return Method(algorithm, handout, label, base)


def label_methods(configs: list[Mapping[str, Any]]) -> list[Method]:
    """Label a set of configs together (e.g. the runs of one ``ray-lips compare``)."""
    shown = varying_knobs(configs)
    return [method_of(config, shown) for config in configs]


def baseline_labels(frame: pd.DataFrame, kind: str = "own") -> pd.Series:
    """Per row of a frame with ``method`` and ``base_method``: its baseline's label, NaN for a
    row that is a baseline itself."""
    if check_baseline(kind) == "own":
        partner = frame["base_method"].astype(object)
    else:
        partner = pd.Series("fedavg", index=frame.index, dtype=object)
    return partner.where(partner != frame["method"])


_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)")


def label_sort_key(label: str) -> tuple:
    """Order labels as the tables do: algorithms in :data:`ALGORITHMS` order, each one's dense
    method before its hand-out variants, numbers in knobs by value (T=5 before T=10)."""
    head = re.split(r"[(+ ]", str(label), maxsplit=1)[0]
    rank = ALGORITHMS.index(head) if head in ALGORITHMS else len(ALGORITHMS)
    base, plus, rest = str(label).partition("+")
    return (rank, _natural(head), _natural(base), bool(plus), _natural(rest))


def _natural(text: str) -> tuple:
    parts = []
    for i, piece in enumerate(_NUMBER.split(text)):
        parts.append((0, float(piece), "") if i % 2 else (1, 0.0, piece))
    return tuple(parts)


def algorithm_class_of(config: Mapping[str, Any]) -> type[Algorithm] | None:
    """The algorithm class of a flattened config (a user's imported by its path), None when
    it cannot be imported here."""
    raw = config.get("algorithm")
    if missing(raw):
        return None
    algorithm = "fedavg" if raw == LEGACY_LIPS else str(raw)
    try:
        return registry.algorithm_class(algorithm)
    except (ConfigError, ImportError):
        return None


def family_of(config: Mapping[str, Any]) -> str:
    """What the clients of a flattened config's algorithm predict with (:data:`FAMILIES`): as
    its algorithm class says, or as the run recorded it where that class cannot be imported."""
    cls = algorithm_class_of(config)
    if cls is not None:
        return cls.family
    recorded = config.get(RECORDED_FAMILY)
    return recorded if recorded in FAMILIES else UNKNOWN


def family_rank(family: object) -> int:
    """A family's place in tables: :data:`FAMILIES` order, an unknown one last."""
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)


def local_work_of(config: Mapping[str, Any]) -> str:
    """A participant's local training per round under a flattened config, in local epochs
    (e.g. ``2 (1 global + 1 personal)``): its algorithm's ``local_work`` for its section and
    ``train`` keys, or as the run recorded it where that class cannot be imported here."""
    cls = algorithm_class_of(config)
    if cls is None:
        recorded = config.get(RECORDED_LOCAL_WORK)
        return recorded if isinstance(recorded, str) else UNKNOWN
    prefix = f"{cls.name}."
    section = {key.removeprefix(prefix): value for key, value in config.items()
               if isinstance(key, str) and key.startswith(prefix) and not missing(value)}
    return str(cls.local_work(_options(cls, section), _local_settings(config)))


def _options(cls: type[Algorithm], section: dict[str, Any]) -> AlgorithmOptions:
    """``cls``'s options from a recorded section; the keys an older schema wrote in a form the
    class no longer accepts (``fedper.personal_layers: [fc]``) are left at their defaults."""
    try:
        return registry.options_of(cls, section)
    except ConfigError:
        valid = {}
        for key, value in section.items():
            try:
                registry.options_of(cls, {key: value})
            except ConfigError:
                continue
            valid[key] = value
        return registry.options_of(cls, valid)


def _local_settings(config: Mapping[str, Any]) -> LocalSettings:
    """The local-training settings of a flattened config (the schema's defaults where a key is
    missing)."""
    fields = TrainConfig.model_fields

    def value(key: str) -> Any:
        found = config.get(f"train.{key}")
        return fields[key].default if missing(found) else found

    return LocalSettings(epochs=int(value("local_epochs")), batch_size=int(value("batch_size")),
                         lr=float(value("lr")), momentum=float(value("momentum")),
                         weight_decay=float(value("weight_decay")))
