"""Every algorithm a config may name: the built-in ones, found as the modules of this package,
and a user's own, named by import path (``algorithm: mypkg.algos:MyAlgorithm``).

The config schema, the command line, the analysis and the README's table are built from (or
checked against) what each class declares (:class:`~ray_lips.algorithms.base.Algorithm`).
Nothing here imports torch: a config is checked before torch loads.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from typing import Any

from ray_lips.algorithms.base import Algorithm, AlgorithmOptions

_NOT_ALGORITHMS = frozenset({"base", "registry"})  # modules of this package that hold none


@functools.cache
def builtin() -> dict[str, type[Algorithm]]:
    """The built-in algorithms by name, in their ``order``: every :class:`Algorithm` with a
    ``name`` defined in a module of this package."""
    package = importlib.import_module(__package__)
    found: dict[str, type[Algorithm]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg or info.name in _NOT_ALGORITHMS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for cls in vars(module).values():
            if (inspect.isclass(cls) and issubclass(cls, Algorithm)
                    and cls.__module__ == module.__name__ and "name" in vars(cls)):
                if cls.name in found:
                    raise RuntimeError(f"two algorithms are named {cls.name!r}: "
                                       f"{found[cls.name].__module__} and {module.__name__}")
                found[cls.name] = cls
    return dict(sorted(found.items(), key=lambda item: (item[1].order, item[0])))


def names() -> tuple[str, ...]:
    """The built-in algorithms' names, in order."""
    return tuple(builtin())


def sections() -> dict[str, type[AlgorithmOptions]]:
    """The config sections of the built-in algorithms that have options, by name."""
    return {name: cls.Options for name, cls in builtin().items() if cls.Options.model_fields}


def composable_with_lips() -> tuple[str, ...]:
    """The built-in algorithms LIPS's sparse hand-out may compose with."""
    return tuple(name for name, cls in builtin().items() if cls.sparse_handout)


def algorithm_class(algorithm: str) -> type[Algorithm]:
    """The class a config's ``algorithm`` names: a built-in name, or an import path (imported
    here; a :class:`~ray_lips.config.ConfigError` naming the key when it cannot be used)."""
    known = builtin()
    if algorithm in known:
        return known[algorithm]
    from ray_lips.config import ConfigError
    from ray_lips.data.userimport import import_object

    cls = import_object(algorithm, "algorithm")
    if not (inspect.isclass(cls) and issubclass(cls, Algorithm)):
        raise ConfigError(f"algorithm: {algorithm!r} is not a class derived from "
                          "ray_lips.algorithms.base.Algorithm")
    name = vars(cls).get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"algorithm: {algorithm!r} has no name of its own (set the class "
                          "attribute name = 'mine': it names its config section)")
    if not (inspect.isclass(cls.Options) and issubclass(cls.Options, AlgorithmOptions)):
        raise ConfigError(f"algorithm: {algorithm!r}: its Options must derive from "
                          "ray_lips.algorithms.base.AlgorithmOptions")
    overrides = cls.personalise is not Algorithm.personalise
    if overrides and cls.personalised_slot not in cls.client_slots:
        raise ConfigError(f"algorithm: {algorithm!r} overrides personalise but its "
                          f"personalised_slot {cls.personalised_slot!r} is not one of its "
                          "client_slots (the slot each client keeps what it is sent in)")
    return cls


def options_of(cls: type[Algorithm], section: Any) -> AlgorithmOptions:
    """``cls``'s options from its config section (a mapping, or options already validated);
    a :class:`~ray_lips.config.ConfigError` naming the section's keys otherwise."""
    if isinstance(section, cls.Options):
        return section
    if isinstance(section, AlgorithmOptions):
        section = section.model_dump()
    from pydantic import ValidationError

    from ray_lips.config import ConfigError
    from ray_lips.config.schema import error_lines

    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{cls.name}: expected a section of keys, got {section!r}")
    try:
        return cls.Options.model_validate(section or {})
    except ValidationError as err:
        raise ConfigError("; ".join(error_lines(err, prefix=f"{cls.name}."))) from None
