"""Local training and evaluation of one client's model: plain PyTorch, no Ray."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ray_lips.data.augment import Normalisation, prepare_batch
from ray_lips.training.spec import (
    Correction,
    LocalResult,
    LocalSettings,
    LossTerm,
    Phase,
    TermBatch,
)

__all__ = ["Correction", "GradientMean", "LocalResult", "LocalSettings", "LossTerm",
           "Normalisation", "Phase", "TermBatch", "accuracy", "correct_gradients", "local_train",
           "precision_autocast", "recalibrate_batchnorm"]


def correct_gradients(params: Mapping[str, torch.Tensor], correction: Correction) -> None:
    """Add ``correction``'s term to ``params``' gradients in place (separately rounded
    multiplies and adds, as the batched path computes them)."""
    with torch.no_grad():
        for name, param in params.items():
            if correction.coef and correction.anchor is not None and name in correction.anchor:
                anchor = correction.anchor[name].to(param.device, param.dtype)
                param.grad.add_(torch.sub(param, anchor).mul_(correction.coef))
            if correction.offset is not None and name in correction.offset:
                param.grad.add_(correction.offset[name].to(param.device, param.dtype))


def precision_autocast(device: torch.device, precision: str):
    """bf16 autocast when ``precision`` is "bf16"; otherwise a no-op context (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: LocalSettings,
                norm: Normalisation, batch_gen: torch.Generator, augment_gen: torch.Generator,
                remember: list[str] | None = None,
                correction: Correction | None = None,
                loss_term: LossTerm | None = None,
                phases: Sequence[Phase] = (),
                remember_mean: bool = False) -> LocalResult:
    """Train ``model`` in place for ``settings.epochs`` epochs with a fresh SGD optimiser.

    Batch order comes from ``batch_gen`` and augmentation from ``augment_gen`` (both CPU
    generators seeded by the caller from seed, client and round). ``correction`` (an
    algorithm's term of the local objective) is added to every step's gradient. When
    ``remember`` names parameters, their gradients on the last mini-batch of the last epoch
    (the corrected, clipped gradient the optimiser steps with) are returned in fp16 (zeros for
    a parameter the last phase does not train). With ``remember_mean`` they are instead the
    mean of that same per-step gradient over every mini-batch of the last epoch (of the last
    phase), summed in at least float32 and then stored in fp16.

    The seams an algorithm may use: ``loss_term`` is added to every step's cross-entropy (it
    sees the batch's logits and representation, :class:`TermBatch`; one whose
    ``replaces_cross_entropy`` is true is the whole loss); ``phases`` replace the
    ``settings.epochs`` epochs of all parameters by phases that each train some parameters
    with an optimiser of their own, the batch order running on from phase to phase.
    """
    if correction is not None and correction.is_zero:
        correction = None
    device = x.device
    params = dict(model.named_parameters())
    plan = list(phases) or [Phase(settings.epochs)]
    tap = _RepresentationTap(model) if loss_term is not None else None
    replaces = bool(getattr(loss_term, "replaces_cross_entropy", False))
    wanted = {name: p.requires_grad for name, p in params.items()}  # restored afterwards
    model.train()
    n = x.shape[0]
    total_loss, steps = torch.zeros((), device=device), 0
    last_grads = None
    grad_sums = GradientMean(remember) if remember and remember_mean else None
    try:
        for number, phase in enumerate(plan):
            trainable = params if phase.trainable is None else {
                name: params[name] for name in phase.trainable}
            if phases:
                for name, param in params.items():
                    param.requires_grad_(name in trainable)
            optimiser = torch.optim.SGD(
                model.parameters() if phase.trainable is None else list(trainable.values()),
                lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
            final = number == len(plan) - 1
            for epoch in range(phase.epochs):
                order = torch.randperm(n, generator=batch_gen).to(device)
                for start in range(0, n, settings.batch_size):
                    idx = order[start:start + settings.batch_size]
                    inputs = prepare_batch(x[idx], norm.mean, norm.std, augment=norm.augment,
                                           generator=augment_gen, steps=norm.steps)
                    optimiser.zero_grad(set_to_none=True)
                    with precision_autocast(device, settings.precision):
                        logits = model(inputs)
                        if tap is not None and replaces:
                            loss = loss_term(tap.batch(inputs, y[idx], logits))
                        else:
                            loss = nn.functional.cross_entropy(logits, y[idx])
                            if tap is not None:
                                loss = loss + loss_term(tap.batch(inputs, y[idx], logits))
                    loss.backward()
                    if correction is not None:
                        correct_gradients(trainable, correction)
                    if settings.grad_clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                    is_last = (final and epoch == phase.epochs - 1
                               and start + settings.batch_size >= n)
                    if grad_sums is not None and final and epoch == phase.epochs - 1:
                        grad_sums.add({name: params[name].grad for name in remember},
                                      {name: params[name] for name in remember})
                    elif is_last and remember:
                        last_grads = {name: _grad_or_zeros(params[name]) for name in remember}
                    optimiser.step()
                    total_loss += loss.detach().float()
                    steps += 1
    finally:
        if tap is not None:
            tap.remove()
        if phases:
            for name, param in params.items():
                param.requires_grad_(wanted[name])
    if grad_sums is not None:
        last_grads = grad_sums.mean()
    return LocalResult(loss=float(total_loss) / max(steps, 1), steps=steps, last_grads=last_grads)


def _grad_or_zeros(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    return grad.detach().to(torch.float16).clone()


class GradientMean:
    """The running sum of the gradients of ``names`` over a run of mini-batches, in float32
    (float64 for a float64 model), and their mean in fp16 (``lips.gradient: epoch_mean``).
    A parameter without a gradient in a step (frozen) adds zeros. Both training paths use it,
    one client's tensors or a group's wide ones alike."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def add(self, grads: Mapping[str, torch.Tensor | None],
            like: Mapping[str, torch.Tensor]) -> None:
        for name in self.names:
            grad = grads[name]
            if grad is None:
                grad = torch.zeros_like(like[name])
            grad = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
            self.sums[name] = self.sums[name] + grad if name in self.sums else grad.clone()
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor] | None:
        if not self.count:
            return None
        return {name: (total / self.count).to(torch.float16) for name, total in self.sums.items()}


class _RepresentationTap:
    """Catches the input of the model's classifier (its representation) on every forward
    pass, and runs the model with another state, frozen, for a loss term."""

    def __init__(self, model: nn.Module):
        from ray_lips.models import classifier_layer

        self.model = model
        self.features: torch.Tensor | None = None
        _, layer = classifier_layer(model)
        self.handle = layer.register_forward_pre_hook(self._catch)

    def _catch(self, module: nn.Module, args: tuple) -> None:
        self.features = args[0]

    def represent(self, inputs: torch.Tensor, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The representation of ``inputs`` by the model with ``state``, in eval mode, no
        gradient (the training model's parameters and mode are left as they were)."""
        self.model.eval()
        try:
            with torch.no_grad():
                torch.func.functional_call(self.model, dict(state), (inputs,))
        finally:
            self.model.train()
        return self.features

    def batch(self, inputs: torch.Tensor, targets: torch.Tensor,
              logits: torch.Tensor) -> TermBatch:
        return TermBatch(inputs, targets, logits, self.features,
                         lambda state: self.represent(inputs, state))

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normalisation,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` in eval mode (no augmentation)."""
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        inputs = prepare_batch(x[start:start + batch_size], norm.mean, norm.std, augment=False,
                               steps=norm.steps)
        correct += int((model(inputs).argmax(1) == y[start:start + batch_size]).sum())
    return correct / max(x.shape[0], 1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, norm: Normalisation,
                          batch_size: int = 500) -> None:
    """Recompute BatchNorm running statistics on ``x`` (exact averages); weights unchanged."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved_momentum = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all batches seen
    model.train()
    for start in range(0, x.shape[0], batch_size):
        model(prepare_batch(x[start:start + batch_size], norm.mean, norm.std, augment=False,
                            steps=norm.steps))
    for bn, momentum in zip(bns, saved_momentum, strict=True):
        bn.momentum = momentum
    model.eval()
