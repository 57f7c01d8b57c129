"""Run directories -> tidy pandas frames: ``runs``, ``rounds``, ``layers``, ``clients``.

A run is any directory holding ``config.yaml`` and ``status.json`` (a single run, or one trial of
a Tune sweep); they are found recursively below the paths given. A Tune trial directory that
errored before the run wrote its files (``params.json`` but no run below it) is loaded too, as a
run without tables. Running, failed and diverged runs load like finished ones: their status and
error reason are columns, and a table they have not written yet contributes no rows.

Derived columns, on every frame:

- ``run_id``: the run's path relative to the directory it was found under (stable when a sweep
  directory moves);
- ``setting``: the experiment setting without the method (dataset, model, and any data/train key
  that differs between the loaded runs), e.g. ``digits/smallcnn``;
- ``algorithm``, ``handout``: the normalised algorithm (``fedavg``, ``fedprox``, ``scaffold``,
  ``fedper``, ``ditto``, ``local``) and hand-out (``dense`` or ``lips``); a legacy
  ``algorithm: lips`` is ``fedavg`` with the ``lips`` hand-out, a config without ``handout`` is
  ``dense``;
- ``method``: the method's label, e.g. ``fedavg``, ``fedavg+lips s=0.5 T=5`` or
  ``fedprox(mu=0.01)+lips s=0.7 T=5``; it names every knob that differs between the loaded
  methods (see :mod:`analysis.methods`);
- ``base_method``: the label of the same algorithm and knobs with the dense hand-out (the
  default baseline), e.g. ``fedprox(mu=0.01)``;
- ``sparsity``, ``period``: the LIPS knobs as applied, NaN without the LIPS hand-out (the raw
  config values stay in ``lips.sparsity`` and ``lips.period`` on the runs frame).

Metrics an algorithm does not have (``acc_global`` and ``acc_test`` of FedPer and local-only,
which have no global model) are NaN in the tables and give NaN summary columns.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis.methods import (
    ALGORITHMS,
    FREEZE_SECTION,
    LIPS_SECTION,
    RECORDED_FAMILY,
    RECORDED_LOCAL_WORK,
    fmt_value,
    method_of,
    varying_knobs,
)
from ray_lips.core.run_folder import CONFIG_FILE, STATUS_FILE, TABLE_FILES  # names as written

TUNE_PARAMS = "params.json"
TUNE_ERROR = "error.txt"
TABLES = tuple(TABLE_FILES)  # rounds, layers, clients
METRICS = ("acc_global", "acc_after", "acc_before", "acc_test")

# Config keys that never make two runs different experiments (bookkeeping, placement, seed,
# and the method: algorithm, hand-out and the knobs of their sections).
NOT_SETTING = ("name", "seed", "output", "algorithm", "handout", "data.root",
               "train.checkpoint_every")
METHOD_SECTIONS = (*ALGORITHMS, LIPS_SECTION, FREEZE_SECTION)
NOT_SETTING_PREFIXES = ("resources.", *(f"{section}." for section in METHOD_SECTIONS))
CONFIG_SECTIONS = ("data", "train", "resources", *METHOD_SECTIONS)
# Columns copied from ``runs`` onto the per-run tables so they group without a merge.
KEY_COLUMNS = ("run_id", "setting", "method", "base_method", "algorithm", "handout", "sparsity",
               "period", "seed", "data.dataset", "model", "status")

PathLike = str | os.PathLike


@dataclass
class RunFrames:
    """All four tidy frames of a set of runs."""

    runs: pd.DataFrame
    rounds: pd.DataFrame
    layers: pd.DataFrame
    clients: pd.DataFrame

    def __getitem__(self, name: str) -> pd.DataFrame:
        """``frames["runs"]`` is ``frames.runs`` (likewise rounds, layers, clients)."""
        if name not in ("runs", *TABLES):
            raise KeyError(f"{name!r}: the frames are runs, {', '.join(TABLES)}")
        return getattr(self, name)


# ----- finding runs -------------------------------------------------------------------------
def _as_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [Path(p).expanduser().resolve() for p in paths]


def _skip(name: str) -> bool:
    return name.startswith("checkpoint") or name.startswith(".") or name == "__pycache__"


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """Run directories and Tune trial directories (``params.json``) below ``root``."""
    runs, trials = [], []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _skip(d))
        path = Path(here)
        if CONFIG_FILE in files and STATUS_FILE in files:
            runs.append(path)
        elif TUNE_PARAMS in files:
            trials.append(path)
    return runs, trials


def _find(roots: list[Path]) -> list[tuple[Path, Path]]:
    """(run or orphan trial directory, the root it was found under), each directory once."""
    seen: dict[Path, Path] = {}
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"no such directory: {root}")
        runs, trials = _walk(root)
        covered = {folder for run in runs for folder in (run, *run.parents)}
        # a Tune trial with no run at or below it failed (or is pending) before writing one
        runs += [trial for trial in trials if trial not in covered]
        for path in runs:
            seen.setdefault(path, root)
    return sorted(seen.items())


def find_runs(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Every run directory at or below ``paths`` (checkpoint folders are not searched)."""
    return [path for path, _ in _find(_as_paths(paths))]


def _run_ids(found: list[tuple[Path, Path]], roots: list[Path]) -> list[str]:
    ids = []
    for path, root in found:
        rel = path.relative_to(root).as_posix()
        base = root.name if rel == "." else rel
        ids.append(f"{root.name}/{rel}" if len(roots) > 1 and rel != "." else base)
    if len(set(ids)) < len(ids):  # same relative path under two roots: fall back to full paths
        ids = [str(path) for path, _ in found]
    return ids


# ----- reading one run -----------------------------------------------------------------------
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted config keys (``{"lips": {"period": 5}}`` -> ``{"lips.period": 5}``); lists become
    tuples so the columns stay hashable."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def tune_error(path: Path, root: Path) -> str | None:
    """The reason in Tune's ``error.txt`` of this trial (the run directory or its parent)."""
    folders = [path] if path == root else [path, path.parent]  # parent: root or below it
    for folder in folders:
        file = folder / TUNE_ERROR
        if file.is_file():
            return error_reason(file.read_text(errors="replace"))
    return None


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(\([\w.]+\))?: \S")


def error_reason(text: str) -> str | None:
    """The meaningful line of a Tune error text: the exception line of its latest failure.

    Tune writes ``Failure # n (occurred at ...)`` and then the exception, often a Ray traceback
    whose first line only names the remote task (``ray::ImplicitFunc.train() (pid=...)``); what
    went wrong is on the last ``SomeError: message`` line. Without one, the first line that is
    not traceback scaffolding is used.
    """
    blocks = [b for b in re.split(r"^Failure # \d+.*$", text, flags=re.MULTILINE) if b.strip()]
    if not blocks:
        return None
    lines = [ln.rstrip() for ln in blocks[-1].splitlines() if ln.strip()]
    found = [ln for ln in lines if EXCEPTION_LINE.match(ln)]
    if found:
        return found[-1].strip()
    scaffolding = ("Traceback", "The above exception", "During handling", " ", "\t")
    plain = [ln for ln in lines if not ln.startswith(scaffolding)]
    return plain[0].strip() if plain else lines[0].strip()


def _read_json(path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        data = json.loads(path.read_text())
        return (data if isinstance(data, dict) else {}), None
    except (OSError, ValueError) as err:
        return {}, f"unreadable {path.name}: {err}"


def _read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    file = path / CONFIG_FILE
    if file.is_file():
        try:
            tree = yaml.safe_load(file.read_text()) or {}
            return flatten(tree if isinstance(tree, dict) else {}), None
        except (OSError, yaml.YAMLError) as err:
            return {}, f"unreadable {CONFIG_FILE}: {err}"
    params, problem = _read_json(path / TUNE_PARAMS)
    return flatten(params), problem


def _read_table(path: Path, name: str) -> tuple[pd.DataFrame, str | None]:
    file = path / TABLE_FILES[name]
    if not file.is_file():
        return pd.DataFrame(), None
    try:
        return pd.read_parquet(file), None
    except Exception as err:  # noqa: BLE001 - a half-written or foreign file must not stop a report
        return pd.DataFrame(), f"unreadable {file.name}: {err}"


def _evaluated(rounds: pd.DataFrame, key: str) -> pd.Series:
    if rounds.empty or key not in rounds:
        return pd.Series(dtype=float)
    rows = rounds.sort_values("round")
    if "evaluated" in rows:
        rows = rows[rows["evaluated"].astype(bool)]
    return rows.set_index("round")[key].astype(float).dropna()


def round_metrics(rounds: pd.DataFrame, window: int) -> dict[str, Any]:
    """Last, windowed and best values of each accuracy metric, from a run's rounds frame."""
    out: dict[str, Any] = {}
    for key in METRICS:
        values = _evaluated(rounds, key)
        out[f"{key}_last"] = float(values.iloc[-1]) if len(values) else math.nan
        out[f"{key}_window"] = float(values.iloc[-window:].mean()) if len(values) else math.nan
        out[f"{key}_best"] = float(values.max()) if len(values) else math.nan
        out[f"{key}_best_round"] = int(values.idxmax()) if len(values) else pd.NA
    return out


def client_metrics(clients: pd.DataFrame) -> dict[str, float]:
    out = {}
    for key in ("acc_final", "acc_finetune", "acc_finetune_bnrecal"):
        has = not clients.empty and key in clients
        out[f"{key}_mean"] = float(clients[key].astype(float).mean()) if has else math.nan
    return out


def _recorded_text(value: Any) -> str | None:
    """A short line a run wrote about itself (its family, its local work), None if it is not
    one: ``status.json`` is read, never trusted."""
    if isinstance(value, str) and 0 < len(value) <= 80 and value.isprintable():
        return value
    return None


def read_run(path: Path, root: Path, tables: Iterable[str] = TABLES
             ) -> tuple[dict[str, Any], dict[str, pd.DataFrame | None]]:
    """One run: its ``runs`` row (without derived labels) and its raw tables.

    ``rounds`` and ``clients`` are always read (the row's metrics come from them); ``layers``
    only when asked for.
    """
    problems = []
    config, problem = _read_config(path)
    problems.append(problem)
    if (path / STATUS_FILE).is_file():
        status, problem = _read_json(path / STATUS_FILE)
        problems.append(problem)
    else:  # an orphan Tune trial: no run files at all
        status = {"status": "failed" if (path / TUNE_ERROR).is_file() else "pending"}
    wanted = {"rounds", "clients", *tables}
    frames: dict[str, pd.DataFrame | None] = {}
    for name in TABLES:
        frames[name], problem = _read_table(path, name) if name in wanted else (None, None)
        problems.append(problem)
    state = status.get("status") or "unknown"
    error = status.get("error")
    if state == "finished" and any(problems):
        state = "damaged"  # listed with the reason, never counted nor silently dropped
    if not error and state != "finished":
        error = tune_error(path, root)
    notes = [p for p in problems if p]
    if notes and not error:
        error = "; ".join(notes)
    rounds = frames["rounds"]
    window = int(config.get("train.final_window") or 10)
    rounds_done = int(status.get("round", len(rounds)) or len(rounds))
    elapsed = status.get("elapsed_s")
    if elapsed is None and "seconds" in rounds:
        elapsed = float(rounds["seconds"].sum())
    updated = status.get("updated")
    row: dict[str, Any] = {
        "path": str(path), **config, "status": state, "error": error,
        "rounds_done": rounds_done,
        "rounds_total": status.get("rounds", config.get("train.rounds")),
        "final_window": window, **round_metrics(rounds, window),
        **client_metrics(frames["clients"]),
        "elapsed_s": float(elapsed) if elapsed is not None else math.nan,
        "seconds_per_round": float(elapsed) / rounds_done if elapsed and rounds_done else math.nan,
        "updated": pd.Timestamp(updated, unit="s") if updated else pd.NaT,
        RECORDED_FAMILY: _recorded_text(status.get("family")),
        RECORDED_LOCAL_WORK: _recorded_text(status.get("local_work")),
        "has_config": (path / CONFIG_FILE).is_file(), "has_rounds": not rounds.empty,
        "has_clients": not frames["clients"].empty,
        "has_layers": (path / TABLE_FILES["layers"]).is_file(),
    }
    return row, frames


# ----- labels ----------------------------------------------------------------------------------
def _varying(runs: pd.DataFrame, columns: Iterable[str]) -> list[str]:
    out = []
    for col in columns:
        if col in runs and runs[col].dropna().astype(str).nunique() > 1:
            out.append(col)
    return out


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """Config columns that define the setting a method is run in (everything but method/seed)."""
    return [c for c in runs.columns if _is_config(c) and c not in NOT_SETTING
            and not c.startswith(NOT_SETTING_PREFIXES)]


def _is_config(col: str) -> bool:
    return col in ("name", "seed", "model", "algorithm", "handout", "output") or (
        col.split(".")[0] in CONFIG_SECTIONS)


def _short(col: str) -> str:
    return col.split(".")[-1]


def add_labels(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``setting``, ``algorithm``, ``handout``, ``method``, ``base_method``, ``sparsity``
    and ``period`` (see the module docstring); ``algorithm`` is replaced by its normalised
    value."""
    runs = runs.copy()
    # labels name what differs between runs with a full config (a Tune trial that failed
    # before writing config.yaml only has its sampled params)
    full = runs[runs["has_config"]] if "has_config" in runs else runs
    configs = runs.to_dict("records")
    shown = varying_knobs(configs[i] for i in np.flatnonzero(runs.index.isin(full.index)))
    methods = [method_of(config, shown) for config in configs]
    runs["algorithm"] = [m.algorithm for m in methods]
    runs["handout"] = [m.handout for m in methods]
    runs["method"] = [m.label for m in methods]
    runs["base_method"] = [m.base for m in methods]
    is_lips = runs["handout"].eq(LIPS_SECTION)
    for knob in ("sparsity", "period"):
        raw = runs[f"lips.{knob}"] if f"lips.{knob}" in runs else pd.Series(np.nan, runs.index)
        runs[knob] = pd.to_numeric(raw, errors="coerce").where(is_lips).astype(float)
    extra = [c for c in _varying(full, setting_columns(full))
             if c not in ("data.dataset", "model")]

    def setting(row: pd.Series) -> str:
        if not row.get("has_config", True):
            return "? (no config.yaml)"
        head = f"{row.get('data.dataset', '?')}/{row.get('model', '?')}"
        tail = " ".join(f"{_short(c)}={fmt_value(row[c])}" for c in extra)
        return f"{head} {tail}".strip()

    runs["setting"] = runs.apply(setting, axis=1) if len(runs) else pd.Series(dtype=str)
    return runs


def mark_duplicates(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs of one setting, method and seed count once: the newest (by its last
    status update, then run id) stays ``finished``; the others get the status ``duplicate``
    and name it in ``error``, so tables, paired tests and figures never average them."""
    if "seed" not in runs or runs.empty:
        return runs
    done = runs[runs["status"] == "finished"]
    order = done.assign(_updated=done["updated"].fillna(pd.Timestamp(0)))
    order = order.sort_values(["_updated", "run_id"], ascending=False)
    for _, group in order.groupby(["setting", "method", "seed"], dropna=False, sort=False):
        kept = group["run_id"].iloc[0]
        for index in group.index[1:]:
            runs.loc[index, "status"] = "duplicate"
            runs.loc[index, "error"] = (f"the same method, setting and seed as {kept}, which "
                                        "is newer and counts instead")
    return runs


# ----- public loaders --------------------------------------------------------------------------
def load(paths: PathLike | Iterable[PathLike],
         tables: Iterable[str] = TABLES) -> RunFrames:
    """Load every run at or below ``paths`` into the four tidy frames."""
    roots = _as_paths(paths)
    found = _find(roots)
    ids = _run_ids(found, roots)
    wanted = set(tables)
    rows, parts = [], {name: [] for name in TABLES}
    for run_id, (path, root) in zip(ids, found, strict=True):
        row, run_tables = read_run(path, root, wanted)
        rows.append({"run_id": run_id, **row})
        for name in wanted:
            if run_tables[name] is not None and not run_tables[name].empty:
                parts[name].append(run_tables[name].assign(run_id=run_id))
    runs = mark_duplicates(add_labels(pd.DataFrame(rows))) if rows else pd.DataFrame(
        columns=["run_id", "path", "status", "error", "setting", "method", "base_method",
                 "algorithm", "handout"])
    for col in [c for c in runs.columns if c.endswith("_best_round")]:
        runs[col] = runs[col].astype("Int64")
    keys = [c for c in KEY_COLUMNS if c in runs]
    frames: dict[str, pd.DataFrame | None] = {}
    for name in TABLES:
        if parts[name]:
            table = pd.concat(parts[name], ignore_index=True)
            table = runs[keys].merge(table, on="run_id", how="inner")
        else:
            table = pd.DataFrame(columns=keys)
        frames[name] = table
    return RunFrames(runs=runs, **frames)


def load_runs(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    """One row per run: config columns, status, error, final/windowed/best metrics, wall time."""
    return load(paths, tables=()).runs


def load_rounds(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    return load(paths, tables=("rounds",)).rounds


def load_layers(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    return load(paths, tables=("layers",)).layers


def load_clients(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    return load(paths, tables=("clients",)).clients
