"""A run directory: resolved config, per-round tables as Parquet, checkpoints, status."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray_lips.config import ExperimentConfig, validate_config

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
ROUNDS_FILE = "rounds.parquet"
LAYERS_FILE = "layers.parquet"
CLIENTS_FILE = "clients.parquet"
CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2
CLIENT_STATE_PARTS = "client_state_parts"  # a checkpoint's record of its parts' sizes


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used to resume."""


def client_state_folder(checkpoint_file: Path) -> Path:
    """Where the clients' state of ``round_NNNNN.pt`` lies: ``round_NNNNN.clients``."""
    return checkpoint_file.with_suffix(".clients")


class ClientStateParts:
    """A checkpoint's client state parts, checked for presence and size at once and each
    read (``weights_only``) only when iterated to."""

    def __init__(self, checkpoint_file: Path, sizes: list[int]):
        if not isinstance(sizes, list) or not all(isinstance(n, int) for n in sizes):
            raise CheckpointError("its record of client state parts is not a list of sizes")
        folder = client_state_folder(checkpoint_file)
        self.files = [folder / f"{index:05d}.pt" for index in range(len(sizes))]
        for file, size in zip(self.files, sizes, strict=True):
            actual = file.stat().st_size if file.is_file() else None
            if actual != size:
                raise CheckpointError(f"client state part {folder.name}/{file.name} is "
                                      + ("missing" if actual is None else
                                         f"{actual} bytes, not the {size} written"))

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict]:
        import torch

        for file in self.files:
            try:
                yield torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise CheckpointError(f"{file}: refused to load: it holds objects other than "
                                      f"tensors and plain values: {str(err).splitlines()[0]}"
                                      ) from None
            except (RuntimeError, EOFError, OSError) as err:
                raise CheckpointError(f"{file}: damaged client state part: "
                                      f"{str(err).splitlines()[0]}") from None


class RunLockedError(RuntimeError):
    """Another process is running (or resuming) the same run folder."""


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (a ``.lock`` file naming the holder's host and
    PID) for as long as this process runs the run; a second holder is refused at once."""
    path = Path(run_dir) / ".lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(f"{run_dir} is in use by {holder}; wait for it to end (or stop "
                             "it) before resuming") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def new_run_dir(cfg: ExperimentConfig, output: str | Path | None = None) -> Path:
    """A fresh, uniquely named directory under ``output`` (default: the config's)."""
    base = Path(output if output is not None else cfg.output).expanduser().resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    method = cfg.algorithm if cfg.handout == "dense" else f"{cfg.algorithm}+{cfg.handout}"
    stem = f"{cfg.name}_{method}_s{cfg.seed}_{stamp}"
    for suffix in range(1000):
        path = base / (stem if suffix == 0 else f"{stem}_{suffix}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory under {base}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# pandas and torch are imported where a table or a checkpoint is read or written: the command
# line reads run folders and starts Ray before it needs either (torch alone takes 3 s to load).


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, path)


class RunWriter:
    """Writes one run's files; every write is atomic so a crash never leaves half a file."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / CHECKPOINT_DIR).mkdir(exist_ok=True)

    def write_config(self, cfg: ExperimentConfig) -> None:
        _atomic_write_bytes(self.dir / CONFIG_FILE, cfg.to_yaml().encode())

    def read_config(self) -> ExperimentConfig:
        import yaml

        return validate_config(yaml.safe_load((self.dir / CONFIG_FILE).read_text()))

    def write_status(self, status: str, **fields: Any) -> None:
        current = self.read_status()
        current.update(fields, status=status, updated=time.time())
        _atomic_write_bytes(self.dir / STATUS_FILE, json.dumps(current, indent=2).encode())

    def read_status(self) -> dict[str, Any]:
        path = self.dir / STATUS_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def write_rounds(self, rows: list[dict]) -> None:
        _write_parquet(self.dir / ROUNDS_FILE, rows)

    def write_layers(self, rows: list[dict]) -> None:
        _write_parquet(self.dir / LAYERS_FILE, rows)

    def write_clients(self, rows: list[dict]) -> None:
        _write_parquet(self.dir / CLIENTS_FILE, rows)

    def read_table(self, name: str) -> list[dict]:
        import pandas as pd

        path = self.dir / name
        return pd.read_parquet(path).to_dict("records") if path.exists() else []

    # ----- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, round_idx: int, payload: dict[str, Any],
                        write_client_state: Callable[[Path], list[int]] | None = None) -> Path:
        """``round_NNNNN.pt`` with the driver's state; the clients' state goes into the
        ``round_NNNNN.clients`` folder beside it, where ``write_client_state(folder)`` writes
        it as ``00000.pt``, ``00001.pt``, ... and returns their sizes. The parts are complete
        before the main file appears, and the main file records their sizes."""
        import torch

        folder = self.dir / CHECKPOINT_DIR
        path = folder / f"round_{round_idx:05d}.pt"
        parts = client_state_folder(path)
        staging = parts.with_name(parts.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        sizes = write_client_state(staging) if write_client_state is not None else []
        path.unlink(missing_ok=True)  # never a main file beside parts that are not its own
        shutil.rmtree(parts, ignore_errors=True)
        if sizes:
            os.replace(staging, parts)
        else:
            staging.rmdir()
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**payload, CLIENT_STATE_PARTS: sizes}, tmp)
        os.replace(tmp, path)
        kept = sorted(folder.glob("round_*.pt"))[-KEEP_CHECKPOINTS:]
        for old in sorted(folder.glob("round_*.pt")):
            if old not in kept:
                old.unlink()
        for other in folder.glob("round_*.clients*"):
            if folder / f"{other.name.split('.')[0]}.pt" not in kept:
                shutil.rmtree(other, ignore_errors=True)
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.dir / CHECKPOINT_DIR).glob("round_*.pt"))
        return found[-1] if found else None

    def load_checkpoint(self, path: Path | None = None) -> dict[str, Any] | None:
        """The given checkpoint, or the newest intact one (a damaged newest file, e.g. cut
        short by a full disk, or client state parts missing or of the wrong size, is reported
        and the one before it used: two are kept).

        Read with ``weights_only``: tensors and plain values only, so a crafted file in a
        shared run folder cannot run code; such a file is refused, never skipped. Its
        ``client_state`` is an iterable of the parts, each read (the same way) when reached.
        """
        import torch

        found = [path] if path is not None else sorted(
            (self.dir / CHECKPOINT_DIR).glob("round_*.pt"), reverse=True)
        damaged = []
        for candidate in found:
            try:
                checkpoint = torch.load(candidate, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise CheckpointError(
                    f"{candidate}: refused to load: it holds objects other than tensors and "
                    f"plain values, which a ray-lips checkpoint never does (a crafted or "
                    f"foreign file?): {str(err).splitlines()[0]}") from None
            except (RuntimeError, EOFError, OSError) as err:
                damaged.append(f"{candidate.name} ({str(err).splitlines()[0]})")
                continue
            if CLIENT_STATE_PARTS in checkpoint:  # else: state inside (older checkpoints)
                try:
                    checkpoint["client_state"] = ClientStateParts(
                        candidate, checkpoint.pop(CLIENT_STATE_PARTS))
                except CheckpointError as err:
                    damaged.append(f"{candidate.name} ({err})")
                    continue
            if damaged:
                warnings.warn(f"damaged checkpoint(s) skipped: {'; '.join(damaged)}; resuming "
                              f"from {candidate.name}", stacklevel=2)
            return checkpoint
        if damaged:
            raise CheckpointError(f"{self.dir / CHECKPOINT_DIR}: no intact checkpoint: "
                                  + "; ".join(damaged))
        return None
