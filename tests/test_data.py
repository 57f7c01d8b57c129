"""Dataset loading (from files in their real on-disk formats) and batch preparation."""

from __future__ import annotations

import hashlib
import pickle
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import cifar

from ray_lips.config import DataConfig
from ray_lips.data import ArrayDataset, dataset_info, load_dataset, prepare_batch
from ray_lips.data import datasets as ds_module

# ---------------------------------------------------------------- CIFAR in the real format


class _Py2Str(str):
    """A str pickled the way Python 2 pickled byte strings (the official CIFAR files were
    written by Python 2): it loads as ``str`` with encoding='latin1' (what torchvision uses)
    and as ``bytes`` (b'data', b'labels', ...) with encoding='bytes'."""


class _Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj: str) -> None:
        raw = obj.encode("latin1")
        self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _write_pickle(path: Path, tree: dict) -> str:
    """Write ``tree`` (keys and names as Python 2 strings, protocol 2); return the md5."""

    def py2(v):
        if isinstance(v, str):
            return _Py2Str(v)
        if isinstance(v, list):
            return [py2(e) for e in v]
        return v

    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump({_Py2Str(k): py2(v) for k, v in tree.items()})
    return hashlib.md5(path.read_bytes()).hexdigest()


def _batch(rng: np.random.Generator, n: int, classes: int, label_key: str) -> dict:
    """One batch: b'data' is uint8 (n, 3072), each row the R, G, B 32x32 planes row-major."""
    return {
        "batch_label": "fake batch",
        label_key: rng.integers(0, classes, n).tolist(),
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }


@pytest.fixture
def no_download(monkeypatch):
    """Fail loudly instead of reaching the network if torchvision decides to download."""

    def refuse(*args, **kwargs):
        raise AssertionError("torchvision tried to download")

    monkeypatch.setattr(cifar, "download_and_extract_archive", refuse)


def _check_cifar(data: ArrayDataset, batches: list[dict], test: dict, label_key: str) -> None:
    x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    y = np.concatenate([b[label_key] for b in batches])
    assert data.x_train.dtype == torch.uint8 and data.x_train.shape == (len(x), 3, 32, 32)
    assert data.y_train.dtype == torch.int64
    np.testing.assert_array_equal(data.x_train.numpy(), x)
    np.testing.assert_array_equal(data.y_train.numpy(), y)
    np.testing.assert_array_equal(data.x_test.numpy(), test["data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(data.y_test.numpy(), test[label_key])
    # a single pixel: byte c*1024 + h*32 + w of a row is channel c, row h, column w
    row = batches[1]["data"][2]
    assert data.x_train[len(batches[0]["data"]) + 2, 2, 5, 7] == row[2 * 1024 + 5 * 32 + 7]
    assert data.sample_shape == (3, 32, 32) and data.augment
    assert len(data.mean) == len(data.std) == 3


def test_cifar10_through_torchvision(tmp_path, monkeypatch, no_download):
    # This exercises torchvision's real parsing path on files in the official format.
    # torchvision verifies each file's md5 against the class attributes train_list, test_list
    # and meta; our fake files have other checksums, so those attributes are patched.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 3, 10, "labels") for _ in range(5)]
    train_list = [
        [f"data_batch_{i + 1}", _write_pickle(folder / f"data_batch_{i + 1}", b)]
        for i, b in enumerate(batches)
    ]
    test = _batch(rng, 4, 10, "labels")
    test_md5 = _write_pickle(folder / "test_batch", test)
    meta_md5 = _write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    with open(folder / "data_batch_1", "rb") as f:  # the documented way to read the format
        assert set(pickle.load(f, encoding="bytes")) >= {b"data", b"labels"}
    monkeypatch.setattr(cifar.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(cifar.CIFAR10, "test_list", [["test_batch", test_md5]])
    meta = {"filename": "batches.meta", "key": "label_names", "md5": meta_md5}
    monkeypatch.setattr(cifar.CIFAR10, "meta", meta)

    data = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    _check_cifar(data, batches, test, "labels")
    assert data.num_classes == 10


def test_cifar100_through_torchvision(tmp_path, monkeypatch, no_download):
    # Same as above for CIFAR-100: one train file, fine labels; md5 attributes patched.
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train = _batch(rng, 6, 100, "fine_labels")
    train["coarse_labels"] = rng.integers(0, 20, 6).tolist()
    test = _batch(rng, 3, 100, "fine_labels")
    test["coarse_labels"] = rng.integers(0, 20, 3).tolist()
    names = {"fine_label_names": [f"f{i}" for i in range(100)],
             "coarse_label_names": [f"c{i}" for i in range(20)]}
    monkeypatch.setattr(cifar.CIFAR100, "train_list", [["train", _write_pickle(folder / "train",
                                                                               train)]])
    monkeypatch.setattr(cifar.CIFAR100, "test_list", [["test", _write_pickle(folder / "test",
                                                                             test)]])
    meta = {"filename": "meta", "key": "fine_label_names",
            "md5": _write_pickle(folder / "meta", names)}
    monkeypatch.setattr(cifar.CIFAR100, "meta", meta)

    data = load_dataset(DataConfig(dataset="cifar100", root=str(tmp_path)))
    x = train["data"].reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(data.x_train.numpy(), x)
    np.testing.assert_array_equal(data.y_train.numpy(), train["fine_labels"])
    np.testing.assert_array_equal(data.y_test.numpy(), test["fine_labels"])
    assert data.x_test.shape == (3, 3, 32, 32) and data.x_test.dtype == torch.uint8
    assert data.x_train[4, 1, 31, 0] == train["data"][4][1024 + 31 * 32]
    assert data.num_classes == 100 and data.augment


# ---------------------------------------------------------------- Tiny-ImageNet


def _color(label: int, i: int) -> tuple[int, int, int]:
    return (40 + 60 * label, 200 - 50 * i, 90 + 30 * (label + i) % 120)


def _write_tiny(root: Path, wnids: list[str], per_class: int = 2) -> Path:
    """A miniature ``tiny-imagenet-200`` tree with flat-colored 64x64 JPEGs."""
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    annotations = []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), _color(label, i)).save(images / f"{wnid}_{i}.JPEG",
                                                              quality=95)
        name = f"val_{label}.JPEG"
        Image.new("L", (64, 64), 30 + 70 * label).save(folder / "val" / "images" / name)
        annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return folder


def test_tinyimagenet_decodes_once_and_caches(tmp_path):
    wnids = ["n0300", "n0100", "n0200"]  # not sorted: labels must follow the file's order
    folder = _write_tiny(tmp_path, wnids)
    config = DataConfig(dataset="tinyimagenet", root=str(tmp_path))

    data = load_dataset(config)
    assert data.x_train.shape == (6, 3, 64, 64) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (3, 3, 64, 64) and data.x_test.dtype == torch.uint8
    assert data.y_train.tolist() == [0, 0, 1, 1, 2, 2] and data.y_test.tolist() == [0, 1, 2]
    assert data.num_classes == 3 and data.sample_shape == (3, 64, 64) and data.augment
    for n, (label, i) in enumerate([(lab, i) for lab in range(3) for i in range(2)]):
        pixel = data.x_train[n, :, 10, 20].int()
        assert (pixel - torch.tensor(_color(label, i))).abs().max() <= 4  # JPEG is lossy
    gray = data.x_test[2].int()  # a grayscale val image becomes three equal channels
    assert (gray - (30 + 140)).abs().max() <= 4

    cache = folder / ds_module.TINY_CACHE
    assert cache.is_file()
    for jpeg in folder.rglob("*.JPEG"):
        jpeg.unlink()
    again = load_dataset(config)  # only the cache is left to read
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)


def test_tinyimagenet_missing_folder_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200") as err:
        load_dataset(DataConfig(dataset="tinyimagenet", root=str(tmp_path)))
    assert str(tmp_path) in str(err.value) and "download" in str(err.value)


# ---------------------------------------------------------------- small datasets


def test_digits_fixed_stratified_split():
    data = load_dataset(DataConfig(dataset="digits"))
    assert data.x_train.shape == (1347, 1, 8, 8) and data.x_test.shape == (450, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    everything = torch.bincount(torch.cat([data.y_train, data.y_test]))
    expected = everything * 450 / 1797  # stratified: test share of every class is ~ 1/4
    assert (torch.bincount(data.y_test) - expected).abs().max() <= 1
    assert not data.augment and len(data.mean) == 1
    assert torch.equal(load_dataset(DataConfig(dataset="digits")).x_test, data.x_test)


def test_mnist1d_offline_without_disturbing_global_rngs(monkeypatch):
    import mnist1d.data

    def no_download(*args, **kwargs):
        raise AssertionError("get_dataset downloads; the loader must use make_dataset")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    ds_module._mnist1d_arrays.cache_clear()
    np.random.seed(7)
    random.seed(7)
    data = load_dataset(DataConfig(dataset="mnist1d"))
    after = (np.random.random(), random.random())
    np.random.seed(7)
    random.seed(7)
    assert after == (np.random.random(), random.random())

    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10 and not data.augment
    # The statistics are computed in float64 (numpy) from the stored float32 values: the same
    # sums in another order differ by at most n * 2**-53 * mean|x| (population std, as used).
    x = data.x_train.numpy().astype(np.float64)
    bound = x.size * 2.0**-53 * np.abs(x).mean()
    assert bound < 1e-10
    np.testing.assert_allclose(data.mean, [x.mean()], rtol=0, atol=bound)
    np.testing.assert_allclose(data.std, [x.std()], rtol=0, atol=bound)
    data.x_train.zero_()  # callers own their tensors; the in-process cache is unaffected
    assert load_dataset(DataConfig(dataset="mnist1d")).x_train.abs().sum() > 0


def _synthetic(**kw) -> DataConfig:
    base = dict(shape=(2, 16), classes=4, train_size=200, test_size=100, noise=1.0)
    base.update(kw)
    return DataConfig(dataset="synthetic", synthetic=base)


@pytest.mark.parametrize("shape", [(2, 16), (3, 8, 8)])
def test_synthetic_is_seeded_and_learnable(shape):
    config = _synthetic(shape=shape)
    data = load_dataset(config)
    assert data.x_train.shape == (200, *shape) and data.x_test.shape == (100, *shape)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 4 and not data.augment and len(data.mean) == shape[0]
    assert torch.bincount(data.y_train).tolist() == [50] * 4
    again = load_dataset(config)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    assert not torch.equal(load_dataset(_synthetic(shape=shape, noise=0.9)).x_train, data.x_train)
    # nearest class mean separates the classes far better than chance (0.25)
    flat = data.x_train.flatten(1)
    centroids = torch.stack([flat[data.y_train == c].mean(0) for c in range(4)])
    predicted = torch.cdist(data.x_test.flatten(1), centroids).argmin(1)
    assert (predicted == data.y_test).float().mean() > 0.8


@pytest.mark.parametrize("config", [DataConfig(dataset="digits"), DataConfig(dataset="mnist1d"),
                                    _synthetic(shape=(3, 8, 8), classes=7)])
def test_dataset_info_matches_loaded_data(config):
    info, data = dataset_info(config), load_dataset(config)
    assert info.train_size == len(data.x_train) == len(data.y_train)
    assert info.test_size == len(data.x_test) == len(data.y_test)
    assert info.num_classes == data.num_classes
    assert info.sample_shape == data.sample_shape == tuple(data.x_train.shape[1:])


def test_static_dataset_info():
    info = dataset_info(DataConfig(dataset="tinyimagenet"))
    assert (info.train_size, info.test_size, info.num_classes) == (100000, 10000, 200)
    assert dataset_info(DataConfig(dataset="cifar100")).sample_shape == (3, 32, 32)


def test_unknown_dataset_names_the_key():
    bogus = types.SimpleNamespace(dataset="imagenet")
    with pytest.raises(ValueError, match="data.dataset"):
        dataset_info(bogus)
    with pytest.raises(ValueError, match="data.dataset"):
        load_dataset(bogus)


# ---------------------------------------------------------------- prepare_batch

MEAN, STD = (0.5, 0.25, 0.1), (0.5, 0.25, 0.2)


def test_prepare_batch_scales_and_normalises_uint8():
    x = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    out = prepare_batch(x, MEAN, STD, augment=False)
    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == x.device
    for c, expected in enumerate([(0.2 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, (0.2 - 0.1) / 0.2]):
        torch.testing.assert_close(out[:, c], torch.full((2, 4, 4), expected))


def test_prepare_batch_float_and_1d_input_is_only_normalised():
    x = torch.randn(5, 2, 40)
    original = x.clone()
    out = prepare_batch(x, (1.0, -1.0), (2.0, 0.5), augment=True)  # no augmentation for 1-D
    expected = (x - torch.tensor([1.0, -1.0])[None, :, None]) / torch.tensor([2.0, 0.5])[:, None]
    torch.testing.assert_close(out, expected)
    assert torch.equal(x, original)


def _images(n: int = 16, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def test_augmentation_is_deterministic_given_the_generator():
    x = _images()

    def run(seed: int) -> torch.Tensor:
        return prepare_batch(x, MEAN, STD, augment=True,
                             generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_augmentation_is_a_padded_crop_with_optional_flip():
    x, pad = _images(), 2
    plain = prepare_batch(x, MEAN, STD, augment=False)
    out = prepare_batch(x, MEAN, STD, augment=True, pad=pad,
                        generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert not torch.equal(out, plain)  # pixels moved
    padded = torch.nn.functional.pad(plain, (pad,) * 4)  # normalise first, then zero-pad
    for n in range(len(x)):
        candidates = [
            view
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for view in [padded[n, :, dy:dy + 8, dx:dx + 8]]
            for view in (view, view.flip(-1))
        ]
        assert any(torch.equal(out[n], c) for c in candidates), f"sample {n} is not a crop"


def test_augmentation_without_padding_only_flips():
    x = _images(32)
    plain = prepare_batch(x, MEAN, STD, augment=False)
    out = prepare_batch(x, MEAN, STD, augment=True, pad=0,
                        generator=torch.Generator().manual_seed(0))
    flipped = [not torch.equal(o, p) for o, p in zip(out, plain, strict=True)]
    assert 0 < sum(flipped) < len(x)
    for o, p, f in zip(out, plain, flipped, strict=True):
        assert torch.equal(o, p.flip(-1) if f else p)
