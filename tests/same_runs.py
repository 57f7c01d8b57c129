"""How tests say two runs computed the same numbers: their round tables and final models, bit
for bit; and the engine's promise that pool counts and resumes change none of them.

Runs compared this way train with the same kernels in the same order (pools of one thread, or
the same process), and the driver sums clients on FedAvg's exact fixed-point grid, so rounding
has nothing to change, on any CPU. A float tolerance cannot help here: a last-bit difference in
training grows with every round, and no bound measured on one CPU holds on another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch

from ray_lips.config import validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.core.run_folder import CLIENTS_FILE, LAYERS_FILE, ROUNDS_FILE

TABLES = (ROUNDS_FILE, LAYERS_FILE, CLIENTS_FILE)
TIMING = ("seconds",)  # wall-clock time: never the same twice


def read_tables(run_dir: Path, drop: Iterable[str] = (), tables: Iterable[str] = TABLES
                ) -> dict[str, pd.DataFrame]:
    """The run's tables that exist, without the wall-clock ``seconds`` and ``drop``'s columns."""
    unwanted = [*TIMING, *drop]
    return {name: pd.read_parquet(run_dir / name).drop(columns=unwanted, errors="ignore")
            for name in tables if (run_dir / name).exists()}


def assert_same_tables(a: Path, b: Path, drop: Iterable[str] = (),
                       tables: Iterable[str] = TABLES) -> None:
    """Both runs wrote every one of ``tables``, with the same values bit for bit but for
    ``seconds`` and ``drop``'s columns."""
    drop, tables = tuple(drop), tuple(tables)
    left, right = read_tables(a, drop, tables), read_tables(b, drop, tables)
    assert set(left) == set(right) == set(tables), (a, sorted(left), b, sorted(right))
    for name, frame in left.items():
        pd.testing.assert_frame_equal(frame, right[name], check_exact=True, obj=name)


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The state a run ended with (``model_final.pt``)."""
    return torch.load(run_dir / "model_final.pt", weights_only=True)


def assert_same_final_models(a: Path, b: Path) -> None:
    left, right = final_model(a), final_model(b)
    assert left.keys() == right.keys()
    for name, value in left.items():
        assert torch.equal(value, right[name]), name


def assert_pool_count_and_resume_invariant(
        tree: dict, folder: Path, stop_after: int = 3,
        at_stop: Callable[[FederatedRun], None] | None = None) -> Path:
    """The run of config ``tree`` ends with the same tables and final model with one pool and
    with three, and again when it is stopped after ``stop_after`` rounds and resumed from its
    last checkpoint. ``at_stop`` looks at the stopped run before it
    closes. Returns the three-pool run's folder."""
    one, three, resumed = folder / "one", folder / "three", folder / "resumed"
    run_local(validate_config(with_pools(tree, 1)), one)
    cfg = validate_config(with_pools(tree, 3))
    run_local(cfg, three)
    assert_same_tables(one, three)
    assert_same_final_models(one, three)
    stopped = FederatedRun(cfg, resumed)
    for _ in range(stop_after):
        stopped.run_round()
    if at_stop is not None:
        at_stop(stopped)
    stopped.close()
    run_local(cfg, resumed)
    assert_same_tables(three, resumed)
    assert_same_final_models(three, resumed)
    return three


def with_pools(tree: dict, pools: int) -> dict:
    """``tree`` with ``resources.pools`` set (a copy)."""
    return {**tree, "resources": {**tree["resources"], "pools": pools}}
