"""Datasets as in-memory tensors.

Every dataset is loaded whole into an :class:`ArrayDataset` (train and test split). Images stay
``uint8`` (N, C, H, W) to save memory and are scaled and normalised per batch by
:func:`ray_lips.data.augment.prepare_batch`; the small datasets are ``float32`` already.
Datasets other than the built-in ones (an import path, a ``.npz`` file, an image folder) are
read by :mod:`ray_lips.data.byo`.

Only :func:`dataset_info` is needed by the config validator, so this module imports numpy and
torch lazily: importing it must stay cheap.
"""

from __future__ import annotations

import functools
import os
import random
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from ray_lips.data.in_memory import ArrayDataset, DatasetInfo, pack_dataset

if TYPE_CHECKING:
    import numpy as np

    from ray_lips.config import DataConfig

_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_TINY_MEAN = (0.4802, 0.4481, 0.3975)
_TINY_STD = (0.2302, 0.2265, 0.2262)

DIGITS_TEST_SIZE = 450  # of sklearn's 1797 digits; the other 1347 are the train split
_DIGITS_SPLIT_SEED = 0
TINY_FOLDER = "tiny-imagenet-200"
TINY_CACHE = "ray_lips_arrays.npz"
_TINY_SIZE = 64


_STATIC_INFO = {
    "cifar10": DatasetInfo(50000, 10000, 10, (3, 32, 32)),
    "cifar100": DatasetInfo(50000, 10000, 100, (3, 32, 32)),
    "tinyimagenet": DatasetInfo(100000, 10000, 200, (3, 64, 64)),
    "digits": DatasetInfo(1797 - DIGITS_TEST_SIZE, DIGITS_TEST_SIZE, 10, (1, 8, 8)),
    "mnist1d": DatasetInfo(4000, 1000, 10, (1, 40)),
}


def dataset_info(data: DataConfig) -> DatasetInfo | None:
    """Sizes, classes and sample shape of ``data.dataset``, without reading the samples.

    ``None`` for a dataset named by an import path: its function runs only when the data is
    loaded. A ``.npz`` file's labels are read (and its arrays' headers checked).
    """
    if data.dataset == "synthetic":
        s = data.synthetic
        return DatasetInfo(s.train_size, s.test_size, s.classes, tuple(s.shape))
    if data.dataset in _STATIC_INFO:
        return _STATIC_INFO[data.dataset]
    from ray_lips.data import byo

    byo.resolve(data.dataset)
    return byo.dataset_info(data)


def load_dataset(data: DataConfig) -> ArrayDataset:
    """Load the train and test split of ``data.dataset`` into memory (checked, for a dataset
    of the user's: ``ray_lips.config.ConfigError`` names what is wrong)."""
    loaders = {
        "cifar10": _load_cifar,
        "cifar100": _load_cifar,
        "tinyimagenet": _load_tinyimagenet,
        "digits": _load_digits,
        "mnist1d": _load_mnist1d,
        "synthetic": _load_synthetic,
    }
    if data.dataset not in loaders:
        from ray_lips.data import byo

        return byo.load(data)
    return loaders[data.dataset](data)


def _load_cifar(data: DataConfig) -> ArrayDataset:
    """CIFAR-10/100 through torchvision, which reads (or, when missing, downloads) the files."""
    import numpy as np
    from torchvision import datasets

    root = os.path.expanduser(data.root)
    if data.dataset == "cifar10":
        cls, classes, mean, std = datasets.CIFAR10, 10, _CIFAR10_MEAN, _CIFAR10_STD
    else:
        cls, classes, mean, std = datasets.CIFAR100, 100, _CIFAR100_MEAN, _CIFAR100_STD
    splits = []
    for train in (True, False):
        ds = cls(root=root, train=train, download=True)
        x = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
        splits += [x, np.asarray(ds.targets, dtype=np.int64)]
    return pack_dataset(*splits, classes, mean=mean, std=std, augment=True)


def _load_tinyimagenet(data: DataConfig) -> ArrayDataset:
    """Tiny-ImageNet from the official folder, decoded once into a cached ``.npz``."""
    import numpy as np

    folder = Path(os.path.expanduser(data.root)) / TINY_FOLDER
    if not (folder / "wnids.txt").is_file():
        raise FileNotFoundError(
            f"data.dataset: tinyimagenet expects the official dataset at {folder} (with "
            "wnids.txt, train/ and val/); it is not downloaded automatically: download "
            "tiny-imagenet-200.zip from the official site (http://cs231n.stanford.edu/"
            f"tiny-imagenet-200.zip) and unzip it into {folder.parent}"
        )
    wnids = (folder / "wnids.txt").read_text().split()
    cache = folder / TINY_CACHE
    arrays = None
    if cache.is_file():
        with np.load(cache) as npz:
            if list(npz["wnids"]) == wnids:
                arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    if arrays is None:
        arrays = _decode_tinyimagenet(folder, wnids)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, wnids=np.asarray(wnids), **arrays)
        os.replace(tmp, cache)  # atomic: concurrent loaders never see a partial file
    return pack_dataset(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], len(wnids),
        mean=_TINY_MEAN, std=_TINY_STD, augment=True,
    )


def _decode_tinyimagenet(folder: Path, wnids: list[str]) -> dict[str, np.ndarray]:
    import numpy as np

    label = {w: i for i, w in enumerate(wnids)}
    train = [
        (path, label[w])
        for w in wnids
        for path in sorted((folder / "train" / w / "images").glob("*.JPEG"))
    ]
    test = []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        if line.strip():
            name, wnid = line.split("\t")[:2]
            test.append((folder / "val" / "images" / name, label[wnid]))
    out = {}
    for split, items in (("train", train), ("test", test)):
        x = np.empty((len(items), 3, _TINY_SIZE, _TINY_SIZE), dtype=np.uint8)
        for i, (path, _) in enumerate(items):
            x[i] = _read_rgb(path)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = np.asarray([y for _, y in items], dtype=np.int64)
    return out


def _read_rgb(path: Path) -> np.ndarray:
    """One image as uint8 (3, 64, 64); grayscale images are converted to RGB."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (_TINY_SIZE, _TINY_SIZE):
            img = img.resize((_TINY_SIZE, _TINY_SIZE), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _load_digits(data: DataConfig) -> ArrayDataset:
    """sklearn's 8x8 digits, scaled to [0, 1], with a fixed stratified split."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=_DIGITS_SPLIT_SEED
    )
    return pack_dataset(x_tr, y_tr, x_te, y_te, 10)


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D offline (never ``get_dataset``, which downloads).

    ``make_dataset`` reseeds the global numpy and ``random`` RNGs; their states are restored.
    """
    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (
        np.asarray(d["x"], dtype=np.float32)[:, None],
        np.asarray(d["y"], dtype=np.int64),
        np.asarray(d["x_test"], dtype=np.float32)[:, None],
        np.asarray(d["y_test"], dtype=np.int64),
    )
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _load_mnist1d(data: DataConfig) -> ArrayDataset:
    x_tr, y_tr, x_te, y_te = (a.copy() for a in _mnist1d_arrays())
    return pack_dataset(x_tr, y_tr, x_te, y_te, 10)


def _load_synthetic(data: DataConfig) -> ArrayDataset:
    """Class templates plus Gaussian noise; fully determined by ``data.synthetic``.

    Each class has a smooth random template (unit variance); a sample is its class template
    plus ``noise`` times standard Gaussian noise. Labels are balanced (cycled, then shuffled).
    """
    import numpy as np

    s = data.synthetic
    shape = tuple(s.shape)
    key = repr((shape, s.classes, s.train_size, s.test_size, float(s.noise)))
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    templates = _smooth(rng.standard_normal((s.classes, *shape)), axes=range(2, len(shape) + 1))
    scale = templates.std(axis=tuple(range(1, templates.ndim)), keepdims=True)
    templates = (templates / np.where(scale > 0, scale, 1.0)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % s.classes).astype(np.int64)
        x = rng.standard_normal((n, *shape), dtype=np.float32)
        x *= np.float32(s.noise)
        x += templates[y]
        return x, y

    x_tr, y_tr = draw(s.train_size)
    x_te, y_te = draw(s.test_size)
    return pack_dataset(x_tr, y_tr, x_te, y_te, s.classes)


def _smooth(x: np.ndarray, axes: range, passes: int = 3) -> np.ndarray:
    """Low-pass ``x`` along ``axes`` with repeated 3-tap circular moving averages."""
    import numpy as np

    for axis in axes:
        for _ in range(passes):
            x = (np.roll(x, 1, axis=axis) + x + np.roll(x, -1, axis=axis)) / 3.0
    return x
