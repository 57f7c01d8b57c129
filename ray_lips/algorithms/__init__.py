"""Federated algorithms and hand-outs, one module each; ``build`` picks them from a config.

| ``algorithm`` | module | global model | LIPS hand-out |
|---|---|---|---|
| ``fedavg``   | fedavg.py   | yes | yes |
| ``fedprox``  | fedprox.py  | yes | yes |
| ``scaffold`` | scaffold.py | yes | yes |
| ``fedper``   | fedper.py   | no (personal heads) | no |
| ``ditto``    | ditto.py    | yes (+ personal models) | no |
| ``local``    | local.py    | no | no |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_lips.algorithms.base import Algorithm
from ray_lips.algorithms.ditto import Ditto
from ray_lips.algorithms.fedavg import FedAvg
from ray_lips.algorithms.fedper import FedPer
from ray_lips.algorithms.fedprox import FedProx
from ray_lips.algorithms.handouts.dense import DenseHandout
from ray_lips.algorithms.handouts.lips import LEGACY_CLIENT_SLOTS, LipsHandout
from ray_lips.algorithms.local import LocalOnly
from ray_lips.algorithms.scaffold import Scaffold

if TYPE_CHECKING:
    from torch import nn

    from ray_lips.config import ExperimentConfig

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedProx, Scaffold, FedPer, Ditto, LocalOnly)}
HANDOUTS = ("dense", "lips")


def build_algorithm(cfg: ExperimentConfig, model: nn.Module) -> Algorithm:
    return ALGORITHMS[cfg.algorithm](cfg, model)


def build_handout(cfg: ExperimentConfig, eligible: list[str]) -> DenseHandout:
    return LipsHandout(cfg, eligible) if cfg.handout == "lips" else DenseHandout()


def client_slots(cfg: ExperimentConfig) -> frozenset[str]:
    """The client-state slots a run of ``cfg`` keeps (its algorithm's and its hand-out's), with
    the older names of those slots a checkpoint may still use: all a checkpoint part of the run
    may hold."""
    handout = LipsHandout if cfg.handout == "lips" else DenseHandout
    declared = {*ALGORITHMS[cfg.algorithm].client_slots, *handout.client_slots}
    return frozenset(declared | {old for old, new in LEGACY_CLIENT_SLOTS.items()
                                 if new in declared})


__all__ = ["ALGORITHMS", "HANDOUTS", "LEGACY_CLIENT_SLOTS", "Algorithm", "build_algorithm",
           "build_handout", "client_slots"]
