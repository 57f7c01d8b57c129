"""Bring your own dataset (import path, .npz, image folder) and model (import path): what loads,
what the config records, and one clear error per mistake."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from ray_lips.config import ConfigError, ExperimentConfig, validate_config
from ray_lips.config.checks import check_before_ray, check_config
from ray_lips.data import dataset_info, load_dataset
from ray_lips.models import build_model, check_lips_eligible, eligible_parameter_names


def checked(tree: dict) -> ExperimentConfig:
    """The config as a command takes it: validated, then checked (files read, imports made)."""
    return check_config(validate_config(tree))

DATA = textwrap.dedent("""
    import numpy as np

    def arrays(n_train=40, n_test=20):
        rng = np.random.default_rng(0)
        y_train = np.arange(n_train) % 2
        y_test = np.arange(n_test) % 2
        x_train = rng.normal(size=(n_train, 1, 8, 8)).astype(np.float32)
        x_test = rng.normal(size=(n_test, 1, 8, 8)).astype(np.float32)
        x_train += y_train[:, None, None, None]
        x_test += y_test[:, None, None, None]
        return x_train, y_train, x_test, y_test

    def load():
        return arrays()

    def load_dict():
        x_train, y_train, x_test, y_test = arrays()
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
                "num_classes": 3}

    def three():
        return arrays()[:3]

    def number():
        return 7

    def missing_key():
        return {"x_train": 1, "y_train": 2, "x_test": 3}

    def fails():
        raise RuntimeError("no data here")

    def float_labels():
        x_train, y_train, x_test, y_test = arrays()
        return x_train, y_train.astype(float), x_test, y_test

    def flat():
        x_train, y_train, x_test, y_test = arrays()
        return x_train.reshape(40, 64), y_train, x_test.reshape(20, 64), y_test

    def nan_in_train():
        x_train, y_train, x_test, y_test = arrays()
        x_train[12, 0, 3, 4] = np.nan
        x_train[30, 0, 0, 0] = np.inf
        return x_train, y_train, x_test, y_test

    def inf_in_test():
        x_train, y_train, x_test, y_test = arrays()
        x_test = x_test.astype(np.float64)
        x_test[5, 0, 7, 7] = -np.inf
        return x_train, y_train, x_test, y_test

    def beyond_float32():
        x_train, y_train, x_test, y_test = arrays()
        x_train = x_train.astype(np.float64)
        x_train[2, 0, 1, 1] = 1e39
        return x_train, y_train, x_test, y_test

    NOT_A_FUNCTION = 3
""")

NETS = textwrap.dedent("""
    import torch
    from torch import nn

    def build(sample_shape, num_classes):
        c = sample_shape[0]
        return nn.Sequential(
            nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def mlp(sample_shape, num_classes):
        size = 1
        for s in sample_shape:
            size *= s
        return nn.Sequential(nn.Flatten(), nn.Linear(size, num_classes))

    def not_a_module(sample_shape, num_classes):
        return "a model"

    def wrong_output(sample_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes + 1))

    def wrong_input(sample_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(5, num_classes))

    def no_parameters(sample_shape, num_classes):
        return nn.Flatten()

    def raises(sample_shape, num_classes):
        raise ValueError("unsupported shape " + str(sample_shape))
""")


@pytest.fixture
def pkg(tmp_path, monkeypatch) -> str:
    """A fresh package ``byo_<hex>`` with ``data`` and ``nets`` modules in tmp_path, which is
    on the Python path (as a user's folder on PYTHONPATH)."""
    name = f"byo_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "data.py").write_text(DATA)
    (tmp_path / name / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _tree(dataset: str, model: str = "smallcnn", **data) -> dict:
    return {"data": {"dataset": dataset, "clients": 2, "train_per_client": 10,
                     "test_per_client": 5, "alpha": 0.5, **data},
            "model": model, "resources": {"pools": 1}}


def _arrays(n_train: int = 30, n_test: int = 12, classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x_train": rng.integers(0, 256, (n_train, 3, 6, 5), dtype=np.uint8),
            "y_train": np.arange(n_train) % classes,
            "x_test": rng.integers(0, 256, (n_test, 3, 6, 5), dtype=np.uint8),
            "y_test": np.arange(n_test) % classes}


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _error(tree: dict) -> str:
    with pytest.raises(ConfigError) as err:
        checked(tree)
    return str(err.value)


# ----- an import path ---------------------------------------------------------------------
def test_a_function_dataset_is_checked_at_load_and_recorded_as_given(pkg):
    cfg = checked(_tree(f"{pkg}.data:load"))
    assert cfg.data.dataset == f"{pkg}.data:load" and cfg.data.source is None
    assert dataset_info(cfg.data) is None  # the function runs only when the data is loaded
    data = load_dataset(cfg.data)
    assert data.x_train.shape == (40, 1, 8, 8) and data.x_train.dtype == torch.float32
    assert data.y_test.dtype == torch.int64 and data.num_classes == 2
    assert data.sample_shape == (1, 8, 8) and not data.augment
    # The statistics are computed in float64 from the stored float32 values: the same sums in
    # another order differ by at most n * 2**-53 * mean|x| (n = 2560 values), far below 1e-12.
    x = data.x_train.numpy().astype(np.float64)
    bound = x.size * 2.0**-53 * np.abs(x).mean()
    assert bound < 1e-12
    np.testing.assert_allclose(data.mean, [x.mean()], rtol=0, atol=bound)
    np.testing.assert_allclose(data.std, [x.std()], rtol=0, atol=bound)
    as_dict = load_dataset(checked(_tree(f"{pkg}.data:load_dict")).data)
    assert as_dict.num_classes == 3 and torch.equal(as_dict.x_train, data.x_train)


@pytest.mark.parametrize("function, message", [
    ("three", "returned a tuple of 3 items"),
    ("number", "returned a int"),
    ("missing_key", "without 'y_test'"),
    ("fails", "raised RuntimeError: no data here"),
    ("float_labels", "y_train has dtype float64; labels must be integers"),
    ("flat", "x_train has shape (40, 64); expected (N, C, H, W) images or (N, C, L) signals "
             "(add a channel axis with x[:, None])"),
    ("nan_in_train", "x_train holds NaN at sample 12 (counting from 0); every value must be "
                     "finite"),
    ("inf_in_test", "x_test holds -inf at sample 5 (counting from 0)"),
    ("beyond_float32", "x_train holds 1e+39, beyond float32's range (+-3.4e+38) at sample 2 "),
])
def test_a_function_returning_the_wrong_thing_fails_at_load(pkg, function, message):
    cfg = checked(_tree(f"{pkg}.data:{function}"))
    with pytest.raises(ConfigError, match="^data.dataset: ") as err:
        load_dataset(cfg.data)
    assert message in str(err.value) and "\n" not in str(err.value)
    # the driver loads it on Ray: the error crosses a process boundary as it is
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is ConfigError and str(again) == str(err.value)


@pytest.mark.parametrize("path, message", [
    ("no_such_pkg_123.data:load", "no module 'no_such_pkg_123' on the Python path"),
    ("{pkg}.nothing:load", "no module '{pkg}.nothing'"),
    ("{pkg}.data:absent", "has no attribute 'absent'"),
    ("{pkg}.data:NOT_A_FUNCTION", "is a int, not a function"),
    ("{pkg}.broken:load", "importing '{pkg}.broken' failed: NameError"),
])
def test_an_import_path_that_does_not_resolve_stops_validation(pkg, tmp_path, path, message):
    (tmp_path / pkg / "broken.py").write_text("undefined_name + 1\n")
    text = _error(_tree(path.format(pkg=pkg)))
    assert "data.dataset: " in text and message.format(pkg=pkg) in text


# ----- .npz ----------------------------------------------------------------------------------
def test_an_npz_dataset_is_recorded_by_absolute_path_and_sha256(tmp_path, monkeypatch):
    arrays = _arrays()
    path = _npz(tmp_path / "mine.npz", **arrays)
    monkeypatch.chdir(tmp_path)
    cfg = checked(_tree("mine.npz"))
    assert cfg.data.dataset == str(path)
    assert cfg.data.source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert yaml.safe_load(cfg.to_yaml())["data"]["source"]["sha256"] == cfg.data.source.sha256
    info = dataset_info(cfg.data)
    assert (info.train_size, info.test_size, info.num_classes, info.sample_shape) == (
        30, 12, 3, (3, 6, 5))
    data = load_dataset(cfg.data)
    assert data.x_train.dtype == torch.uint8
    np.testing.assert_array_equal(data.x_test.numpy(), arrays["x_test"])
    scaled = arrays["x_train"] / 255.0
    np.testing.assert_allclose(data.mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(data.std, scaled.std(axis=(0, 2, 3)), rtol=1e-9)


def test_a_changed_npz_is_refused_unless_the_record_is_for_another_path(tmp_path):
    path = _npz(tmp_path / "mine.npz", **_arrays())
    recorded = checked(_tree(str(path))).to_dict()
    _npz(path, **_arrays(n_train=33))
    assert "data.source: " in _error(recorded) and "has changed" in _error(recorded)
    stale = checked(_tree(str(path)))  # a new config: the new contents are recorded
    assert stale.data.source.sha256 != recorded["data"]["source"]["sha256"]
    other = _npz(tmp_path / "other.npz", **_arrays())
    moved = checked({**recorded, "data": {**recorded["data"], "dataset": str(other)}})
    assert moved.data.source.path == str(other)  # a record of another file is replaced
    # a load checks the file against the record (e.g. another node's copy)
    cfg = checked(_tree(str(other)))
    _npz(other, **_arrays(n_test=13))
    with pytest.raises(ConfigError, match="data.source: .* every node needs the same file"):
        load_dataset(cfg.data)


def _without(arrays: dict, key: str) -> dict:
    return {k: v for k, v in arrays.items() if k != key}


def _with(**changes) -> dict:
    return {**_arrays(), **changes}


@pytest.mark.parametrize("arrays, message", [
    (_without(_arrays(), "y_test"), "has no array 'y_test'"),
    (_with(x_train=np.zeros((30, 30))), "x_train has shape (30, 30); expected (N, C, H, W)"),
    (_with(x_test=np.full((12, 3, 6, 5), "a")), "x_test has dtype <U1; expected numbers"),
    (_with(x_train=np.zeros((30, 3, 6, 5), dtype=bool)), "x_train has dtype bool"),
    (_with(y_train=np.zeros(29, dtype=int)), "x_train holds 30 samples but y_train 29 labels"),
    (_with(x_test=np.zeros((12, 3, 5, 5))), "both splits need the same sample shape"),
    (_with(y_test=np.zeros(12)), "y_test has dtype float64; labels must be integers"),
    (_with(y_train=np.arange(30) - 1), "y_train holds the label -1; labels must be >= 0"),
    (_with(num_classes=2), "y_train holds the label 2, out of range for 2 classes"),
    (_with(num_classes=1.5), "num_classes must be one integer >= 2"),
    (_with(y_train=np.zeros(30, dtype=int), y_test=np.zeros(12, dtype=int)),
     "the labels name only 1 class"),
    (_with(x_test=np.zeros((0, 3, 6, 5)), y_test=np.zeros(0, dtype=int)), "x_test holds no "
                                                                              "samples"),
])
def test_a_bad_npz_stops_validation_with_one_message(tmp_path, arrays, message):
    path = _npz(tmp_path / "bad.npz", **arrays)
    text = _error(_tree(str(path)))
    assert f"data.dataset: {path}" in text and message in text and "\n" not in text


def test_an_npz_of_python_objects_is_never_unpickled(tmp_path):
    path = _npz(tmp_path / "objects.npz", **_with(x_train=np.empty((30, 3, 6, 5), dtype=object)))
    assert "x_train has dtype object" in _error(_tree(str(path)))
    (tmp_path / "fake.npz").write_text("not a zip")
    assert "is not a readable .npz file" in _error(_tree(str(tmp_path / "fake.npz")))


def _checked_before_ray(dataset: Path, tmp_path: Path, **data) -> str:
    """The one-line error of the checks ``ray-lips run`` makes before it starts Ray."""
    cfg = checked({**_tree(str(dataset), **data), "output": str(tmp_path / "runs")})
    with pytest.raises(ConfigError) as err:
        check_before_ray(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


def _x(dtype=np.float32, n: int = 30, shape=(3, 6, 5)) -> np.ndarray:
    return np.random.default_rng(3).normal(size=(n, *shape)).astype(dtype)


def _bad(x: np.ndarray, sample: int, value: float) -> np.ndarray:
    x = x.copy()
    x[sample, -1, 2, 1] = value
    return x


@pytest.mark.parametrize("arrays, compressed, message", [
    ({"x_train": _bad(_x(), 12, np.nan), "x_test": _x(n=12)}, False,
     "x_train holds NaN at sample 12 (counting from 0); every value must be finite: fix or "
     "drop that sample"),
    ({"x_train": _bad(_bad(_x(), 29, np.nan), 7, np.inf), "x_test": _x(n=12)}, True,
     "x_train holds inf at sample 7 "),
    ({"x_train": _x(np.float16), "x_test": _bad(_x(np.float64, n=12), 11, -np.inf)}, False,
     "x_test holds -inf at sample 11 "),
    ({"x_train": _bad(_x(np.float64), 4, 1e39), "x_test": _x(n=12)}, False,
     "x_train holds 1e+39, beyond float32's range (+-3.4e+38) at sample 4 "),
    ({"x_train": np.asfortranarray(_bad(_x(), 21, np.nan)), "x_test": _x(n=12)}, False,
     "x_train holds NaN at sample 21 "),
])
def test_a_non_finite_value_in_an_npz_stops_before_ray_naming_the_sample(tmp_path, monkeypatch,
                                                                        arrays, compressed,
                                                                        message):
    monkeypatch.setattr("ray_lips.data.arrays._STEP_VALUES", 200)  # 2 samples per read
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "mine.npz", **_with(**arrays))
    path = tmp_path / "mine.npz"
    assert _checked_before_ray(path, tmp_path).startswith(f"data.dataset: {path}: {message}")
    # the load, which a driver on another node may make, refuses it the same way
    with pytest.raises(ConfigError, match="^data.dataset: .*at sample") as err:
        load_dataset(checked(_tree(str(path))).data)
    assert message in str(err.value)


def test_finite_float_and_integer_npz_arrays_pass_the_checks_before_ray(tmp_path):
    path = _npz(tmp_path / "ok.npz", **_with(x_train=_x(np.float64), x_test=_x(n=12)))
    check_before_ray(checked({**_tree(str(path)), "output": str(tmp_path / "runs")}))
    path = _npz(tmp_path / "pixels.npz", **_arrays())  # uint8: nothing to scan
    check_before_ray(checked({**_tree(str(path)), "output": str(tmp_path / "runs")}))


# ----- an image folder ----------------------------------------------------------------------
def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _folder(root: Path, size=(6, 5), gray: bool = False) -> dict[str, list[np.ndarray]]:
    """train: 2 images each of classes 'cat', 'ant', 'bee'; test: 1 of 'bee' and 'cat'."""
    rng = np.random.default_rng(2)
    shape = size if gray else (*size, 3)
    written = {"train": [], "test": []}
    for split, classes in (("train", ("cat", "ant", "bee")), ("test", ("bee", "cat"))):
        for name in classes:
            for i in range(2 if split == "train" else 1):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                _png(root / split / name / f"{i}.png", pixels)
        (root / split / "notes.txt").write_text("not an image")
    for split in ("train", "test"):  # what the reader should produce, class by class
        for name in sorted(p.name for p in (root / split).iterdir() if p.is_dir()):
            for file in sorted((root / split / name).glob("*.png")):
                written[split].append(np.asarray(Image.open(file)))
    return written


def test_an_image_folder_reads_classes_in_sorted_order(tmp_path):
    written = _folder(tmp_path / "pics")
    cfg = checked(_tree(str(tmp_path / "pics")))
    info = dataset_info(cfg.data)
    assert (info.train_size, info.test_size, info.num_classes, info.sample_shape) == (
        6, 2, 3, (3, 6, 5))
    assert len(cfg.data.source.sha256) == 64
    data = load_dataset(cfg.data)
    assert data.y_train.tolist() == [0, 0, 1, 1, 2, 2]  # ant, bee, cat
    assert data.y_test.tolist() == [1, 2]
    for x, pixels in zip(data.x_train, written["train"], strict=True):
        np.testing.assert_array_equal(x.numpy(), pixels.transpose(2, 0, 1))
    # a new image changes the recorded sha256
    _png(tmp_path / "pics" / "test" / "ant" / "0.png", written["test"][0])
    assert checked(_tree(str(tmp_path / "pics"))).data.source != cfg.data.source


def test_grayscale_images_give_one_channel_and_sizes_must_match_or_be_resized(tmp_path):
    _folder(tmp_path / "gray", gray=True)
    assert dataset_info(checked(_tree(str(tmp_path / "gray"))).data).sample_shape == (
        1, 6, 5)
    _png(tmp_path / "gray" / "train" / "cat" / "big.png", np.zeros((9, 7), dtype=np.uint8))
    cfg = checked(_tree(str(tmp_path / "gray")))
    with pytest.raises(ConfigError, match="big.png is 7x9 pixels but .* set data.image_size"):
        load_dataset(cfg.data)
    resized = load_dataset(checked(_tree(str(tmp_path / "gray"),
                                                 image_size=[4, 3])).data)
    assert resized.x_train.shape == (7, 1, 4, 3)


def _encoded(fmt: str, size=(6, 5), mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(4).integers(0, 256, (*size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _flipped(data: bytes) -> bytes:
    """Eight bytes in the middle of the file inverted (inside a PNG's pixel data)."""
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:]


@pytest.mark.parametrize("name, content, message", [
    ("train/cat/1.png", b"GIF89a but not really", "is not a readable image (not an image "
                                                   "format PIL knows, or not an image)"),
    ("train/cat/1.png", b"", "is not a readable image"),
    ("test/bee/0.png", _encoded("PNG")[:60], "is not a readable image (OSError: "),
    ("train/bee/1.png", _flipped(_encoded("PNG")), "is not a readable image ("),
    ("train/cat/2.jpg", _encoded("JPEG")[:-40], "is not a readable image (OSError: image file "
                                                "is truncated"),
    ("train/cat/2.bmp", _encoded("BMP")[:-20], "is not a readable image (OSError: image file "
                                               "is truncated"),
    ("train/cat/2.png", _encoded("PNG", size=(7, 5)), "is 5x7 pixels but "),
    ("test/cat/2.tif", _encoded("TIFF", mode="LAB"), "has the image mode 'LAB', which PIL "
                                                     "cannot convert to L"),
], ids=["garbage", "empty", "cut-png", "flipped-png", "cut-jpeg", "cut-bmp", "other-size",
        "lab-mode"])
def test_a_damaged_image_after_the_first_stops_before_ray_naming_the_file(tmp_path, name,
                                                                          content, message):
    _folder(tmp_path / "pics", gray=name.endswith(".tif"))
    (tmp_path / "pics" / name).write_bytes(content)
    cfg_error = _checked_before_ray(tmp_path / "pics", tmp_path)
    assert cfg_error.startswith(f"data.dataset: {tmp_path / 'pics' / name} {message}")
    # what the check refuses, the load (in the driver, on Ray) would have refused
    with pytest.raises(ConfigError) as err:
        load_dataset(checked(_tree(str(tmp_path / "pics"))).data)
    assert str(err.value).startswith(f"data.dataset: {tmp_path / 'pics' / name} ")


@pytest.mark.parametrize("name, content", [
    ("train/cat/2.jpg", _encoded("JPEG")),
    ("train/cat/2.jpg", _encoded("JPEG") + b"bytes after the end marker"),
    ("train/cat/2.png", _encoded("PNG")[:-12]),  # no end chunk, but every pixel is there
    ("train/cat/2.bmp", _encoded("BMP")),
    ("test/cat/2.tif", _encoded("TIFF", mode="CMYK")),
    ("train/cat/2.png", _encoded("PNG", size=(9, 4))),  # resized: data.image_size is set
], ids=["jpeg", "jpeg-trailing-bytes", "png-without-end", "bmp", "cmyk-tiff", "other-size"])
def test_images_that_load_pass_the_checks_before_ray(tmp_path, name, content):
    _folder(tmp_path / "pics")
    (tmp_path / "pics" / name).write_bytes(content)
    tree = {**_tree(str(tmp_path / "pics"), image_size=[6, 5]), "output": str(tmp_path / "r")}
    check_before_ray(checked(tree))
    assert load_dataset(checked(tree).data).x_train.shape[1:] == (3, 6, 5)


@pytest.mark.parametrize("layout, message", [
    ({"train/cat/x.txt": None}, "train/cat holds no images"),
    ({"train/cat/0.png": 1}, "test holds no images"),
    ({"train/cat/0.png": 1, "test/dog/0.png": 1}, "test/dog is not a class of train/"),
    ({"train/0.png": 1, "test/0.png": 1}, "train holds no class folders"),
    ({"images/0.png": 1}, "has no train/ and test/ sub-folders"),
])
def test_an_empty_or_misshapen_image_folder_stops_validation(tmp_path, layout, message):
    for name, content in layout.items():
        path = tmp_path / "pics" / name
        if content is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        else:
            _png(path, np.zeros((4, 4), dtype=np.uint8))
    if "test/0.png" not in layout and "images/0.png" not in layout:
        (tmp_path / "pics" / "test").mkdir(exist_ok=True)
    text = _error(_tree(str(tmp_path / "pics")))
    assert text.startswith("invalid config: data.dataset: ") and message in text


def test_unknown_names_and_misplaced_keys(tmp_path):
    text = _error(_tree("cifar-10"))
    assert "'cifar-10' is not a built-in dataset (cifar10, " in text
    assert "data.image_size: applies to image-folder datasets only" in _error(
        _tree("digits", image_size=[8, 8]))
    assert "model: unknown model 'resnet99'" in _error(_tree("digits", model="resnet99"))


# ----- a model of the user's ----------------------------------------------------------------
def test_an_import_path_model_is_built_checked_and_its_convs_but_the_first_are_eligible(pkg):
    cfg = checked(_tree("digits", model=f"{pkg}.nets:build"))
    assert cfg.model == f"{pkg}.nets:build"
    model = build_model(cfg.model, (1, 8, 8), 10)
    assert isinstance(model, nn.Sequential) and model.training
    assert eligible_parameter_names(model) == ["3.weight", "3.bias"]
    mlp = build_model(f"{pkg}.nets:mlp", (1, 8, 8), 10)
    assert eligible_parameter_names(mlp) == []
    with pytest.raises(ConfigError, match="^handout: 'lips' .* fewer than two convolutions"):
        check_lips_eligible(eligible_parameter_names(mlp), f"{pkg}.nets:mlp")
    check_lips_eligible(eligible_parameter_names(model), cfg.model)


def test_eligibility_covers_every_kind_of_convolution():
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.ConvTranspose2d(2, 2, 1, bias=False),
                          nn.Conv1d(2, 2, 1), nn.Linear(2, 2))
    assert eligible_parameter_names(model) == ["1.weight", "2.weight", "2.bias"]


@pytest.mark.parametrize("builder, message", [
    ("not_a_module", "returned a str, not a torch.nn.Module"),
    ("no_parameters", "returned a module without float parameters"),
    ("wrong_output", "a batch of shape (2, 1, 8, 8) gives (2, 11); expected logits of shape "
                     "(2, 10)"),
    ("wrong_input", "a forward pass on a batch of shape (2, 1, 8, 8) failed: RuntimeError"),
    ("raises", "raised ValueError: unsupported shape (1, 8, 8)"),
])
def test_a_builder_that_builds_no_fitting_model_is_named(pkg, builder, message):
    with pytest.raises(ConfigError) as err:
        build_model(f"{pkg}.nets:{builder}", (1, 8, 8), 10)
    assert str(err.value).startswith(f"model: {pkg}.nets:{builder}((1, 8, 8), 10)")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_package_found_only_in_the_working_directory_is_told_apart(pkg, tmp_path,
                                                                      monkeypatch):
    from ray_lips.data.userimport import found_without_working_directory

    assert found_without_working_directory("numpy.random:default_rng")
    assert found_without_working_directory(f"{pkg}.data:load")  # tmp_path is on sys.path
    monkeypatch.chdir(tmp_path)  # ... but it is only the working directory now
    assert not found_without_working_directory(f"{pkg}.data:load")


def test_a_model_path_that_does_not_import_stops_validation(pkg):
    assert "model: cannot import 'nope_987'" in _error(_tree("digits", model="nope_987:build"))
    assert f"model: '{pkg}.nets:absent': '{pkg}.nets' has no attribute 'absent'" in _error(
        _tree("digits", model=f"{pkg}.nets:absent"))


# ----- as a user runs it --------------------------------------------------------------------
def test_a_local_run_with_the_users_dataset_and_model_through_the_cli(pkg, tmp_path):
    """``PYTHONPATH=. ray-lips run config.yaml --local`` in the folder that holds the user's
    package, as the README says."""
    config = _tree(f"{pkg}.data:load", model=f"{pkg}.nets:build")
    config.update(name="byo", seed=0, output=str(tmp_path / "runs"), algorithm="lips",
                  train={"rounds": 1, "local_epochs": 1, "batch_size": 10,
                         "finetune_epochs": 0, "eval_test_samples": 10, "final_window": 1},
                  lips={"sparsity": 0.5, "period": 1})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    script = Path(sys.executable).with_name("ray-lips")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ray_lips.cli"]
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": "."}
    result = subprocess.run([*command, "run", "config.yaml", "--local"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["data"]["dataset"] == f"{pkg}.data:load"
    assert recorded["model"] == f"{pkg}.nets:build"
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert len(rounds) == 1 and rounds["density"].iloc[0] == 0.5
    layers = pd.read_parquet(run_dir / "layers.parquet")
    assert set(layers.loc[layers["eligible"], "layer"]) == {"3"}


def test_a_nan_in_an_npz_stops_the_command_before_any_run_folder_or_ray(tmp_path):
    """The user's view: one line, exit status 2, and nothing started or written."""
    x = np.zeros((30, 1, 4, 4), dtype=np.float32)
    x[12, 0, 1, 1] = np.nan
    path = _npz(tmp_path / "mine.npz", **_with(x_train=x, x_test=x[:12]))
    config = {**_tree(str(path)), "name": "nan", "output": str(tmp_path / "runs"),
              "train": {"rounds": 1, "batch_size": 10}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "ray_lips.cli", "run", "config.yaml",
                             "--local"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: data.dataset: {path}: x_train holds NaN at "
                                     "sample 12 (counting from 0); every value must be finite: "
                                     "fix or drop that sample")
    assert not (tmp_path / "runs").exists()


def test_a_nan_in_an_npz_stops_a_sweep_before_ray(tmp_path):
    """A sweep reads each distinct dataset of its trials once before Ray starts."""
    x = np.zeros((30, 1, 4, 4), dtype=np.float32)
    x[3, 0, 0, 0] = np.inf
    path = _npz(tmp_path / "mine.npz", **_with(x_train=x, x_test=x[:12]))
    spec = {**_tree(str(path)), "name": "nan", "train": {"rounds": 1, "batch_size": 10},
            "sweep": {"grid": {"seed": [0, 1]}, "storage_path": str(tmp_path / "results")}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "ray_lips.cli", "sweep", "spec.yaml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data.dataset: {path}: x_train holds inf at sample 3 (counting from 0); every "
        "value must be finite: fix or drop that sample")
    assert not (tmp_path / "results").exists()
