"""A run directory: resolved config, per-round tables as Parquet, checkpoints, status.

Every file ray-lips writes in a run folder is written under a fresh name made exclusively in
the same folder and then renamed onto its own name: a crash never leaves half a file, and a
symbolic link planted in the folder (``status.json``, a temporary name, ``model_final.pt``) is
replaced, never written through. The lock is opened without following links, and a run folder
whose files are links is refused before a run starts (:func:`check_run_folder`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import secrets
import shutil
import socket
import stat
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from ray_lips.config import ExperimentConfig, validate_config
from ray_lips.core.failure import end_status, error_line, root_cause

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
ROUNDS_FILE = "rounds.parquet"
LAYERS_FILE = "layers.parquet"
CLIENTS_FILE = "clients.parquet"
MODEL_FILE = "model_final.pt"
LOCK_FILE = ".lock"
TRACKERS_FILE = "trackers.json"  # the experiment trackers' run ids (ray_lips.tracking)
CHECKPOINT_DIR = "checkpoints"
# The tables by the names the analysis gives them (``analysis.loaders``' frames)
TABLE_FILES = {"rounds": ROUNDS_FILE, "layers": LAYERS_FILE, "clients": CLIENTS_FILE}
# What ray-lips writes at the top of a run folder (checkpoints/ holds the rest)
RUN_FOLDER_FILES = (CONFIG_FILE, STATUS_FILE, ROUNDS_FILE, LAYERS_FILE, CLIENTS_FILE, MODEL_FILE,
                    LOCK_FILE, TRACKERS_FILE, CHECKPOINT_DIR)
KEEP_CHECKPOINTS = 2
CLIENT_STATE_PARTS = "client_state_parts"  # a checkpoint's record of its parts' sizes


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used to resume."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none (a
    0-byte file makes ``torch.load`` raise an ``EOFError`` with an empty message)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_client_state_part(part: object, where: str,
                            slots: Collection[str] | None = None) -> None:
    """Refuse a client state part that is not ``{slot: {client number: {name: tensor}}}`` or
    that names a slot outside ``slots`` (the run's algorithm's and hand-out's): what a pool
    makes of a slot or a client must never come from a crafted file."""
    import torch

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: refused to load: {what}, which a ray-lips checkpoint "
                               "of this run never holds (a crafted or foreign file?)")

    if not isinstance(part, dict):
        raise refuse(f"it holds a {type(part).__name__}, not client state by slot")
    for slot, entries in part.items():
        if not isinstance(slot, str) or (slots is not None and slot not in slots):
            allowed = ", ".join(sorted(slots)) if slots else "none"
            raise refuse(f"client state slot {_short(slot)} (this run keeps: {allowed})")
        if not isinstance(entries, dict):
            raise refuse(f"slot {slot!r} holds a {type(entries).__name__}, not clients")
        for client, entry in entries.items():
            if type(client) is not int or client < 0:
                raise refuse(f"client {_short(client)} in slot {slot!r}, not a client number")
            if not isinstance(entry, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in entry.items()):
                raise refuse(f"client {client} in slot {slot!r} is not a dict of tensors")


def client_state_folder(checkpoint_file: Path) -> Path:
    """Where the clients' state of ``round_NNNNN.pt`` lies: ``round_NNNNN.clients``."""
    return checkpoint_file.with_suffix(".clients")


class ClientStateParts:
    """A checkpoint's client state parts, checked for presence and size at once and each
    read (``weights_only``) only when iterated to."""

    def __init__(self, checkpoint_file: Path, sizes: list[int],
                 slots: Collection[str] | None = None):
        if not isinstance(sizes, list) or not all(isinstance(n, int) for n in sizes):
            raise CheckpointError("its record of client state parts is not a list of sizes")
        self.slots = slots
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
                part = torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise CheckpointError(f"{file}: refused to load: it holds objects other than "
                                      f"tensors and plain values: {first_line(err)}") from None
            except (RuntimeError, EOFError, OSError) as err:
                raise CheckpointError(f"{file}: damaged client state part: "
                                      f"{first_line(err)}") from None
            check_client_state_part(part, str(file), self.slots)
            yield part


class RunLockedError(RuntimeError):
    """Another process is running (or resuming) the same run folder."""


class UnsafeRunFolderError(RunLockedError):
    """A file ray-lips writes in the run folder is a symbolic link (or not a plain file): the
    folder is not taken for a run (a ``RunLockedError``: whoever takes the lock sees it)."""


def _unsafe(path: Path, what: str) -> UnsafeRunFolderError:
    return UnsafeRunFolderError(
        f"{path} is {what}; ray-lips writes that file itself and never through a link: "
        "remove it (or copy the run folder without links) and try again")


def check_run_folder(run_dir: str | Path) -> None:
    """Refuse a run folder where a file ray-lips writes (config, status, tables, final model,
    lock, ``checkpoints/`` and every file and part in it) is a symbolic link."""
    root = Path(run_dir)
    paths = [root / name for name in RUN_FOLDER_FILES]
    checkpoints = root / CHECKPOINT_DIR
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for entry in sorted(checkpoints.iterdir()):
            paths.append(entry)
            if entry.is_dir() and not entry.is_symlink():
                paths.extend(sorted(entry.iterdir()))
    for path in paths:
        if path.is_symlink():
            raise _unsafe(path, "a symbolic link")
    if checkpoints.exists() and not checkpoints.is_dir():
        raise _unsafe(checkpoints, "not a folder")


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (a ``.lock`` file naming the holder's host and
    PID) for as long as this process runs the run; a second holder is refused at once, and so
    is a folder whose files are links (:func:`check_run_folder`)."""
    path = Path(run_dir) / LOCK_FILE
    try:  # never through a link: the lock file is truncated and written
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _unsafe(path, "a symbolic link") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise _unsafe(path, "not a plain file of its own (a device, a pipe or a hard link)")
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(f"{run_dir} is in use by {holder}; wait for it to end (or stop "
                             "it) before resuming") from None
    try:
        check_run_folder(run_dir)
    except BaseException:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
        raise
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


@contextmanager
def run_locks(run_dirs: Iterable[str | Path]) -> Iterator[None]:
    """:func:`run_lock` on each of ``run_dirs`` at once (``compare``'s runs); if one is
    refused, those already taken are let go."""
    with ExitStack() as stack:
        for run_dir in run_dirs:
            stack.enter_context(run_lock(run_dir))
        yield


def new_run_dir(cfg: ExperimentConfig, output: str | Path | None = None) -> Path:
    """A fresh, uniquely named directory under ``output`` (default: the config's)."""
    base = Path(output if output is not None else cfg.output).expanduser().resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"{cfg.name}_{cfg.method}_s{cfg.seed}_{stamp}"
    for suffix in range(1000):
        path = base / (stem if suffix == 0 else f"{stem}_{suffix}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory under {base}")


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_new(path: str | Path) -> IO[bytes]:
    """``path`` opened for writing only if this call creates it: never a file or a link that
    was there before (``O_EXCL``), so nothing planted is written through."""
    return os.fdopen(os.open(path, _NEW_FILE, 0o666), "wb")


def _temporary_name(path: Path) -> Path:
    """A hidden, unpredictable name beside ``path`` (no ``round_*`` pattern matches it)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextmanager
def replacing(path: str | Path) -> Iterator[IO[bytes]]:
    """A file to write that becomes ``path`` when the block ends: made exclusively under a
    fresh name in the same folder, then renamed onto ``path`` (a link there is replaced, not
    followed). If the block fails the file is removed (on a full disk: the space comes back)."""
    path = Path(path)
    for _ in range(100):
        tmp = _temporary_name(path)
        try:
            handle = open_new(tmp)
            break
        except FileExistsError:  # planted under the same random name: draw another
            continue
    else:
        raise FileExistsError(f"{path.parent}: no fresh name for a temporary file")
    try:
        with handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_replacing(path: str | Path, data: bytes) -> None:
    """``data`` as the whole of ``path``, atomically and never through a link."""
    with replacing(path) as handle:
        handle.write(data)


def copy_replacing(source: str | Path, target: str | Path) -> None:
    """A copy of the file ``source`` as ``target``, written as :func:`replacing` writes."""
    with open(source, "rb") as src, replacing(target) as dst:
        shutil.copyfileobj(src, dst)


def copy_folder_replacing(source: str | Path, target: str | Path) -> None:
    """A copy of the files of the folder ``source`` as the folder ``target``: made under a
    fresh name beside it, then put in place of whatever was there (a link is removed, never
    followed)."""
    target = Path(target)
    staging = _temporary_name(target)
    staging.mkdir()
    try:
        for file in sorted(Path(source).iterdir()):
            if file.is_file() and not file.is_symlink():
                with open(file, "rb") as src, open_new(staging / file.name) as dst:
                    shutil.copyfileobj(src, dst)
        _remove(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    """Whatever is at ``path`` (file, link or folder), a link itself and never its target."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


# pandas and torch are imported where a table or a checkpoint is read or written: the command
# line reads run folders and starts Ray before it needs either (torch alone takes 3 s to load).


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    with replacing(path) as handle:
        pd.DataFrame(rows).to_parquet(handle, index=False)


class RunWriter:
    """Writes one run's files; every write is atomic so a crash never leaves half a file, and
    none goes through a link planted in the folder."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        checkpoints = self.dir / CHECKPOINT_DIR
        if not (checkpoints.is_symlink() or checkpoints.exists()):  # else check_run_folder's
            checkpoints.mkdir(exist_ok=True)

    def write_config(self, cfg: ExperimentConfig) -> None:
        write_bytes_replacing(self.dir / CONFIG_FILE, cfg.to_yaml().encode())

    def read_config(self) -> ExperimentConfig:
        import yaml

        return validate_config(yaml.safe_load((self.dir / CONFIG_FILE).read_text()))

    def write_status(self, status: str, **fields: Any) -> None:
        current = self._own_status()
        current.update(fields, status=status, updated=time.time())
        write_bytes_replacing(self.dir / STATUS_FILE, json.dumps(current, indent=2).encode())

    def write_end(self, err: BaseException, status: str | None = None,
                  line: str | None = None) -> bool:
        """Record how a run ended badly, as well as the disk allows: never raises an
        ``OSError``, so the error that ended the run is the one reported. ``status``: default
        the error's own (``failed``, ``diverged``, ``interrupted``: ``failure.end_status``);
        ``line``: the error as the caller words it (default: ``failure.error_line``, out of
        Ray's wrappers). On a full disk, where even the small new file cannot be made,
        ``status.json`` is rewritten in place (its own space is reused). Returns whether the
        status was written."""
        cause = root_cause(err)
        status = status if status is not None else end_status(cause)
        fields = {"status": status, "error": line if line is not None else error_line(cause)}
        with contextlib.suppress(OSError):  # no room for a new file: rewrite in place below
            self.write_status(status, error=fields["error"])
            return True
        current = self._own_status()
        current.update(fields, updated=time.time())
        data = json.dumps(current, indent=2).encode()
        try:
            fd = os.open(self.dir / STATUS_FILE,
                         os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o666)
            with os.fdopen(fd, "wb") as handle:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                    return False
                handle.truncate(0)
                handle.write(data)
            return True
        except OSError:
            return False

    def read_status(self) -> dict[str, Any]:
        """What ``status.json`` says; empty when there is none or it is damaged (a disk that
        filled up as it was rewritten in place)."""
        path = self.dir / STATUS_FILE
        try:
            current = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            return {}
        return current if isinstance(current, dict) else {}

    def _own_status(self) -> dict[str, Any]:
        """What ``status.json`` holds, to update it: read without following a link (a planted
        link is replaced, its target never read into the status) and empty if damaged."""
        try:
            fd = os.open(self.dir / STATUS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC)
        except OSError:  # missing, or a link
            return {}
        with os.fdopen(fd, "rb") as handle:
            try:
                current = json.loads(handle.read())
            except (OSError, ValueError):
                return {}
        return current if isinstance(current, dict) else {}

    def write_model(self, state: dict[str, Any]) -> None:
        """The final global model as ``model_final.pt``."""
        import torch

        with replacing(self.dir / MODEL_FILE) as handle:
            torch.save(state, handle)

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
        for left in folder.glob(".*.tmp"):  # what an earlier, killed write left
            _remove(left)
        path = folder / f"round_{round_idx:05d}.pt"
        parts = client_state_folder(path)
        staging = _temporary_name(parts)
        staging.mkdir()  # exclusive: fails on anything already there, a link included
        try:
            sizes = write_client_state(staging) if write_client_state is not None else []
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _remove(path)  # never a main file beside parts that are not its own
        _remove(parts)
        if sizes:
            os.replace(staging, parts)
        else:
            staging.rmdir()
        with replacing(path) as handle:
            torch.save({**payload, CLIENT_STATE_PARTS: sizes}, handle)
        kept = sorted(folder.glob("round_*.pt"))[-KEEP_CHECKPOINTS:]
        for old in sorted(folder.glob("round_*.pt")):
            if old not in kept:
                _remove(old)
        for other in folder.glob("round_*.clients*"):
            if folder / f"{other.name.split('.')[0]}.pt" not in kept:
                _remove(other)
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.dir / CHECKPOINT_DIR).glob("round_*.pt"))
        return found[-1] if found else None

    def load_checkpoint(self, path: Path | None = None,
                        client_slots: Collection[str] | None = None) -> dict[str, Any] | None:
        """The given checkpoint, or the newest intact one (a damaged newest file, e.g. cut
        short by a full disk or empty, or client state parts missing or of the wrong size, is
        reported and the one before it used: two are kept).

        Read with ``weights_only``: tensors and plain values only, so a crafted file in a
        shared run folder cannot run code; such a file is refused, never skipped. Its
        ``client_state`` is an iterable of the parts, each read (the same way) when reached
        and refused unless it holds client numbers in the ``client_slots`` the run keeps.
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
                    f"foreign file?): {first_line(err)}") from None
            except (RuntimeError, EOFError, OSError) as err:
                damaged.append(f"{candidate.name} ({first_line(err)})")
                continue
            if not isinstance(checkpoint, dict):
                damaged.append(f"{candidate.name} (it holds a {type(checkpoint).__name__}, "
                               "not a checkpoint)")
                continue
            if CLIENT_STATE_PARTS in checkpoint:  # else: state inside (older checkpoints)
                try:
                    checkpoint["client_state"] = ClientStateParts(
                        candidate, checkpoint.pop(CLIENT_STATE_PARTS), client_slots)
                except CheckpointError as err:
                    damaged.append(f"{candidate.name} ({err})")
                    continue
            else:
                for part in checkpoint.get("client_state") or ():
                    check_client_state_part(part, str(candidate), client_slots)
            if damaged:
                warnings.warn(f"damaged checkpoint(s) skipped: {'; '.join(damaged)}; resuming "
                              f"from {candidate.name}", stacklevel=2)
            return checkpoint
        if damaged:
            raise CheckpointError(f"{self.dir / CHECKPOINT_DIR}: no intact checkpoint: "
                                  + "; ".join(damaged))
        return None
