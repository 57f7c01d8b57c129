"""``python -m ray_lips.cli``: the ``ray-lips`` command."""

from ray_lips.cli import main

main()
