"""What local training is asked to do and what it gives back: plain data, no torch at import
(so :mod:`ray_lips.algorithms` and the config schema built from it load without torch)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from ray_lips.config import TrainConfig


@dataclass(frozen=True)
class LocalSettings:
    """The local-training settings of a run (``train.*``): what every algorithm trains with."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    grad_clip: float | None = None
    precision: str = "fp32"

    @classmethod
    def of(cls, train: TrainConfig, epochs: int | None = None) -> LocalSettings:
        """The settings of a config's ``train`` section (``epochs``: other than
        ``train.local_epochs``)."""
        return cls(epochs=train.local_epochs if epochs is None else epochs,
                   batch_size=train.batch_size, lr=train.lr, momentum=train.momentum,
                   weight_decay=train.weight_decay, grad_clip=train.grad_clip,
                   precision=train.precision)


@dataclass(frozen=True)
class Correction:
    """A term added to each parameter's loss gradient during local training, before clipping
    and the optimiser step: ``coef * (w - anchor[name]) + offset[name]``.

    FedProx's proximal term (``coef`` = mu, ``anchor`` = the start model), SCAFFOLD's control
    variate correction (``offset`` = c - c_i) and Ditto's personal objective are all of this
    form, so one mechanism serves both training paths. Names missing from ``anchor`` or
    ``offset`` get no term from them.
    """

    coef: float = 0.0
    anchor: Mapping[str, torch.Tensor] | None = None
    offset: Mapping[str, torch.Tensor] | None = None

    @property
    def is_zero(self) -> bool:
        return (self.coef == 0.0 or self.anchor is None) and self.offset is None


@dataclass
class LocalResult:
    loss: float                                # mean training loss over all local steps
    steps: int
    last_grads: dict[str, torch.Tensor] | None  # fp16 gradients of the last mini-batch


@dataclass(frozen=True)
class Phase:
    """One phase of a client's local training: ``epochs`` epochs in which only the parameters
    named in ``trainable`` train (None: all). Frozen parameters get no gradient, no weight
    decay and no momentum (each phase has a fresh optimiser over its trainable parameters);
    BatchNorm statistics still follow the batches, as in any training-mode pass."""

    epochs: int
    trainable: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TermBatch:
    """What a :class:`LossTerm` sees of one training step: the (normalised, augmented) inputs,
    their labels, the model's logits and its representation of them (the classifier's input,
    see :func:`ray_lips.models.classifier_layer`), and ``represent(state)``: the
    representation of the same inputs by another model of the architecture (a state dict),
    frozen: in eval mode, without gradient."""

    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor
    represent: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


class LossTerm(Protocol):
    """A term an algorithm adds to a client's cross-entropy loss at every local step (MOON's
    contrastive loss); it returns a scalar tensor that gradients flow through. A term with an
    attribute ``replaces_cross_entropy = True`` is the step's whole loss instead (FedRoD's
    balanced softmax)."""

    def __call__(self, batch: TermBatch) -> torch.Tensor: ...
