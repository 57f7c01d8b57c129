"""What the driver ships to each pool once: its clients' data, packed, and how to read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ray_lips.training import Normalisation


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
class PoolPayload:
    """What the driver ships to one pool (once, through the object store)."""

    pool_id: int
    data: PackedShards
    norm: Normalisation
    sample_shape: tuple[int, ...]
    num_classes: int
    test_split: tuple[torch.Tensor, torch.Tensor] | None = None  # global test subset, pool 0

    @property
    def shards(self) -> list[ClientShard]:
        return self.data.shards()
