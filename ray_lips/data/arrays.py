"""The arrays a bring-your-own dataset provides, checked with one message per problem.

The contract (README, "Bring your own dataset and model"): ``x_train``, ``y_train``, ``x_test``,
``y_test``, numpy arrays or anything ``numpy.asarray`` takes (CPU tensors included):

- ``x``: (N, C, H, W) images or (N, C, L) signals, the same sample shape in both splits, at
  least one sample each; ``uint8`` (pixels: scaled to [0, 1] per batch, like CIFAR) or any other
  real number type (cast to float32 and used as is); finite;
- ``y``: (N,) integers in [0, num_classes); ``num_classes`` is given or the largest label + 1,
  and at least 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_lips.config import ConfigError

KEYS = ("x_train", "y_train", "x_test", "y_test")
_CHUNK = 4096  # samples per step of the checks and statistics that scan whole arrays
_STEP_VALUES = 1 << 22  # ... and at most this many values per step (bounds the temporaries)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def rows_per_step(sample_shape: tuple[int, ...]) -> int:
    """How many samples of ``sample_shape`` one step of a whole-array scan takes."""
    values = int(np.prod(sample_shape, dtype=np.int64)) or 1
    return max(1, min(_CHUNK, _STEP_VALUES // values))


@dataclass
class Arrays:
    x_train: np.ndarray  # uint8 or float32, (N, C, H, W) or (N, C, L)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def check_layout(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype],
                 where: str) -> None:
    """The rules that need no values (an ``.npz`` file's headers are enough)."""
    for split in ("train", "test"):
        x, y = f"x_{split}", f"y_{split}"
        xs, ys = tuple(shapes[x]), tuple(shapes[y])
        if len(xs) not in (3, 4) or any(d < 1 for d in xs[1:]):
            raise ConfigError(
                f"{where}: {x} has shape {xs}; expected (N, C, H, W) images or (N, C, L) "
                "signals (add a channel axis with x[:, None])")
        if xs[0] < 1:
            raise ConfigError(f"{where}: {x} holds no samples")
        if dtypes[x].kind not in "uif":
            raise ConfigError(f"{where}: {x} has dtype {dtypes[x]}; expected numbers (uint8 "
                              "pixels, or floats)")
        if len(ys) != 1:
            raise ConfigError(f"{where}: {y} has shape {ys}; expected one label per sample, (N,)")
        if ys[0] != xs[0]:
            raise ConfigError(f"{where}: {x} holds {xs[0]} samples but {y} {ys[0]} labels")
        if dtypes[y].kind not in "ui":
            raise ConfigError(f"{where}: {y} has dtype {dtypes[y]}; labels must be integers "
                              "0 .. classes - 1")
    if tuple(shapes["x_train"])[1:] != tuple(shapes["x_test"])[1:]:
        raise ConfigError(
            f"{where}: x_train samples have shape {tuple(shapes['x_train'])[1:]} but x_test "
            f"samples {tuple(shapes['x_test'])[1:]}; both splits need the same sample shape")


def check_num_classes(value: Any, where: str) -> int | None:
    """An explicitly given class count: an integer >= 2 (``None``: not given)."""
    if value is None:
        return None
    number = np.asarray(value)
    if number.shape != () or number.dtype.kind not in "ui" or int(number) < 2:
        raise ConfigError(f"{where}: num_classes must be one integer >= 2, got {value!r}")
    return int(number)


def check_labels(y_train: np.ndarray, y_test: np.ndarray, num_classes: int | None,
                 where: str) -> int:
    """The class count; every label must lie in [0, num_classes)."""
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if int(y.min()) < 0:
            raise ConfigError(f"{where}: {name} holds the label {int(y.min())}; labels must be "
                              ">= 0")
        if num_classes is not None and int(y.max()) >= num_classes:
            raise ConfigError(f"{where}: {name} holds the label {int(y.max())}, out of range "
                              f"for {num_classes} classes (labels 0 .. {num_classes - 1})")
    classes = num_classes if num_classes is not None else int(max(y_train.max(),
                                                                  y_test.max())) + 1
    if classes < 2:
        raise ConfigError(f"{where}: the labels name only {classes} class; a classifier needs "
                          "at least 2")
    return classes


def check_arrays(raw: Mapping[str, Any], num_classes: Any, where: str) -> Arrays:
    """The user's arrays, checked against the contract and converted (x: uint8 or float32,
    y: int64); ``ConfigError`` beginning with ``where`` otherwise."""
    arrays = {}
    for key in KEYS:
        try:
            arrays[key] = np.asarray(raw[key])
        except Exception as err:  # noqa: BLE001 - whatever the value was, say so in one line
            raise ConfigError(f"{where}: {key} is not an array: {type(err).__name__}: "
                              f"{err}") from None
    check_layout({k: a.shape for k, a in arrays.items()},
                 {k: a.dtype for k, a in arrays.items()}, where)
    classes = check_labels(arrays["y_train"], arrays["y_test"],
                           check_num_classes(num_classes, where), where)
    xs = {}
    for key in ("x_train", "x_test"):
        x = arrays[key]
        check_finite(x, key, where)
        xs[key] = np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32))
    return Arrays(xs["x_train"], arrays["y_train"].astype(np.int64), xs["x_test"],
                  arrays["y_test"].astype(np.int64), classes)


def first_non_finite(x: np.ndarray) -> tuple[int, str] | None:
    """The first sample of ``x`` that is not finite once cast to float32 (what training sees),
    with what it holds (``NaN``, ``inf``, ``-inf`` or a value beyond float32's range); ``None``
    when every value is finite (integer arrays always are)."""
    if x.dtype.kind != "f":
        return None
    step = rows_per_step(x.shape[1:])
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf
            cast = chunk.astype(np.float32, copy=False)
        finite = np.isfinite(cast).reshape(len(chunk), -1).all(axis=1)
        if finite.all():
            continue
        index = int(np.argmin(finite))
        values = chunk[index].ravel()
        value = float(values[np.argmin(np.isfinite(cast[index].ravel()))])
        if np.isnan(value):
            return start + index, "NaN"
        if np.isinf(value):
            return start + index, "inf" if value > 0 else "-inf"
        return start + index, f"{value:g}, beyond float32's range (+-{_FLOAT32_MAX:.3g})"
    return None


def non_finite_error(key: str, found: tuple[int, str], where: str) -> ConfigError:
    """The one-line error for the first sample :func:`first_non_finite` found."""
    index, value = found
    return ConfigError(f"{where}: {key} holds {value} at sample {index} (counting from 0); "
                       "every value must be finite: fix or drop that sample")


def check_finite(x: np.ndarray, key: str, where: str) -> None:
    """``ConfigError`` naming the first sample of ``x`` that holds a NaN or infinite value."""
    found = first_non_finite(x)
    if found is not None:
        raise non_finite_error(key, found, where)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the model inputs ``x`` stands for (uint8
    pixels scaled to [0, 1]), computed in chunks (two passes, float64)."""
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    axes = (0, *range(2, x.ndim))
    count = x.size // x.shape[1]
    step = rows_per_step(x.shape[1:])
    total = np.zeros(x.shape[1])
    for i in range(0, len(x), step):
        total += x[i:i + step].sum(axis=axes, dtype=np.float64)
    mean = total / count / scale
    squares = np.zeros(x.shape[1])
    view = (1, -1) + (1,) * (x.ndim - 2)
    for i in range(0, len(x), step):
        chunk = x[i:i + step].astype(np.float64) / scale - mean.reshape(view)
        squares += (chunk * chunk).sum(axis=axes)
    std = np.sqrt(squares / count)
    return tuple(float(v) for v in mean), tuple(max(float(v), 1e-8) for v in std)
