"""Import paths from before the layout of folders (0.1), kept working for code and pickles
that name them: a user's script importing ``ray_lips.engine.experiment``, or a Ray Tune
experiment started before the move, whose saved state names ``ray_lips.tune_trial``.

Importing an old path gives the module at its new path (the same module object). The
README's "Layout" section lists the same table.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

MOVED = {
    "ray_lips.preflight": "ray_lips.config.checks",
    "ray_lips.engine.experiment": "ray_lips.core.run",
    "ray_lips.results": "ray_lips.core.run_folder",
    "ray_lips.engine.aggregate": "ray_lips.core.aggregate",
    "ray_lips.seeding": "ray_lips.core.seeding",
    "ray_lips.inertia": "ray_lips.core.inertia",
    "ray_lips.algorithms.handout": "ray_lips.algorithms.handouts.dense",
    "ray_lips.algorithms.lips": "ray_lips.algorithms.handouts.lips",
    "ray_lips.sparsify": "ray_lips.algorithms.handouts.sparsify",
    "ray_lips.schedule": "ray_lips.algorithms.handouts.schedule",
    "ray_lips.batched": "ray_lips.training.batched",
    "ray_lips.engine.trainers": "ray_lips.training.trainers",
    "ray_lips.engine.pool": "ray_lips.pools.client_pool",
    "ray_lips.engine.pools": "ray_lips.pools.in_process",
    "ray_lips.engine.ray_pools": "ray_lips.pools.ray_actors",
    "ray_lips.engine.client_state": "ray_lips.pools.client_store",
    "ray_lips.engine.messages": "ray_lips.pools.messages",
    "ray_lips.engine.payload": "ray_lips.pools.payload",
    "ray_lips.allocator": "ray_lips.pools.allocator",
    "ray_lips.memory": "ray_lips.pools.memory",
    "ray_lips.runtime": "ray_lips.cluster.connect",
    "ray_lips.launch": "ray_lips.cluster.driver",
    "ray_lips.tune_trial": "ray_lips.cluster.tune_trial",
    "ray_lips.sweep": "ray_lips.cluster.sweep_spec",
    "ray_lips.sweep_stop": "ray_lips.cluster.sweep_stop",
    "ray_lips.jobpaths": "ray_lips.cluster.jobpaths",
    "ray_lips.sweep_cli": "ray_lips.cli.sweep",
    "ray_lips.report_cli": "ray_lips.cli.report",
    "ray_lips.engine": "ray_lips.core",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The module at its new path is already executed."""


class _OldPaths(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(MOVED[fullname]))


def install() -> None:
    if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldPaths())
