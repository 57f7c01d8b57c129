"""Batched client training: a group of G clients trained as one "wide" model.

Every convolution of the model becomes a grouped convolution with G times the channels (group k
holds client k's filters), every BatchNorm gets G times the channels (so its batch statistics and
running statistics stay per client), and the classifier becomes G independent matrices. The wide
model sees the G clients' mini-batches side by side along the channel axis, so one forward and
one backward pass train all G clients, and plain SGD on the wide parameters is G independent SGDs
(momentum and weight decay are elementwise). Client k's result is, up to floating-point rounding,
what :func:`ray_lips.training.local.local_train` gives for it alone: same batch order and
augmentation
(drawn from the same per-client generators in the same order), same loss, same optimiser.

Client k's numbers do not depend on which clients share its group or on its slot in it, only
on the group size, which the pool fixes from the config (see
``ray_lips.pools.client_pool.batch_clients``); ``_SlotwiseSGD`` and ``GroupedLinear`` exist for
that. Image groups run channels-last (NHWC) unless told otherwise: on CPU (oneDNN) it was faster
than NCHW for every measured model, dense (groups of one) and grouped alike (see
benchmarks/README.md); on CUDA it is the layout cuDNN's grouped and tensor-core kernels prefer.

Where it pays: on a GPU, where one client's step is far too small to fill the device. On CPU,
oneDNN's grouped convolutions cost more per client than dense ones, so a pool there uses groups
of one (still this code path, for its channels-last layout), see benchmarks/README.md.

This works for models whose forward pass never mixes channels outside convolutions and linear
layers (no channel shuffles, concatenations or reshapes of the channel axis): the model zoo of
:mod:`ray_lips.models`. :func:`supports` says whether a model qualifies; the caller trains the
others one client at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ray_lips.data.augment import prepare_batch
from ray_lips.models import VGG, BasicBlock, ResNet, SmallCNN
from ray_lips.training.local import (
    Correction,
    GradientMean,
    LocalResult,
    LocalSettings,
    Normalisation,
    Phase,
    precision_autocast,
)

_CONV = (nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules whose forward pass keeps the channels of different groups apart.
_CHANNEL_LOCAL = (
    ResNet, BasicBlock, VGG, SmallCNN, nn.Sequential, nn.ReLU, nn.Identity, nn.Flatten,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)


def supports(model: nn.Module) -> bool:
    """Whether ``model`` can be widened into a batched group (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, _CONV):
            if module.padding_mode != "zeros":
                return False
        elif isinstance(module, _BN):
            if module.momentum is None or not module.track_running_stats or not module.affine:
                return False
        elif type(module) is not nn.Linear and not isinstance(module, _CHANNEL_LOCAL):
            return False
    return True


def _round_up(value: int, multiple: int = 16) -> int:
    return -(-value // multiple) * multiple


class GroupedLinear(nn.Module):
    """G independent linear layers: input (N, G * in) -> output (N, G * out).

    One batched matrix product does all G. Two details keep a client's numbers independent of
    its slot: the bias rides inside the product (an input column of ones) instead of being
    summed over the batch by a reduction whose vectorisation depends on where the client's
    values sit, and both matrix dimensions are zero-padded to multiples of 16 so that every
    client's matrix starts equally aligned (the GEMM kernels' rounding depends on alignment).
    """

    def __init__(self, clients: int, in_features: int, out_features: int,
                 device: torch.device | str | None = None):
        super().__init__()
        self.clients = clients
        self.weight = nn.Parameter(torch.empty(clients, out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.empty(clients, out_features, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, out_features, in_features = self.weight.shape
        n = x.shape[0]
        k, o = _round_up(in_features + 1), _round_up(out_features)
        x = x.reshape(n, g, in_features).transpose(0, 1)  # (G, N, in)
        pad = torch.zeros(g, n, k - in_features, dtype=x.dtype, device=x.device)
        pad[:, :, 0] = 1.0
        inputs = torch.cat([x, pad], dim=2)  # (G, N, k): [x, 1, 0...]
        weight = torch.cat([self.weight, self.bias.unsqueeze(2),
                            self.weight.new_zeros(g, out_features, k - in_features - 1)], dim=2)
        weight = torch.cat([weight, weight.new_zeros(g, o - out_features, k)], dim=1)
        out = torch.bmm(inputs, weight.transpose(1, 2).to(inputs.dtype))[:, :, :out_features]
        return out.transpose(0, 1).reshape(n, -1)


def _wide_module(module: nn.Module, clients: int) -> nn.Module | None:
    """The G-client version of one parameter-owning layer, uninitialised (on the meta device),
    in the layer's dtype."""
    meta = torch.device("meta")
    params = list(module.parameters(recurse=False))
    dtype = params[0].dtype if params else None
    if isinstance(module, _CONV):
        return type(module)(
            module.in_channels * clients, module.out_channels * clients, module.kernel_size,
            stride=module.stride, padding=module.padding, dilation=module.dilation,
            groups=module.groups * clients, bias=module.bias is not None, device=meta,
            dtype=dtype)
    if isinstance(module, _BN):
        return type(module)(module.num_features * clients, eps=module.eps,
                            momentum=module.momentum, device=meta, dtype=dtype)
    if type(module) is nn.Linear:
        wide = GroupedLinear(clients, module.in_features, module.out_features, device=meta)
        return wide.to(dtype) if dtype is not None else wide
    return None


def widen(model: nn.Module, clients: int) -> nn.Module:
    """A wide copy of ``model`` for ``clients`` clients (weights uninitialised), on its device."""
    if not supports(model):
        raise ValueError(f"{type(model).__name__} cannot be trained as a batched group")
    device = next(model.parameters()).device
    wide = copy.deepcopy(model)
    for parent in list(wide.modules()):
        for name, child in list(parent.named_children()):
            replacement = _wide_module(child, clients)
            if replacement is not None:
                setattr(parent, name, replacement)
    return wide.to_empty(device=device)


class ClientGroup:
    """A wide model for ``clients`` clients of ``model``'s architecture, reused across rounds.

    ``load`` puts one start state per client into it, ``train`` trains them all, ``state``
    reads back client k's state dict (same names, shapes and dtypes as ``model.state_dict()``).
    """

    def __init__(self, model: nn.Module, clients: int, channels_last: bool = True):
        self.clients = clients
        self.wide = widen(model, clients)
        self.device = next(self.wide.parameters()).device
        self.channels_last = channels_last
        for module in self.wide.modules():
            if isinstance(module, _BN):
                module.num_batches_tracked.zero_()  # unused (momentum is set); counted per client
        self.shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        self.tensors = dict(self.wide.named_parameters()) | dict(self.wide.named_buffers())
        self.counters = [name for name in self.shapes if name.endswith("num_batches_tracked")]
        self.start_counts: dict[str, torch.Tensor] = {}
        self.steps = 0

    # ----- states in and out --------------------------------------------------------------
    @torch.no_grad()
    def load(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        if len(states) != self.clients:
            raise ValueError(f"expected {self.clients} client states, got {len(states)}")
        for name in self.shapes:
            stacked = torch.stack([s[name] for s in states]).to(self.device)
            if name in self.counters:
                self.start_counts[name] = stacked  # (G,), advanced by the steps taken
            else:
                self.tensors[name].copy_(stacked.reshape(self.tensors[name].shape))
        self.steps = 0

    @torch.no_grad()
    def states(self) -> list[dict[str, torch.Tensor]]:
        """Every client's state dict, as views into per-name (G, ...) tensors."""
        stacked = {}
        for name, shape in self.shapes.items():
            if name in self.counters:
                stacked[name] = self.start_counts[name] + self.steps
            else:
                stacked[name] = self.tensors[name].detach().reshape(self.clients, *shape)
        return [{name: t[k] for name, t in stacked.items()} for k in range(self.clients)]

    # ----- inputs -------------------------------------------------------------------------
    def _inputs(self, samples: torch.Tensor, norm: Normalisation,
                augment_gens: Sequence[torch.Generator] | None) -> torch.Tensor:
        """Stored samples (G * B, C, *S), client-major -> normalised wide input (B, G * C, *S)."""
        g = self.clients
        flat = prepare_batch(samples, norm.mean, norm.std, generator=augment_gens,
                             augment=augment_gens is not None and norm.augment, steps=norm.steps)
        b, c, spatial = flat.shape[0] // g, flat.shape[1], flat.shape[2:]
        flat = flat.reshape(g, b, c, *spatial)
        if self.channels_last and flat.dim() == 5:
            h, w = spatial
            out = torch.empty((b, g * c, h, w), dtype=flat.dtype, device=flat.device,
                              memory_format=torch.channels_last)
            # memory order (B, H, W, G, C): client k's channels are k*C .. k*C + C - 1
            out.permute(0, 2, 3, 1).view(b, h, w, g, c).copy_(flat.permute(1, 3, 4, 0, 2))
            return out
        return flat.transpose(0, 1).reshape(b, g * c, *spatial)

    # ----- training -----------------------------------------------------------------------
    def train(self, x: torch.Tensor, y: torch.Tensor, settings: LocalSettings,
              norm: Normalisation, batch_gens: Sequence[torch.Generator],
              augment_gens: Sequence[torch.Generator],
              remember: list[str] | None = None,
              corrections: Sequence[Correction | None] | None = None,
              phases: Sequence[Phase] = (),
              remember_mean: bool = False) -> list[LocalResult]:
        """Train the loaded clients on ``x`` (G, n, ...) / ``y`` (G, n) like ``local_train``,
        client k with ``corrections[k]`` added to its gradients, every client through the
        same ``phases`` (see ``local_train``)."""
        g, n = y.shape
        if g != self.clients:
            raise ValueError(f"expected data of {self.clients} clients, got {g}")
        params = list(self.wide.parameters())
        named = dict(self.wide.named_parameters())
        correct = self._wide_correction(corrections)
        plan = list(phases) or [Phase(settings.epochs)]
        wanted = [p.requires_grad for p in params]  # restored afterwards
        self.wide.train()
        x_flat, y_flat = x.reshape(g * n, *x.shape[2:]), y.reshape(g * n)
        offsets = torch.arange(g, device=self.device)[:, None] * n  # client k's rows start at k*n
        total_loss = torch.zeros(g, device=self.device)
        last_grads = None
        grad_sums = GradientMean(remember) if remember and remember_mean else None
        try:
            for number, phase in enumerate(plan):
                trained = params if phase.trainable is None else [
                    named[name] for name in phase.trainable]
                if phases:
                    keep = set(map(id, trained))
                    for param in params:
                        param.requires_grad_(id(param) in keep)
                sgd = _SlotwiseSGD(trained, settings.lr, settings.momentum,
                                   settings.weight_decay)
                final = number == len(plan) - 1
                for epoch in range(phase.epochs):
                    order = torch.stack([torch.randperm(n, generator=gen) for gen in batch_gens])
                    order = order.to(self.device)
                    for start in range(0, n, settings.batch_size):
                        idx = (order[:, start:start + settings.batch_size] + offsets).reshape(-1)
                        inputs = self._inputs(x_flat.index_select(0, idx), norm, augment_gens)
                        targets = y_flat.index_select(0, idx).reshape(g, -1)  # (G, B)
                        for p in params:
                            p.grad = None
                        with precision_autocast(self.device, settings.precision):
                            logits = self.wide(inputs)  # (B, G * classes)
                            losses = _client_losses(logits, targets)
                        losses.sum().backward()
                        if correct is not None:
                            correct()
                        if settings.grad_clip is not None:
                            _clip_per_client(params, g, settings.grad_clip)
                        if grad_sums is not None and final and epoch == phase.epochs - 1:
                            grad_sums.add({name: self.tensors[name].grad for name in remember},
                                          self.tensors)
                        elif (final and epoch == phase.epochs - 1
                                and start + settings.batch_size >= n and remember):
                            last_grads = {name: self._last_grad(name) for name in remember}
                        sgd.step()
                        total_loss += losses.detach().float()
                        self.steps += 1
        finally:
            if phases:
                for param, flag in zip(params, wanted, strict=True):
                    param.requires_grad_(flag)
        if grad_sums is not None:
            mean = grad_sums.mean()
            last_grads = None if mean is None else {
                name: t.reshape(self.clients, *self.shapes[name]) for name, t in mean.items()}
        steps = self.steps
        losses_out = (total_loss / max(steps, 1)).tolist()
        return [LocalResult(loss=losses_out[k], steps=steps,
                            last_grads=None if last_grads is None else
                            {name: t[k].clone() for name, t in last_grads.items()})
                for k in range(g)]

    def _last_grad(self, name: str) -> torch.Tensor:
        """(G, ...) fp16 gradient of ``name`` (zeros where this phase does not train it)."""
        tensor = self.tensors[name]
        grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        return grad.detach().reshape(self.clients, *self.shapes[name]).to(torch.float16)

    def _wide_correction(self, corrections: Sequence[Correction | None] | None):
        """The clients' gradient corrections as one in-place update of the wide gradients
        (same separately rounded operations as ``training.correct_gradients``), or None."""
        if corrections is None or all(c is None or c.is_zero for c in corrections):
            return None
        if len(corrections) != self.clients:
            raise ValueError(f"expected {self.clients} corrections, got {len(corrections)}")
        coefs = {c.coef for c in corrections if c is not None and c.anchor is not None}
        if len(coefs) > 1:
            raise ValueError(f"clients of one group need one correction coefficient: {coefs}")
        coef = coefs.pop() if coefs else 0.0
        named = dict(self.wide.named_parameters())

        def stacked(field: str, name: str) -> torch.Tensor | None:
            parts = [getattr(c, field) if c is not None else None for c in corrections]
            if all(p is None or name not in p for p in parts):
                return None
            shape, param = self.shapes[name], named[name]
            rows = [p[name] if p is not None and name in p else
                    torch.zeros(shape, dtype=param.dtype) for p in parts]
            return torch.stack([r.to(param.device, param.dtype) for r in rows]).reshape(
                param.shape)

        anchors = {n: stacked("anchor", n) for n in named} if coef else {}
        offsets = {n: stacked("offset", n) for n in named}
        with_anchor = [n for n, a in anchors.items() if a is not None]
        with_offset = [n for n, o in offsets.items() if o is not None]

        @torch.no_grad()
        def apply() -> None:
            anchored = [n for n in with_anchor if named[n].grad is not None]  # not frozen
            offset = [n for n in with_offset if named[n].grad is not None]
            if anchored:
                grads = [named[n].grad for n in anchored]
                pulls = torch._foreach_sub([named[n] for n in anchored],
                                           [anchors[n] for n in anchored])
                torch._foreach_mul_(pulls, coef)
                torch._foreach_add_(grads, pulls)
            if offset:
                torch._foreach_add_([named[n].grad for n in offset],
                                    [offsets[n] for n in offset])

        return apply

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, norm: Normalisation,
                 batch_size: int = 500) -> list[float]:
        """Per-client top-1 accuracy on ``x`` (G, m, ...) / ``y`` (G, m), in eval mode."""
        self.wide.eval()
        g, m = y.shape
        correct = torch.zeros(g, dtype=torch.long, device=self.device)
        for start in range(0, m, batch_size):
            targets = y[:, start:start + batch_size]  # (G, b)
            chunk = x[:, start:start + batch_size]
            logits = self.wide(self._inputs(chunk.reshape(-1, *x.shape[2:]), norm, None))
            predicted = logits.reshape(targets.shape[1], g, -1).argmax(-1).t()
            correct += (predicted == targets).sum(1)
        return [c / max(m, 1) for c in correct.tolist()]


def _client_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-client mean cross-entropy: ``logits`` (B, G * classes), ``targets`` (G, B) -> (G,).

    Every client's rows are reduced by the same code path (row-wise over contiguous rows), so
    a client's loss does not depend on its slot in the group.
    """
    g, b = targets.shape
    rows = logits.reshape(b, g, -1).transpose(0, 1).reshape(g * b, -1)  # client-major rows
    per_sample = F.cross_entropy(rows, targets.reshape(-1), reduction="none")
    return per_sample.reshape(g, b).mean(1)


class _SlotwiseSGD:
    """SGD with momentum and weight decay, as ``torch.optim.SGD`` (no dampening or Nesterov),
    written with separately rounded multiplies and adds.

    ``torch.optim.SGD`` uses ``add_(x, alpha=a)``, which CPU kernels compute with a fused
    multiply-add in their vectorised loop but not in the scalar tail; which elements land in
    the tail depends on a tensor's size, so a client's update would depend on its slot in the
    wide tensors. Plain ``mul`` and ``add`` round the same way everywhere.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float,
                 weight_decay: float):
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.buffers: list[torch.Tensor] | None = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        steps = [p.grad for p in params]
        if self.weight_decay:
            steps = torch._foreach_add(steps, torch._foreach_mul(params, self.weight_decay))
        if self.momentum:
            if self.buffers is None:
                self.buffers = [s.clone() for s in steps]
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, steps)
            steps = self.buffers
        torch._foreach_sub_(params, torch._foreach_mul(steps, self.lr))


def _clip_per_client(params: list[nn.Parameter], clients: int, max_norm: float) -> None:
    """``clip_grad_norm_`` applied to each client's gradients separately."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([gr.detach().reshape(clients, -1).norm(dim=1) for gr in grads])
    total = norms.norm(dim=0)  # (G,)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for gr in grads:
        per_row = coef.repeat_interleave(gr.shape[0] // clients)
        gr.mul_(per_row.view(-1, *([1] * (gr.dim() - 1))).to(gr.dtype))
