"""Whether this tree computes exactly the numbers of an earlier git revision, in one run.

Both versions run the same fixed tiny configs in-process (``ray-lips run --local``, two pools,
one thread each) for every built-in algorithm, with and without LIPS's hand-out, one-at-a-time
and in batched groups, and on a model with BatchNorm. Then each run's ``rounds.parquet``,
``layers.parquet`` and ``clients.parquet`` are compared byte for byte on the columns both
revisions write: a file with the same columns on both sides and no timing column is compared
as it is on disk; otherwise the one column that cannot repeat, ``rounds.parquet``'s wall-clock
``seconds``, and the columns only one side has (named in the output, e.g. ``+2 columns
(down_bytes, up_bytes)``) are dropped from both, and the rest is compared as the bytes of the
same table written again the same way. Exit status 0: every table identical on its common
columns.

    .venv/bin/python benchmarks/check_same_numbers.py --rev HEAD~1
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("rounds.parquet", "layers.parquet", "clients.parquet")
TIMING_COLUMNS = ("seconds",)  # wall-clock time: never the same twice

SMALL = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.3, "clients": 6,
         "train_per_client": 30, "test_per_client": 10}
WITH_BATCHNORM = {"dataset": "mnist1d", "partition": "dirichlet", "alpha": 0.3, "clients": 6,
                  "train_per_client": 30, "test_per_client": 10}


def method(algorithm: str, lips: bool, model: str = "smallcnn", data: dict | None = None,
           batched: bool = False, participation: float = 1.0) -> dict:
    return {
        "name": "same", "seed": 3, "model": model, "algorithm": algorithm,
        "handout": "lips" if lips else "dense",
        "data": dict(data or SMALL),
        "train": {"rounds": 4, "local_epochs": 2, "batch_size": 10, "lr": 0.05,
                  "participation": participation, "finetune_epochs": 1, "final_window": 2,
                  "checkpoint_every": 2, "inertia_ref_round": 1, "eval_test_samples": 200,
                  "batched": batched, "batch_clients": 3 if batched else "auto"},
        "lips": {"sparsity": 0.5, "period": 1},
        "fedprox": {"mu": 0.1},
        "ditto": {"lam": 0.1, "personal_epochs": 1},
        "resources": {"pools": 2, "cpus_per_pool": 1},
    }


CASES = {
    "fedavg": method("fedavg", False),
    "fedavg+lips": method("fedavg", True),
    "fedprox": method("fedprox", False),
    "fedprox+lips": method("fedprox", True),
    "scaffold": method("scaffold", False, participation=0.5),
    "scaffold+lips": method("scaffold", True),
    "fedper": method("fedper", False),
    "ditto": method("ditto", False),
    "local": method("local", False),
    "fedavg+lips batched": method("fedavg", True, batched=True),
    "scaffold batched": method("scaffold", False, batched=True),
    "ditto batched": method("ditto", False, batched=True),
    "fedavg+lips resnet8_1d": method("fedavg", True, "resnet8_1d", WITH_BATCHNORM),
    "fedper resnet8_1d": method("fedper", False, "resnet8_1d", WITH_BATCHNORM),
}


def run_case(source: Path, config: dict, folder: Path) -> Path:
    """One ``ray-lips run --local`` of ``config`` with the ``ray_lips`` of ``source``."""
    folder.mkdir(parents=True)
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump({**config, "output": str(folder / "runs")}))
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ray_lips.cli", "run", str(config_file),
                           "--local"],
                          env=env, cwd=source, capture_output=True, text=True)
    runs = sorted((folder / "runs").glob("*/rounds.parquet"))
    if done.returncode != 0 or len(runs) != 1:
        raise RuntimeError(f"{source}: {done.stderr[-2000:]}")
    return runs[0].parent


@dataclass(frozen=True)
class Comparison:
    """Two revisions' versions of one table: the sha256 of each on the columns both have (the
    file's own bytes when nothing was dropped), and the columns only one side has."""

    before: str
    after: str
    added: tuple[str, ...]  # only the newer tree writes them
    removed: tuple[str, ...]  # only the earlier revision wrote them

    @property
    def same(self) -> bool:
        return self.before == self.after

    def columns_note(self) -> str:
        """``+2 columns (a, b)`` and/or ``-1 column (c)``; empty when the columns agree."""
        notes = [f"{sign}{len(names)} column{'s' if len(names) > 1 else ''} ({', '.join(names)})"
                 for sign, names in (("+", self.added), ("-", self.removed)) if names]
        return "  ".join(notes)


def _common_digest(table: pa.Table, columns: list[str]) -> str:
    """The sha256 of ``table`` reduced to ``columns`` (in that order), written again without
    the schema's metadata (pandas' metadata lists every column the table had)."""
    buffer = io.BytesIO()
    pq.write_table(table.select(columns).replace_schema_metadata(None), buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def compare(before: Path, after: Path) -> Comparison:
    """``before`` and ``after`` (the same table of both revisions) on their common columns."""
    old, new = pq.read_table(before), pq.read_table(after)
    added = tuple(c for c in new.column_names if c not in old.column_names)
    removed = tuple(c for c in old.column_names if c not in new.column_names)
    if not added and not removed and not any(c in TIMING_COLUMNS for c in old.column_names):
        return Comparison(hashlib.sha256(before.read_bytes()).hexdigest(),
                          hashlib.sha256(after.read_bytes()).hexdigest(), (), ())
    common = [c for c in old.column_names
              if c in new.column_names and c not in TIMING_COLUMNS]
    return Comparison(_common_digest(old, common), _common_digest(new, common), added, removed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the earlier revision (git)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated, of: " + ", ".join(CASES))
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases: {', '.join(unknown)}")
    differ = 0
    notes: dict[str, list[str]] = {}  # a table's column changes: the cases that show them
    with tempfile.TemporaryDirectory(prefix="ray-lips-same-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                        args.rev], check=True, capture_output=True)
        try:
            for i, case in enumerate(cases):
                runs = {version: run_case(source, CASES[case], Path(tmp) / f"{i}-{version}")
                        for version, source in (("before", before), ("after", ROOT))}
                for table in TABLES:
                    found = compare(runs["before"] / table, runs["after"] / table)
                    differ += not found.same
                    note = found.columns_note()
                    if note:
                        notes.setdefault(f"{table}: {note}", []).append(case)
                    print(f"{case:<24s} {table:<16s} "
                          f"{'identical' if found.same else 'DIFFERENT'} {found.after[:16]}"
                          f"{'  ' + note if note else ''}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before)], check=False, capture_output=True)
    if notes:
        print("\ncompared on the columns both have:")
        for note, where in notes.items():
            print(f"  {note}" + ("" if len(where) == len(cases) else
                                 f" in {len(where)} of {len(cases)} cases"))
    print(f"\n{len(cases) * len(TABLES) - differ} of {len(cases) * len(TABLES)} tables identical "
          f"to {args.rev}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
