"""Federated algorithms, one module each, and the hand-outs (``handouts/``); the builders the
driver and the pools use.

Every module of this package that defines an :class:`~ray_lips.algorithms.base.Algorithm` with
a ``name`` is a built-in algorithm (:mod:`ray_lips.algorithms.registry` finds them); a config
may also name one of the user's by import path. Importing this package loads no torch: the
hand-outs are imported when built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_lips.algorithms import registry
from ray_lips.algorithms.base import Algorithm
from ray_lips.training.spec import LocalSettings

if TYPE_CHECKING:
    from torch import nn

    from ray_lips.algorithms.handouts.dense import DenseHandout
    from ray_lips.config import ExperimentConfig


def algorithm_class(cfg: ExperimentConfig) -> type[Algorithm]:
    return registry.algorithm_class(cfg.algorithm)


def build_algorithm(cfg: ExperimentConfig, model: nn.Module) -> Algorithm:
    """``cfg``'s algorithm, given its own options and the run's local-training settings."""
    cls = algorithm_class(cfg)
    options = registry.options_of(cls, cfg.algorithm_section)
    return cls(options, LocalSettings.of(cfg.train), model)


def build_handout(cfg: ExperimentConfig, eligible: list[str]) -> DenseHandout:
    from ray_lips.algorithms.handouts.dense import DenseHandout
    from ray_lips.algorithms.handouts.freeze import FreezeHandout
    from ray_lips.algorithms.handouts.lips import LipsHandout

    if cfg.handout == "freeze":
        return FreezeHandout()
    return LipsHandout(cfg, eligible) if cfg.handout == "lips" else DenseHandout()


def client_slots(cfg: ExperimentConfig) -> frozenset[str]:
    """The client-state slots a run of ``cfg`` keeps (its algorithm's and its hand-out's), with
    the older names of those slots a checkpoint may still use: all a checkpoint part of the run
    may hold."""
    from ray_lips.algorithms.handouts.dense import DenseHandout
    from ray_lips.algorithms.handouts.lips import LEGACY_CLIENT_SLOTS, LipsHandout

    handout = LipsHandout if cfg.handout == "lips" else DenseHandout
    declared = {*algorithm_class(cfg).client_slots, *handout.client_slots}
    return frozenset(declared | {old for old, new in LEGACY_CLIENT_SLOTS.items()
                                 if new in declared})


__all__ = ["Algorithm", "algorithm_class", "build_algorithm", "build_handout", "client_slots",
           "registry"]
