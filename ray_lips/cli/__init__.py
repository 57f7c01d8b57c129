"""The ``ray-lips`` command: ``run``, ``compare`` and ``resume`` (``commands``), ``sweep``
(``sweep``) and ``report`` (``report``)."""

from ray_lips.cli.commands import main

__all__ = ["main"]
