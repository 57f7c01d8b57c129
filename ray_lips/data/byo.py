"""Bring-your-own datasets: an import path, a ``.npz`` file or an image folder.

``data.dataset`` is read, in this order, as a built-in name, an import path
``package.module:function`` (see :mod:`ray_lips.data.userimport`), or the path of a ``.npz``
file or an image folder (``~`` expanded; relative to the current directory). The validated
config holds a path as an absolute path and ``data.source`` records its sha256, so a run's
``config.yaml`` names exactly what was read; :func:`load` refuses a file whose contents differ
from the recorded ones (another node's copy, or a file changed before a resume).

- function: called with no arguments, it returns ``(x_train, y_train, x_test, y_test)`` or a
  mapping with those keys and optionally ``num_classes``; the arrays follow
  :mod:`ray_lips.data.arrays`. It must return the same arrays on every call and machine.
- ``.npz``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally a scalar
  ``num_classes``), read with ``allow_pickle=False``; shapes, dtypes and labels are checked when
  the config is validated, every value by :func:`check_contents` before Ray starts.
- image folder: ``train/<class>/<image>`` and ``test/<class>/<image>``, see
  :mod:`ray_lips.data.images`; every image is opened and checked by :func:`check_contents`.

:func:`check_contents` reads everything once, so it is one of the checks made before Ray
(:mod:`ray_lips.config.checks`), not part of validation (which every process repeats).
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ray_lips.config import DATASETS, ConfigError, is_import_path
from ray_lips.data import images
from ray_lips.data.arrays import (
    KEYS,
    channel_stats,
    check_arrays,
    check_labels,
    check_layout,
    check_num_classes,
    first_non_finite,
    non_finite_error,
    rows_per_step,
)
from ray_lips.data.in_memory import DatasetInfo
from ray_lips.data.userimport import import_object

if TYPE_CHECKING:
    from ray_lips.config import DataConfig
    from ray_lips.data.in_memory import ArrayDataset

KEY = "data.dataset"


def kind(dataset: str) -> str:
    """``builtin``, ``function`` (an import path), ``npz`` or ``images`` (anything else)."""
    if dataset in DATASETS:
        return "builtin"
    if is_import_path(dataset):
        return "function"
    return "npz" if dataset.lower().endswith(".npz") else "images"


def absolute(dataset: str) -> Path:
    """The path ``dataset`` names, ``~`` expanded and made absolute (symlinks kept)."""
    return Path(os.path.abspath(os.path.expanduser(dataset)))


def resolve(dataset: str) -> str:
    """The form the validated config records: built-in names and import paths as given (the
    import is checked), paths absolute (they must exist and have the expected layout)."""
    found = kind(dataset)
    if found == "builtin":
        return dataset
    if found == "function":
        import_object(dataset, KEY)
        return dataset
    path = absolute(dataset)
    if not path.exists():
        raise ConfigError(
            f"{KEY}: {dataset!r} is not a built-in dataset ({', '.join(DATASETS)}), "
            f"an import path (package.module:function), or an existing .npz file or image "
            f"folder ({path} does not exist)")
    if found == "npz" and not path.is_file():
        raise ConfigError(f"{KEY}: {path} is not a file")
    if found == "images" and not path.is_dir():
        raise ConfigError(f"{KEY}: {path} is neither a .npz file nor an image folder")
    if found == "images" and not images.has_split_folders(path):
        raise ConfigError(f"{KEY}: the folder {path} has no train/ and test/ sub-folders "
                          "(expected train/<class>/<image> and test/<class>/<image>)")
    return str(path)


def source_record(dataset: str, given: Any) -> dict[str, str] | None:
    """``data.source`` for the resolved ``dataset``: its path and sha256 for a file or folder,
    ``None`` otherwise. A record of the same path with another hash is refused (the file
    changed since the config was written); a record of another path is replaced."""
    if kind(dataset) not in ("npz", "images"):
        return None
    sha = fingerprint(Path(dataset))
    if isinstance(given, Mapping) and given.get("path") == dataset \
            and given.get("sha256") not in (None, sha):
        raise ConfigError(
            f"data.source: {dataset} has changed since this config was written (sha256 "
            f"{str(given['sha256'])[:12]}... recorded, {sha[:12]}... now); restore it, or "
            "remove data.source to use the new contents")
    return {"path": dataset, "sha256": sha}


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, or of an image folder's images (relative names and bytes)."""
    if path.is_file():
        stat = path.stat()
        return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)
    return _folder_sha256(path, images.listing_key(path))


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _folder_sha256(root: Path, _key: tuple) -> str:
    digest = hashlib.sha256()
    for file in images.scan(root).files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        stat = file.stat()
        digest.update(bytes.fromhex(_file_sha256(str(file), stat.st_size, stat.st_mtime_ns)))
    return digest.hexdigest()


# ----- sizes without loading ----------------------------------------------------------------
def dataset_info(data: DataConfig) -> DatasetInfo | None:
    """Sizes, classes and sample shape of a file or folder dataset (``None`` for a function,
    which is only called when the run loads its data)."""
    found = kind(data.dataset)
    if found == "builtin":
        raise ValueError(f"{data.dataset} is a built-in dataset")
    if found == "function":
        return None
    path = absolute(data.dataset)
    if found == "npz":
        stat = path.stat()
        return _npz_info(str(path), stat.st_size, stat.st_mtime_ns)
    folder = images.scan(path, data.image_size)
    return DatasetInfo(len(folder.train), len(folder.test), len(folder.classes),
                       (folder.channels, *folder.size))


@functools.lru_cache(maxsize=32)
def _npz_info(path: str, _size: int, _mtime_ns: int) -> DatasetInfo:
    """Checks an ``.npz`` file from its array headers and labels (the samples are not read)."""
    where = f"{KEY}: {path}"
    try:
        with zipfile.ZipFile(path) as archive:
            members = {n.removesuffix(".npy") for n in archive.namelist()}
            missing = [k for k in KEYS if k not in members]
            if missing:
                raise ConfigError(f"{where} has no array {missing[0]!r} (it holds: "
                                  f"{', '.join(sorted(members)) or 'nothing'})")
            headers = {k: _header(archive, k) for k in KEYS}
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ConfigError(f"{where} is not a readable .npz file: {err}") from None
    check_layout({k: h[0] for k, h in headers.items()},
                 {k: h[1] for k, h in headers.items()}, where)
    with np.load(path, allow_pickle=False) as npz:
        given = check_num_classes(npz["num_classes"], where) if "num_classes" in members else None
        classes = check_labels(npz["y_train"], npz["y_test"], given, where)
    x_train, x_test = headers["x_train"][0], headers["x_test"][0]
    return DatasetInfo(x_train[0], x_test[0], classes, tuple(x_train[1:]))


def _member(archive: zipfile.ZipFile, key: str) -> str:
    """The archive member holding the array ``key`` (``numpy.load`` reads ``key.npy`` and
    ``key`` alike)."""
    return f"{key}.npy" if f"{key}.npy" in archive.namelist() else key


def _header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(_member(archive, key)) as f:
        shape, _, dtype = _npy_header(f)
    return shape, dtype


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from a ``.npy`` stream, which is left at the data."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read(f)
    return tuple(shape), bool(fortran_order), dtype


# ----- contents, before Ray ---------------------------------------------------------------
def check_contents(data: DataConfig) -> None:
    """Every value of a ``.npz`` dataset finite (the ``x`` arrays; labels are integers, checked
    at validation), every image of a folder readable with the first one's size (or resizable)
    and a mode that converts; ``ConfigError`` naming the first bad sample or file. Nothing to
    do for built-in names and functions (a function's arrays are checked when loaded)."""
    found = kind(data.dataset)
    if found in ("builtin", "function"):
        return
    path = absolute(data.dataset)
    if found == "npz":
        stat = path.stat()
        _check_npz_values(str(path), stat.st_size, stat.st_mtime_ns)
    else:
        images.check_files(images.scan(path, data.image_size))


@functools.lru_cache(maxsize=8)
def _check_npz_values(path: str, _size: int, _mtime_ns: int) -> None:
    """Streams each float ``x`` array of the file, a bounded number of samples at a time."""
    where = f"{KEY}: {path}"
    try:
        with zipfile.ZipFile(path) as archive:
            for key in ("x_train", "x_test"):
                with archive.open(_member(archive, key)) as f:
                    found = _first_non_finite_in(f)
                if found is not None:
                    raise non_finite_error(key, found, where)
    except ConfigError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{where} is not a readable .npz file: {err}") from None


def _first_non_finite_in(f: Any) -> tuple[int, str] | None:
    """:func:`first_non_finite` of the ``.npy`` array ``f`` holds, read step by step."""
    shape, fortran_order, dtype = _npy_header(f)
    if dtype.kind != "f":
        return None
    sample_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if fortran_order:  # a sample's values are not contiguous: read the array whole
        buffer = f.read(shape[0] * sample_bytes)
        if len(buffer) != shape[0] * sample_bytes:
            raise ValueError("the array is shorter than its header says")
        return first_non_finite(np.frombuffer(buffer, dtype).reshape(shape, order="F"))
    step = rows_per_step(shape[1:])
    for start in range(0, shape[0], step):
        rows = min(step, shape[0] - start)
        buffer = f.read(rows * sample_bytes)
        if len(buffer) != rows * sample_bytes:
            raise ValueError(f"the array ends after {start + len(buffer) // sample_bytes} of "
                             f"{shape[0]} samples")
        found = first_non_finite(np.frombuffer(buffer, dtype).reshape(rows, *shape[1:]))
        if found is not None:
            return start + found[0], found[1]
    return None


# ----- loading ------------------------------------------------------------------------------
def load(data: DataConfig) -> ArrayDataset:
    """Read a function, ``.npz`` or image-folder dataset into memory, checked."""
    found = kind(data.dataset)
    if found == "function":
        raw, num_classes, where = _call(data.dataset)
    else:
        path = absolute(data.dataset)
        resolve(data.dataset)
        _verify(path, data.source)
        where = f"{KEY}: {path}"
        if found == "npz":
            raw, num_classes = _read_npz(path, where)
        else:
            raw, num_classes = images.read(images.scan(path, data.image_size)), None
    return _pack(check_arrays(raw, num_classes, where))


def _verify(path: Path, source: Any) -> None:
    recorded = getattr(source, "sha256", None)
    if recorded is None or getattr(source, "path", None) != str(path):
        return
    sha = fingerprint(path)
    if sha != recorded:
        raise ConfigError(f"data.source: {path} here has sha256 {sha[:12]}..., not the "
                          f"{recorded[:12]}... the config recorded (another copy, or changed "
                          "since); every node needs the same file")


def _call(path: str) -> tuple[Mapping[str, Any], Any, str]:
    where = f"{KEY}: {path}"
    function = import_object(path, KEY)
    try:
        result = function()
    except Exception as err:  # noqa: BLE001 - the user's loader failed: say how, in one line
        message = " ".join(str(err).split())
        raise ConfigError(f"{where}() raised {type(err).__name__}: {message}") from None
    if isinstance(result, Mapping):
        missing = [k for k in KEYS if k not in result]
        if missing:
            raise ConfigError(f"{where} returned a mapping without {missing[0]!r} (it needs "
                              f"{', '.join(KEYS)}; num_classes is optional)")
        return result, result.get("num_classes"), where
    if isinstance(result, tuple | list) and len(result) == 4:
        return dict(zip(KEYS, result, strict=True)), None, where
    raise ConfigError(f"{where} returned {_describe(result)}; expected the tuple (x_train, "
                      "y_train, x_test, y_test) or a dict with those keys")


def _describe(value: Any) -> str:
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _read_npz(path: Path, where: str) -> tuple[dict[str, np.ndarray], Any]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in KEYS if k in npz.files}
            num_classes = npz["num_classes"] if "num_classes" in npz.files else None
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ConfigError(f"{where} is not a readable .npz file: {err}") from None
    missing = [k for k in KEYS if k not in raw]
    if missing:
        raise ConfigError(f"{where} has no array {missing[0]!r}")
    return raw, num_classes


def _pack(arrays: Any) -> ArrayDataset:
    from ray_lips.data.in_memory import pack_dataset

    mean, std = channel_stats(arrays.x_train)
    return pack_dataset(arrays.x_train, arrays.y_train, arrays.x_test, arrays.y_test,
                        arrays.num_classes, mean=mean, std=std, augment=False)
