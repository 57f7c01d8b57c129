"""The ``freeze`` hand-out: every client receives the global model unchanged (dense), as
:class:`~ray_lips.algorithms.handouts.dense.DenseHandout`; what differs is which layers the
clients train. The driver decides, from the layer inertia it measures, which stalled layers no
client trains for a few rounds (:mod:`ray_lips.core.freeze`), and each round's training request
names them (:attr:`ray_lips.pools.messages.TrainRequest.frozen`)."""

from __future__ import annotations

from ray_lips.algorithms.handouts.dense import DenseHandout


class FreezeHandout(DenseHandout):
    """Dense hand-outs; the frozen layers are the driver's and the trainers' business."""

    name = "freeze"
