"""Local training and evaluation of one client's model: plain PyTorch, no Ray."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from ray_lips.data.augment import Normalisation, prepare_batch
from ray_lips.training.spec import Correction, LocalResult, LocalSettings

__all__ = ["Correction", "LocalResult", "LocalSettings", "Normalisation", "accuracy",
           "correct_gradients", "local_train", "precision_autocast", "recalibrate_batchnorm"]


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
                correction: Correction | None = None) -> LocalResult:
    """Train ``model`` in place for ``settings.epochs`` epochs with a fresh SGD optimiser.

    Batch order comes from ``batch_gen`` and augmentation from ``augment_gen`` (both CPU
    generators seeded by the caller from seed, client and round). ``correction`` (an
    algorithm's term of the local objective) is added to every step's gradient. When
    ``remember`` names parameters, their gradients on the last mini-batch of the last epoch
    (the corrected, clipped gradient the optimiser steps with) are returned in fp16.
    """
    if correction is not None and correction.is_zero:
        correction = None
    device = x.device
    params = dict(model.named_parameters())
    optimiser = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    model.train()
    n = x.shape[0]
    total_loss, steps = torch.zeros((), device=device), 0
    last_grads = None
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=batch_gen).to(device)
        for start in range(0, n, settings.batch_size):
            idx = order[start:start + settings.batch_size]
            inputs = prepare_batch(x[idx], norm.mean, norm.std, augment=norm.augment,
                                   generator=augment_gen, steps=norm.steps)
            optimiser.zero_grad(set_to_none=True)
            with precision_autocast(device, settings.precision):
                loss = nn.functional.cross_entropy(model(inputs), y[idx])
            loss.backward()
            if correction is not None:
                correct_gradients(params, correction)
            if settings.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            is_last = epoch == settings.epochs - 1 and start + settings.batch_size >= n
            if is_last and remember:
                last_grads = {name: params[name].grad.detach().to(torch.float16).clone()
                              for name in remember}
            optimiser.step()
            total_loss += loss.detach().float()
            steps += 1
    return LocalResult(loss=float(total_loss) / max(steps, 1), steps=steps, last_grads=last_grads)


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
