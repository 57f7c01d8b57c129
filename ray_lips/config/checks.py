"""Checks made on the user's machine before any Ray work, once per command, on a config the
schema has validated: a dataset, model or algorithm of the user's (imported, or found and
fingerprinted; an algorithm's section validated by its class),
what the dataset's sizes allow, files a run will need (and the values and images in a dataset of
the user's), folders it will write, and data requests that will be met by reusing samples.

:func:`check_config` returns the config as runs carry it (a file or folder dataset by absolute
path, with ``data.source``); :func:`check_before_ray` adds the slower checks of files and
folders. Each failure is a ``ConfigError`` naming the key; each caveat is a one-line warning.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray_lips.config import (
    DATASETS,
    MODELS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    is_import_path,
)

# What torchvision reads under data.root, and the archive it would download.
_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", "CIFAR-10"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", "CIFAR-100"),
}


def check_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The checks of ``cfg`` that read files or import the user's code; returns ``cfg`` with a
    file or folder dataset resolved (absolute path, ``data.source`` recorded or verified) and an
    algorithm of the user's section written out whole (every key, defaults included)."""
    try:
        cfg = _resolve_dataset(cfg)
        if cfg.model not in MODELS:
            from ray_lips.data.userimport import import_object

            import_object(cfg.model, "model")
        cfg = check_algorithm(cfg)
        _check_sizes(cfg)
    except ConfigError as err:
        raise ConfigError(f"invalid config: {err}") from None
    return cfg


def _resolve_dataset(cfg: ExperimentConfig) -> ExperimentConfig:
    from ray_lips.data import byo

    data = cfg.data
    if data.dataset in DATASETS:
        return cfg if data.source is None else cfg.model_copy(
            update={"data": data.model_copy(update={"source": None})})
    dataset = byo.resolve(data.dataset)
    given = data.source.model_dump() if data.source is not None else None
    source = byo.source_record(dataset, given)
    return cfg.model_copy(update={"data": DataConfig.model_validate(
        {**data.model_dump(), "dataset": dataset, "source": source})})


def check_algorithm(cfg: ExperimentConfig) -> ExperimentConfig:
    """An algorithm named by import path: it imports, is an ``Algorithm``, composes with the
    hand-out asked for, and its section (under its class's ``name``) is valid; returns ``cfg``
    with that section whole. A ``ConfigError`` naming the key otherwise."""
    if not is_import_path(cfg.algorithm):
        return cfg
    from ray_lips.algorithms.registry import algorithm_class, options_of

    cls = algorithm_class(cfg.algorithm)
    if cls.name in ExperimentConfig.model_fields or cls.name == "lips":
        raise ConfigError(f"algorithm: {cfg.algorithm!r} is named {cls.name!r}, which a key of "
                          "the config already has; give the class another name")
    given = dict(cfg.model_extra or {})
    section = given.pop(cls.name, None)
    if given:
        raise ConfigError("; ".join(f"{key}: unknown key (the section of {cfg.algorithm!r} "
                                    f"is {cls.name!r})" for key in given))
    if cfg.handout == "lips" and not cls.sparse_handout:
        why = cls.sparse_handout_conflict or "its class says sparse_handout = False"
        raise ConfigError(f"handout: 'lips' cannot be combined with algorithm: "
                          f"{cfg.algorithm!r} ({why}); use handout: dense")
    if cfg.handout == "freeze" and not cls.sparse_handout:
        from ray_lips.config.schema import freeze_conflict

        raise ConfigError(freeze_conflict(cfg.algorithm, cls.sparse_handout_conflict))
    options = options_of(cls, section)
    tree = {key: value for key, value in cfg.to_dict().items() if key not in cfg.model_extra}
    return ExperimentConfig.model_validate({**tree, cls.name: options.model_dump(mode="json")})


def _check_sizes(cfg: ExperimentConfig) -> None:
    """What the dataset's sizes decide (skipped for a function's data, which is checked when
    the run loads it)."""
    from ray_lips.data.byo import kind
    from ray_lips.data.datasets import dataset_info

    d, model = cfg.data, cfg.model
    if d.image_size is not None and kind(d.dataset) != "images":
        raise ConfigError("data.image_size: applies to image-folder datasets only; "
                          f"{d.dataset!r} is not one")
    info = dataset_info(d)
    if info is None:
        return
    dims = len(info.sample_shape) - 1
    wants_1d = model.endswith("_1d")
    if model in MODELS and model != "smallcnn" and wants_1d != (dims == 1):
        kind_ = "1-D (channels, length)" if dims == 1 else "2-D images"
        hint = "a *_1d model" if dims == 1 else "a model without the _1d suffix"
        raise ConfigError(f"model: {model!r} does not fit dataset {d.dataset!r}, whose samples "
                          f"are {kind_}; use {hint} or smallcnn")
    if d.partition == "uniform" and d.clients * d.train_per_client > info.train_size:
        raise ConfigError(
            f"data.train_per_client: uniform partition needs clients x train_per_client = "
            f"{d.clients * d.train_per_client} disjoint samples, but {d.dataset} has "
            f"{info.train_size} training samples")
    if d.partition == "pathological" and d.classes_per_client > info.num_classes:
        raise ConfigError(f"data.classes_per_client: {d.classes_per_client} exceeds the "
                          f"{info.num_classes} classes of {d.dataset}")
    if d.partition in ("iid", "uniform") and d.test_per_client > info.test_size:
        raise ConfigError(f"data.test_per_client: {d.test_per_client} exceeds the "
                          f"{info.test_size} test samples of {d.dataset}")


def check_output(cfg: ExperimentConfig) -> None:
    """``output`` must be a folder or creatable as one (not below a regular file)."""
    path = Path(cfg.output).expanduser().resolve()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"output: {cfg.output} cannot hold run folders: {folder} is a "
                                  "file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(f"output: {cfg.output} cannot hold run folders: {folder} is "
                                  "not writable")
            return


def check_dataset_files(cfg: ExperimentConfig) -> None:
    """The built-in datasets that live in files are there, or (CIFAR) can be downloaded now,
    on this machine, instead of failing inside the driver after Ray has started."""
    data = cfg.data
    root = Path(data.root).expanduser()
    if data.dataset in _CIFAR_FILES:
        folder, archive, title = _CIFAR_FILES[data.dataset]
        if (root / folder).is_dir():
            return
        try:
            _download_cifar(data.dataset, root)
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise ConfigError(
                f"data.root: {title} is not under {root} (no {folder}/ or {archive}) and "
                f"downloading it failed ({type(err).__name__}: {str(err)[:120]}); put "
                f"{archive} in that folder, or set data.root to where it is") from None
    elif data.dataset == "tinyimagenet":
        from ray_lips.data.datasets import TINY_FOLDER

        if not (root / TINY_FOLDER / "wnids.txt").is_file():
            raise ConfigError(
                f"data.root: tinyimagenet expects the official dataset at {root / TINY_FOLDER} "
                "(wnids.txt, train/, val/); it is not downloaded automatically: unzip "
                f"tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) into "
                f"{root}")


def check_dataset_contents(cfg: ExperimentConfig) -> None:
    """A ``.npz`` dataset's values and an image folder's images, read once here: a NaN or a
    damaged image would otherwise stop the run only when the driver loads the data on Ray."""
    from ray_lips.data.byo import check_contents

    check_contents(cfg.data)


def _download_cifar(dataset: str, root: Path) -> None:
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    cls(root=str(root), train=True, download=True)


def sample_reuse_warning(cfg: ExperimentConfig) -> str | None:
    """A note when the clients ask for more training samples than the dataset has: the
    non-uniform partitions then give several clients the same samples."""
    from ray_lips.data.datasets import dataset_info

    data = cfg.data
    if data.partition == "uniform":
        return None  # refused by the config's own check
    info = dataset_info(data)
    if info is None:
        return None
    asked = data.clients * data.train_per_client
    if asked <= info.train_size:
        return None
    return (f"data: {data.clients} clients x data.train_per_client {data.train_per_client} = "
            f"{asked} training samples, but {data.dataset} has {info.train_size}: the "
            f"{data.partition} partition gives clients overlapping samples (see the README's "
            "partition table)")


def check_user_modules(cfg: ExperimentConfig) -> None:
    """A dataset, model or algorithm named by an import path must be importable by Ray's
    workers, which do not look in the folder the command runs in."""
    from ray_lips.data.userimport import found_without_working_directory

    for key, path in (("data.dataset", cfg.data.dataset), ("model", cfg.model),
                      ("algorithm", cfg.algorithm)):
        if is_import_path(path) and not found_without_working_directory(path):
            raise ConfigError(
                f"{key}: {path!r} imports only from the current folder, where Ray's workers do "
                "not look; install it, or export PYTHONPATH=$PWD (or run with --local)")


def check_before_ray(cfg: ExperimentConfig, uses_ray: bool = True) -> list[str]:
    """Every check that needs no Ray; returns warnings, raises ``ConfigError`` on failure."""
    check_output(cfg)
    if uses_ray:
        check_user_modules(cfg)
    check_dataset_files(cfg)
    check_dataset_contents(cfg)
    warning = sample_reuse_warning(cfg)
    return [warning] if warning else []
