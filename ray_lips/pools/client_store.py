"""Per-client state that survives rounds, kept in the pool that hosts the client.

Each entry is a client's dict of tensors in a named slot (``"lips.grad"``, ``"scaffold.c"``,
``"ditto.personal"``, ...). Past a byte budget the least recently used entries are written to a
private spill folder and read back (``weights_only``) when asked for, so 10,000 clients with a
model-sized state each fit a pool's RAM. A spilled entry's file is named by numbers alone (the
slot's index in this store and the client's number), never by the slot's name: a name read from
a checkpoint cannot choose where a file goes. A checkpoint reads the entries out in parts of
bounded size (``index``, then ``export`` of some keys), spilled ones included.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

Entry = dict[str, torch.Tensor]


class EntryInfo(NamedTuple):
    """One stored entry, as a checkpoint plans its parts."""

    slot: str
    client: int
    nbytes: int


def _nbytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


class ClientStore:
    """``get``/``put`` per (client, slot), in memory up to ``budget_bytes``, then on disk."""

    def __init__(self, budget_bytes: int | None = None, spill_root: str | None = None):
        self.budget_bytes = budget_bytes
        self.spill_root = spill_root
        self._memory: OrderedDict[tuple[str, int], Entry] = OrderedDict()  # oldest use first
        self._spilled: dict[tuple[str, int], Path] = {}
        self._bytes = 0
        self._folder: Path | None = None
        self._slot_numbers: dict[str, int] = {}  # each slot's number in spill file names

    # ----- entries ------------------------------------------------------------------------
    def get(self, client: int, slot: str) -> Entry | None:
        key = (slot, client)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._spilled.pop(key, None)
        if path is None:
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
        path.unlink()
        self._remember(key, entry)
        return entry

    def put(self, client: int, slot: str, entry: Entry) -> None:
        self.drop(client, slot)
        self._remember((slot, client), dict(entry))

    def drop(self, client: int, slot: str) -> None:
        key = (slot, client)
        if key in self._memory:
            self._bytes -= _nbytes(self._memory.pop(key))
        path = self._spilled.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def replace_slot(self, slot: str, entries: dict[int, Entry]) -> None:
        """Make ``entries`` the whole content of ``slot``."""
        for client in self.clients(slot):
            self.drop(client, slot)
        for client, entry in entries.items():
            self.put(client, slot, entry)

    def clients(self, slot: str) -> list[int]:
        return sorted({c for s, c in (*self._memory, *self._spilled) if s == slot})

    def slots(self) -> list[str]:
        return sorted({s for s, _ in (*self._memory, *self._spilled)})

    @property
    def memory_bytes(self) -> int:
        return self._bytes

    @property
    def spilled(self) -> int:
        return len(self._spilled)

    # ----- checkpoints --------------------------------------------------------------------
    def index(self, skip: Iterable[str] = ()) -> list[EntryInfo]:
        """Every entry but those of the slots in ``skip``, with its size, in a fixed order
        (a spilled entry's size is its file's)."""
        skipped = set(skip)
        out = []
        for slot in self.slots():
            if slot in skipped:
                continue
            for client in self.clients(slot):
                key = (slot, client)
                nbytes = (_nbytes(self._memory[key]) if key in self._memory else
                          self._spilled[key].stat().st_size)
                out.append(EntryInfo(slot, client, nbytes))
        return out

    def export(self, keys: Iterable[tuple[str, int]] | None = None) -> dict[str, dict[int, Entry]]:
        """The entries named by ``keys`` (slot, client), or all of them, on the CPU; spilled
        ones are read back without entering the memory budget."""
        if keys is None:
            keys = [(info.slot, info.client) for info in self.index()]
        out: dict[str, dict[int, Entry]] = {}
        for slot, client in keys:
            key = (slot, client)
            entry = (self._memory[key] if key in self._memory else
                     torch.load(self._spilled[key], map_location="cpu", weights_only=True))
            out.setdefault(slot, {})[client] = {k: v.cpu() for k, v in entry.items()}
        return out

    def add(self, exported: dict[str, dict[int, Entry]], device: torch.device,
            hosted: set[int]) -> None:
        """Take the entries of the ``hosted`` clients from an export (a checkpoint may hand
        them over in several parts)."""
        for slot, entries in exported.items():
            for client, entry in entries.items():
                if int(client) in hosted:
                    self.put(int(client), slot, {k: v.to(device) for k, v in entry.items()})

    # ----- spilling -----------------------------------------------------------------------
    def _remember(self, key: tuple[str, int], entry: Entry) -> None:
        self._memory[key] = entry
        self._bytes += _nbytes(entry)
        if self.budget_bytes is None:
            return
        while self._bytes > self.budget_bytes and len(self._memory) > 1:
            old_key, old = self._memory.popitem(last=False)
            self._bytes -= _nbytes(old)
            path = self._spill_folder() / self._spill_name(*old_key)
            torch.save({k: v.cpu() for k, v in old.items()}, path)
            self._spilled[old_key] = path

    def _spill_name(self, slot: str, client: int) -> str:
        """``<slot number>-<client number>.pt``: one safe file name per entry."""
        number = self._slot_numbers.setdefault(slot, len(self._slot_numbers))
        return f"{number}-{int(client)}.pt"

    def _spill_folder(self) -> Path:
        if self._folder is None:
            if self.spill_root is not None:
                Path(self.spill_root).expanduser().mkdir(parents=True, exist_ok=True)
            root = None if self.spill_root is None else str(Path(self.spill_root).expanduser())
            self._folder = Path(tempfile.mkdtemp(prefix="ray-lips-clients-", dir=root))
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        return self._folder
