"""A dataset held in memory (:class:`ArrayDataset`), its description without the samples
(:class:`DatasetInfo`), and :func:`pack_dataset`, which makes the one from numpy arrays: what
every loader returns, built-in (:mod:`ray_lips.data.datasets`) or the user's
(:mod:`ray_lips.data.byo`). numpy and torch are imported on use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class DatasetInfo:
    train_size: int
    test_size: int
    num_classes: int
    sample_shape: tuple[int, ...]  # (C, H, W) for images, (C, L) for 1-D signals


@dataclass
class ArrayDataset:
    x_train: torch.Tensor  # uint8 (N, C, H, W) for cifar/tinyimagenet; float32 otherwise
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    sample_shape: tuple[int, ...]
    mean: tuple[float, ...]  # per channel, applied after uint8 -> [0, 1] scaling
    std: tuple[float, ...]
    augment: bool  # whether crop + flip augmentation suits this data


def pack_dataset(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    augment: bool = False,
) -> ArrayDataset:
    """Wrap numpy arrays as tensors; mean/std default to per-channel train statistics."""
    import numpy as np
    import torch

    if mean is None or std is None:
        axes = (0, *range(2, x_train.ndim))
        mean = tuple(float(v) for v in x_train.mean(axis=axes, dtype=np.float64))
        std = tuple(max(float(v), 1e-8) for v in x_train.std(axis=axes, dtype=np.float64))
    return ArrayDataset(
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
        sample_shape=tuple(x_train.shape[1:]),
        mean=tuple(mean),
        std=tuple(std),
        augment=augment,
    )
