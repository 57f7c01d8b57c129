"""Image folders as datasets: ``train/<class>/<image>`` and ``test/<class>/<image>``, read with PIL.

Classes are the sub-folders of ``train/`` in sorted order (label 0 is the first name);
``test/`` has sub-folders with the same names (a class may be missing there, not added).
Files with the extensions in :data:`IMAGE_EXTENSIONS` are images; other and hidden files are
skipped. Every image is converted to the kind of the first training image: grayscale (one
channel) if that one is, RGB (three channels) otherwise; alpha is dropped. All images must have
the first one's size, unless ``data.image_size: [H, W]`` is set: then every image is resized to
it (bilinear, aspect ratio not kept). Pixels stay ``uint8`` (scaled to [0, 1] per batch).

:func:`check_files` opens every image before Ray starts and refuses, naming the file, one that
would fail to load; :func:`read` decodes them when the run loads its data.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ray_lips.config import ConfigError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
KEY = "data.dataset"


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]  # (file, label), class by class, files sorted by name
    test: tuple[tuple[Path, int], ...]
    channels: int  # 1 (grayscale) or 3 (RGB)
    size: tuple[int, int]  # (H, W) of every sample
    resize: bool  # whether images are resized to ``size`` (``data.image_size`` is set)

    @property
    def files(self) -> list[Path]:
        return [path for path, _ in (*self.train, *self.test)]


def has_split_folders(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def _subfolders(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as entries:
        return sorted((e for e in entries if e.is_dir() and not e.name.startswith(".")),
                      key=lambda e: e.name)


def _images(path: Path) -> list[Path]:
    with os.scandir(path) as entries:
        return sorted(Path(e.path) for e in entries
                      if e.is_file() and not e.name.startswith(".")
                      and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def listing_key(root: Path) -> tuple:
    """Modification times of the folders: they change when images are added or removed."""
    dirs = [root, root / "train", root / "test"]
    dirs += [Path(e.path) for split in ("train", "test") for e in _subfolders(root / split)]
    return tuple((str(d), d.stat().st_mtime_ns) for d in dirs)


def scan(root: Path, image_size: tuple[int, int] | None = None) -> ImageFolder:
    """The folder's classes and files, and the sample shape (only the first image is opened)."""
    if not has_split_folders(root):
        raise ConfigError(f"{KEY}: the folder {root} has no train/ and test/ sub-folders "
                          "(expected train/<class>/<image> and test/<class>/<image>)")
    return _scan(root, None if image_size is None else tuple(image_size), listing_key(root))


@functools.lru_cache(maxsize=8)
def _scan(root: Path, image_size: tuple[int, int] | None, _key: tuple) -> ImageFolder:
    classes = [e.name for e in _subfolders(root / "train")]
    if not classes:
        raise ConfigError(f"{KEY}: {root / 'train'} holds no class folders (expected "
                          "train/<class>/<image>)")
    label = {name: k for k, name in enumerate(classes)}
    train = []
    for name in classes:
        files = _images(root / "train" / name)
        if not files:
            raise ConfigError(f"{KEY}: {root / 'train' / name} holds no images (files ending "
                              f"in {', '.join(IMAGE_EXTENSIONS)})")
        train += [(f, label[name]) for f in files]
    test = []
    for entry in _subfolders(root / "test"):
        if entry.name not in label:
            raise ConfigError(f"{KEY}: {entry.path} is not a class of train/ (classes: "
                              f"{', '.join(classes)})")
        test += [(f, label[entry.name]) for f in _images(Path(entry.path))]
    if not test:
        raise ConfigError(f"{KEY}: {root / 'test'} holds no images (expected "
                          "test/<class>/<image>)")
    mode, (w, h) = _header(train[0][0])
    channels = 1 if mode in _GRAYSCALE_MODES else 3
    size = (h, w) if image_size is None else (int(image_size[0]), int(image_size[1]))
    return ImageFolder(root, tuple(classes), tuple(train), tuple(test), channels, size,
                       resize=image_size is not None)


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except Exception as err:  # noqa: BLE001 - a file PIL cannot read, in one line
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: Exception) -> ConfigError:
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):  # its message repeats the path
        reason = "not an image format PIL knows, or not an image"
    else:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
    return ConfigError(f"{KEY}: {path} is not a readable image ({reason}); replace or remove "
                       "it")


def _wrong_size(path: Path, size: tuple[int, int], folder: ImageFolder) -> ConfigError:
    h, w = folder.size
    return ConfigError(
        f"{KEY}: {path} is {size[0]}x{size[1]} pixels but {folder.train[0][0]} is {w}x{h}; "
        "images must share one size, or set data.image_size: [H, W] to resize them all")


@functools.lru_cache(maxsize=64)
def _converts(mode: str, target: str) -> bool:
    """Whether PIL converts images of ``mode`` to ``target`` (tried on one pixel)."""
    from PIL import Image

    try:
        Image.new(mode, (1, 1)).convert(target)
    except Exception:  # noqa: BLE001 - any failure means no
        return False
    return True


def check_files(folder: ImageFolder) -> None:
    """Open every image and check, mostly from its header, that :func:`read` will load it:
    a format PIL knows, a mode that converts to the folder's kind, the first image's size
    (unless resized), and an intact file (see :func:`_intact`); a file whose integrity the
    header cannot prove is decoded. ``ConfigError`` naming the first file that fails."""
    from PIL import Image

    target = "L" if folder.channels == 1 else "RGB"
    h, w = folder.size
    for path in folder.files:
        try:
            with Image.open(path) as img:
                if not _converts(img.mode, target):
                    raise ConfigError(f"{KEY}: {path} has the image mode {img.mode!r}, which "
                                      f"PIL cannot convert to {target}; convert or remove it")
                if img.size != (w, h) and not folder.resize:
                    raise _wrong_size(path, img.size, folder)
                if _intact(img, path):
                    continue
            with Image.open(path) as img:  # nothing proves it whole: decode it, as read() will
                img.load()
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - a file PIL cannot read, in one line
            raise _unreadable(path, err) from None


def _intact(img: PILImage, path: Path) -> bool:
    """Whether the file is whole, proven without decoding its pixels: a PNG's chunk checksums
    and end chunk (``verify``), a JPEG's end-of-image marker. ``False`` proves nothing (other
    formats have neither; a PNG without its end chunk may still decode)."""
    if img.format == "PNG":
        try:
            img.verify()
        except Exception:  # noqa: BLE001 - decided by decoding instead
            return False
        return True
    if img.format == "JPEG":
        with open(path, "rb") as f:
            f.seek(-2, os.SEEK_END)
            return f.read(2) == b"\xff\xd9"
    return False


def read(folder: ImageFolder) -> dict[str, np.ndarray]:
    """Decode every image: ``x_*`` uint8 (N, C, H, W), ``y_*`` int64."""
    out = {}
    for split, items in (("train", folder.train), ("test", folder.test)):
        x = np.empty((len(items), folder.channels, *folder.size), dtype=np.uint8)
        for i, (path, _) in enumerate(items):
            x[i] = _decode(path, folder)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = np.asarray([y for _, y in items], dtype=np.int64)
    return out


def _decode(path: Path, folder: ImageFolder) -> np.ndarray:
    from PIL import Image

    h, w = folder.size
    try:
        with Image.open(path) as img:
            img = img.convert("L" if folder.channels == 1 else "RGB")
            if img.size != (w, h):
                if not folder.resize:
                    raise _wrong_size(path, img.size, folder)
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a file PIL cannot read, in one line
        raise _unreadable(path, err) from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
