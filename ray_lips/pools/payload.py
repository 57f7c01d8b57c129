"""What each pool gets once: which rows of the shared dataset are its clients', and how to
read them.

The dataset itself travels apart from the payloads (``DatasetArrays``): once into Ray's object
store, mapped read-only into every pool on a node, or shared by reference in one process. A
pool gathers a client's rows when the client is used, so a client that does not take part
costs its row numbers only, and nothing per client passes through the driver.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ray_lips.training.local import Normalisation


@dataclass
class ClientShard:
    client: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device) -> ClientShard:
        return ClientShard(self.client, *(t.to(device) for t in
                                          (self.x_train, self.y_train, self.x_test, self.y_test)))


@dataclass
class PackedShards:
    """A pool's clients' data as one tensor per field: client k's rows follow client k-1's.

    Ten thousand small clients travel to a pool as four buffers, not 40,000 tensors.
    """

    clients: list[int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_sizes: list[int]
    test_sizes: list[int]

    @classmethod
    def from_shards(cls, shards: list[ClientShard]) -> PackedShards:
        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(s, name) for s in shards])

        return cls([s.client for s in shards], cat("x_train"), cat("y_train"), cat("x_test"),
                   cat("y_test"), [int(s.x_train.shape[0]) for s in shards],
                   [int(s.x_test.shape[0]) for s in shards])

    def shards(self) -> list[ClientShard]:
        """One shard per client, its tensors views into the packed ones."""
        fields = (self.x_train.split(self.train_sizes), self.y_train.split(self.train_sizes),
                  self.x_test.split(self.test_sizes), self.y_test.split(self.test_sizes))
        return [ClientShard(client, *parts)
                for client, *parts in zip(self.clients, *fields, strict=True)]


@dataclass
class DatasetArrays:
    """The whole dataset as NumPy arrays (zero-copy through Ray's object store)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @classmethod
    def of(cls, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
           y_test: torch.Tensor) -> DatasetArrays:
        return cls(*(t.numpy() for t in (x_train, y_train, x_test, y_test)))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.x_train, self.y_train, self.x_test, self.y_test))


@dataclass
class ClientRows:
    """A pool's clients as row numbers of the shared dataset: client k's rows follow client
    k-1's, in the partition's order."""

    clients: list[int]
    train_rows: np.ndarray  # int64
    test_rows: np.ndarray
    train_sizes: list[int]
    test_sizes: list[int]


class GatheredShards(Mapping[int, ClientShard]):
    """Each hosted client's shard, gathered from the shared dataset when it is asked for.

    On a GPU the dataset is copied to the device once and gathered there; on the CPU the
    shared (read-only) arrays are used in place.
    """

    def __init__(self, rows: ClientRows, dataset: DatasetArrays, device: torch.device):
        with warnings.catch_warnings():  # read-only object-store memory; only ever indexed
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = [torch.from_numpy(a) for a in (dataset.x_train, dataset.y_train,
                                                     dataset.x_test, dataset.y_test)]
        self._x_train, self._y_train, self._x_test, self._y_test = (
            t.to(device) for t in tensors)
        self._train_rows = torch.from_numpy(np.ascontiguousarray(rows.train_rows)).to(device)
        self._test_rows = torch.from_numpy(np.ascontiguousarray(rows.test_rows)).to(device)
        train_end = np.cumsum(rows.train_sizes, dtype=np.int64)
        test_end = np.cumsum(rows.test_sizes, dtype=np.int64)
        self._spans = {
            client: (int(te - tn), int(te), int(se - sn), int(se))
            for client, tn, te, sn, se in zip(rows.clients, rows.train_sizes, train_end,
                                               rows.test_sizes, test_end, strict=True)}

    def __getitem__(self, client: int) -> ClientShard:
        train_start, train_end, test_start, test_end = self._spans[client]
        train = self._train_rows[train_start:train_end]
        test = self._test_rows[test_start:test_end]
        return ClientShard(client, self._x_train[train], self._y_train[train],
                           self._x_test[test], self._y_test[test])

    def __iter__(self) -> Iterator[int]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


@dataclass
class PoolPayload:
    """What one pool gets at its start: its clients (as rows of ``dataset``, or packed shards)
    and how to read them. ``RayPools`` ships ``dataset`` apart, once for all pools."""

    pool_id: int
    data: PackedShards | ClientRows
    norm: Normalisation
    sample_shape: tuple[int, ...]
    num_classes: int
    test_split: tuple[torch.Tensor, torch.Tensor] | None = None  # global test subset, pool 0
    dataset: DatasetArrays | None = None  # what ClientRows index

    def client_shards(self, device: torch.device) -> Mapping[int, ClientShard]:
        if isinstance(self.data, PackedShards):
            return {s.client: s.to(device) for s in self.data.shards()}
        if self.dataset is None:
            raise ValueError("a payload of client rows needs the dataset they index")
        return GatheredShards(self.data, self.dataset, device)

    @property
    def shards(self) -> list[ClientShard]:
        """Every client's shard, in order, on the CPU."""
        return list(self.client_shards(torch.device("cpu")).values())
