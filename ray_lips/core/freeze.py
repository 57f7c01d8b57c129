"""Freeze against perturb (``handout: freeze``): on the inertia signal LIPS uses, stop training
the layers that have stalled for a few rounds, instead of perturbing them with a sparse copy.

The driver decides, from its own layer rows (``layers.parquet``, :mod:`ray_lips.core.inertia`),
so the decision is the same for any pool count and after a resume. After round r:

- the trigger fires: ``freeze.when: period`` on rounds r % ``lips.period`` == 0;
  ``freeze.when: inertia`` when LIPS's :class:`~ray_lips.core.inertia.InertiaTrigger` fires
  (``lips.window``, ``lips.trigger``, ``lips.min_gap``, ``train.inertia_ref_round``), its u(r)
  the mean ``rel_update`` of the eligible layers that *trained* in round r (a frozen layer's
  zero update is not inertia; a round in which every eligible layer was frozen has no u);
- when it fires, every eligible layer l that has stalled is frozen in rounds
  r+1 .. r + ``freeze.rounds``: with S_l(r) the mean of l's own ``rel_update`` over rounds
  max(0, r - w + 1) .. r (w = ``lips.window``), l has stalled when
  S_l(r) < ``lips.trigger`` x S_l(ref), ref = ``train.inertia_ref_round``.

Decisions (known answers in tests/test_freeze.py):

- before the reference round is measured (r < ref) nothing stalls; a NaN signal never stalls;
- a layer's window must hold only rounds it trained: a layer frozen in any of them is not
  considered. So a firing while layers are still frozen leaves them be (each thaws on its own
  schedule, never extended), may freeze other layers that stall, and a thawed layer trains at
  least ``lips.window`` rounds before it can stall again;
- a firing counts for ``lips.min_gap`` whether or not a layer stalled.

A frozen layer (its module's parameters; never BatchNorm, whose statistics follow the batches,
nor the classifier, nor an algorithm's local entries) gets no gradient, no weight decay and no
momentum on any client (:attr:`ray_lips.algorithms.base.TrainJob.frozen`), is not uploaded, and
keeps its global entries bit for bit. Hand-outs stay dense.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ray_lips.core.inertia import InertiaTrigger


@dataclass(frozen=True)
class FreezeDecision:
    """What the trigger decided after a round: whether it fired, its ratio (``when:
    inertia``; None otherwise) and the layers it froze (for the next ``freeze.rounds``)."""

    fired: bool
    ratio: float | None
    stalled: tuple[str, ...]


class LayerFreezer:
    """The frozen layers of a ``handout: freeze`` run, round by round (module docstring).

    ``layers``: the eligible layers it may freeze, in layer order. State: each layer's latest
    freeze (its first and last frozen round) and the round the trigger last fired
    (:meth:`state`, checkpointed), and every layer's ``rel_update`` per round (rebuilt from
    the rows on a resume).
    """

    def __init__(self, layers: Iterable[str], when: str, rounds: int, period: int,
                 trigger: InertiaTrigger):
        self.layers = tuple(layers)
        self.when, self.rounds, self.period, self.trigger = when, rounds, period, trigger
        self.spells: dict[str, tuple[int, int]] = {}  # layer: its first and last frozen round
        self.last_fired: int | None = None
        self._updates: dict[str, dict[int, float]] = {name: {} for name in self.layers}
        self._frozen_rounds: dict[str, set[int]] = {name: set() for name in self.layers}

    def frozen_in(self, round_idx: int) -> tuple[str, ...]:
        """The layers no client trains in round ``round_idx``, in layer order."""
        return tuple(name for name in self.layers
                     if self.spells.get(name, (0, -1))[0] <= round_idx
                     <= self.spells.get(name, (0, -1))[1])

    def observe(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Take layer rows (with their ``frozen`` column) into the layers' histories."""
        for row in rows:
            name = row["layer"]
            if name not in self._updates:
                continue
            r = int(row["round"])
            self._updates[name][r] = float(row["rel_update"])
            if row.get("frozen"):
                self._frozen_rounds[name].add(r)

    def _window(self, round_idx: int) -> range:
        return range(max(0, round_idx - self.trigger.window + 1), round_idx + 1)

    def signal(self, name: str, round_idx: int) -> float:
        """S_l(round_idx): the mean of ``name``'s ``rel_update`` over its window (NaN where a
        round is missing)."""
        values = [self._updates[name].get(r, math.nan) for r in self._window(round_idx)]
        return sum(values) / len(values)

    def stalled(self, round_idx: int) -> tuple[str, ...]:
        """The layers that have stalled after ``round_idx``: trained throughout their window,
        signal below ``lips.trigger`` x its value at the reference round."""
        ref = self.trigger.ref_round
        if round_idx < ref:
            return ()
        out = []
        for name in self.layers:
            if self._frozen_rounds[name].intersection(self._window(round_idx)):
                continue
            reference = self.signal(name, ref)
            if reference > 0 and self.signal(name, round_idx) < self.trigger.trigger * reference:
                out.append(name)
        return tuple(out)

    def _trained_update(self, round_idx: int) -> float | None:
        """u(round_idx): the mean ``rel_update`` of the layers that trained in it (None: no
        layer did, or the round is not measured)."""
        values = [self._updates[name][round_idx] for name in self.layers
                  if round_idx in self._updates[name]
                  and round_idx not in self._frozen_rounds[name]]
        return sum(values) / len(values) if values else None

    def _inertia_ratio(self, round_idx: int) -> float:
        """The inertia trigger's ratio after ``round_idx``, on u of the layers that trained."""
        needed = {*self._window(round_idx), *self._window(self.trigger.ref_round)}
        updates = {r: u for r in needed if (u := self._trained_update(r)) is not None}
        return self.trigger.ratio(updates, round_idx)

    def after_round(self, round_idx: int) -> FreezeDecision:
        """Decide after ``round_idx`` (its rows observed): fire or not, and freeze the layers
        that stalled for the next ``freeze.rounds`` rounds."""
        ratio = None
        if self.when == "period":
            fired = round_idx % self.period == 0
        else:
            ratio = self._inertia_ratio(round_idx)
            fired = self.trigger.fires(ratio, round_idx, self.last_fired)
        stalled = self.stalled(round_idx) if fired else ()
        if fired:
            self.last_fired = round_idx
        for name in stalled:
            self.spells[name] = (round_idx + 1, round_idx + self.rounds)
        return FreezeDecision(fired, ratio, stalled)

    # ----- checkpoints ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (loads with ``weights_only=True``)."""
        return {"spells": {name: list(spell) for name, spell in self.spells.items()},
                "last_fired": -1 if self.last_fired is None else self.last_fired}

    def restore(self, state: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> None:
        """Back to a checkpoint: its state, and the layer rows up to its round."""
        self.spells = {str(name): (int(first), int(last))
                       for name, (first, last) in state["spells"].items()}
        last = int(state["last_fired"])
        self.last_fired = None if last < 0 else last
        self.observe(rows)
