"""Import paths named in a config (``package.module:function``), resolved with importlib only.

A module is found the way Python finds it: an installed package, or a folder on ``PYTHONPATH``.
``ray-lips`` runs Ray's workers from an empty folder with the caller's ``PYTHONPATH`` (see
``ray_lips.cluster.connect``), so that is also what every worker sees, and the module must be
there on
every node. Nothing is evaluated or unpickled.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from collections.abc import Callable
from typing import Any

from ray_lips.config import ConfigError


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def import_object(path: str, key: str) -> Callable[..., Any]:
    """The callable ``path`` names; ``ConfigError`` naming ``key`` if it cannot be had."""
    module_name, _, attribute = path.partition(":")
    importlib.invalidate_caches()  # see modules written since the last import
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name + ".").startswith(err.name + "."):
            raise ConfigError(
                f"{key}: cannot import {module_name!r} for {path!r}: no module {err.name!r} "
                "on the Python path (install it, or add the folder that holds it to "
                "PYTHONPATH, e.g. PYTHONPATH=. in that folder)") from None
        raise ConfigError(f"{key}: importing {module_name!r} failed: {_one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - any error of the user's module, in one line
        raise ConfigError(f"{key}: importing {module_name!r} failed: {_one_line(err)}") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: {path!r}: {module_name!r} has no attribute "
                              f"{attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {path!r} is a {type(obj).__name__}, not a function")
    return obj


def found_without_working_directory(path: str) -> bool:
    """Whether the top-level package of ``path`` is found on ``sys.path`` without the current
    directory (``python -m`` and ``python script.py`` put it there; Ray's workers, started in
    an empty folder, do not): a check to make before Ray starts."""
    top = path.partition(":")[0].split(".")[0]
    if top in sys.builtin_module_names:
        return True
    cwd = os.getcwd()
    search = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != cwd]
    search += [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
               if p]  # made absolute for the workers by ray_lips.cluster.connect.connect
    return importlib.machinery.PathFinder.find_spec(top, search) is not None
