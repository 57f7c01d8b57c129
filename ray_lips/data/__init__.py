"""Datasets, client partitions and batch preparation.

Names are imported on first use, so that ``ray_lips.config`` can import
:func:`dataset_info` without pulling in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray_lips.data.augment import Normalisation, input_pipeline, prepare_batch
    from ray_lips.data.datasets import dataset_info, load_dataset
    from ray_lips.data.in_memory import ArrayDataset, DatasetInfo
    from ray_lips.data.partition import ClientSplit, partition_clients

_WHERE = {
    "DatasetInfo": "in_memory",
    "dataset_info": "datasets",
    "ArrayDataset": "in_memory",
    "load_dataset": "datasets",
    "ClientSplit": "partition",
    "partition_clients": "partition",
    "prepare_batch": "augment",
    "Normalisation": "augment",
    "input_pipeline": "augment",
}

__all__ = [
    "ArrayDataset",
    "ClientSplit",
    "DatasetInfo",
    "Normalisation",
    "dataset_info",
    "input_pipeline",
    "load_dataset",
    "partition_clients",
    "prepare_batch",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
