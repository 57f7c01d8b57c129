"""Model zoo for LIPS experiments and the rule for which parameters LIPS may sparsify.

Every architecture is written once and parameterised by the signal dimension (1 for ``(C, L)``
signals, 2 for ``(C, H, W)`` images), so the ``*_1d`` models are the same plans with
``Conv1d``/``BatchNorm1d``/``MaxPool1d`` layers. ``model`` may also be the import path of a
builder of the user's (``package.module:build``), called as ``build(sample_shape, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = (
    "resnet4",
    "resnet6",
    "resnet8",
    "resnet10",
    "resnet18",
    "vgg11_bn",
    "smallcnn",
    "resnet8_1d",
    "resnet10_1d",
    "vgg11_bn_1d",
)

RESNET_BLOCKS: dict[int, tuple[int, ...]] = {
    4: (1,),
    6: (1, 1),
    8: (1, 1, 1),
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
}
RESNET_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)

# CIFAR VGG11: numbers are 3x3 conv widths, "M" is a 2-wide max-pool.
VGG11_PLAN: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}
_BN: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAXPOOL: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVGPOOL: dict[int, type[nn.Module]] = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# What counts as a convolution (LIPS eligibility) or a BatchNorm in any model, the user's
# included: every torch convolution (1-, 2-, 3-D, transposed) and every BatchNorm.
_ANY_CONV = nn.modules.conv._ConvNd
_ANY_BN = nn.modules.batchnorm._BatchNorm


def _conv(dim: int, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False):
    """A 'same'-padded convolution (padding = kernel // 2) of the given dimension."""
    return _CONV[dim](cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), unit/zero BatchNorm, zero conv biases.

    Linear layers keep PyTorch's default init. Uses torch's global RNG, so construction is
    deterministic once the caller has seeded it.
    """
    for module in model.modules():
        if isinstance(module, _CONV_TYPES):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _BN_TYPES):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """Two 3-wide convs with BN; identity shortcut, or 1-wide conv + BN when the shape changes."""

    def __init__(self, dim: int, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(dim, cin, cout, 3, stride)
        self.bn1 = _BN[dim](cout)
        self.conv2 = _conv(dim, cout, cout, 3)
        self.bn2 = _BN[dim](cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv(dim, cin, cout, 1, stride), _BN[dim](cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet: 7-wide stride-2 stem, 3-wide stride-2 max-pool, one stage per block count."""

    def __init__(self, dim: int, in_channels: int, blocks: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = _conv(dim, in_channels, 64, 7, stride=2)
        self.bn1 = _BN[dim](64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = _MAXPOOL[dim](3, stride=2, padding=1)
        cin = 64
        for i, count in enumerate(blocks):
            width, stride = RESNET_WIDTHS[i], (1 if i == 0 else 2)
            stage = []
            for j in range(count):
                stage.append(BasicBlock(dim, cin, width, stride if j == 0 else 1))
                cin = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.avgpool = _AVGPOOL[dim](1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    """CIFAR-style VGG: conv(bias)-BN-ReLU stack, adaptive average pool, one linear classifier.

    Max-pools use ``ceil_mode`` so short inputs never shrink to size 0.
    """

    def __init__(
        self, dim: int, in_channels: int, plan: Sequence[int | str], num_classes: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in plan:
            if item == "M":
                layers.append(_MAXPOOL[dim](2, stride=2, ceil_mode=True))
            else:
                cout = int(item)
                layers += [_conv(dim, cin, cout, 3, bias=True), _BN[dim](cout), nn.ReLU(True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = _AVGPOOL[dim](1)
        self.classifier = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (32, 64, 64) with one pool; fits 8x8 images and short signals."""

    def __init__(self, dim: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        bn, pool = _BN[dim], _MAXPOOL[dim]
        self.features = nn.Sequential(
            _conv(dim, in_channels, 32, 3),
            bn(32),
            nn.ReLU(inplace=True),
            _conv(dim, 32, 64, 3),
            bn(64),
            nn.ReLU(inplace=True),
            pool(2, stride=2, ceil_mode=True),
            _conv(dim, 64, 64, 3),
            bn(64),
            nn.ReLU(inplace=True),
        )
        self.avgpool = _AVGPOOL[dim](1)
        self.classifier = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_model(name: str, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build model ``name`` (or the user's builder ``name`` names) for samples of
    ``sample_shape`` ((C, H, W) or (C, L)).

    Raises ValueError for unknown names, bad shapes, or a 1-D/2-D mismatch; ConfigError
    (naming ``model``) for a builder that cannot be imported or builds no fitting model.
    """
    if name not in MODEL_NAMES and ":" in name:
        return build_user_model(name, sample_shape, num_classes)
    if name not in MODEL_NAMES:
        raise ValueError(f"model: unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    shape = tuple(sample_shape)
    if len(shape) not in (2, 3) or any(int(s) < 1 for s in shape):
        raise ValueError(
            f"model: {name!r} needs sample_shape (C, H, W) or (C, L) with positive sizes, "
            f"got {shape}"
        )
    if num_classes < 1:
        raise ValueError(f"model: {name!r} needs num_classes >= 1, got {num_classes}")
    dim = len(shape) - 1
    if name != "smallcnn":
        wants = 1 if name.endswith("_1d") else 2
        if dim != wants:
            kind = "1-D (C, L)" if wants == 1 else "2-D (C, H, W)"
            raise ValueError(
                f"model: {name!r} expects {kind} samples, got sample_shape {shape}; "
                f"use {'a *_1d model' if dim == 1 else 'a model without the _1d suffix'}"
            )
    in_channels = int(shape[0])
    base = name.removesuffix("_1d")
    if base.startswith("resnet"):
        return ResNet(dim, in_channels, RESNET_BLOCKS[int(base[len("resnet") :])], num_classes)
    if base == "vgg11_bn":
        return VGG(dim, in_channels, VGG11_PLAN, num_classes)
    return SmallCNN(dim, in_channels, num_classes)


def build_user_model(path: str, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``build(sample_shape, num_classes)`` of the builder ``path`` names, checked: it must
    return an ``nn.Module`` with float parameters that maps a batch of two zero samples to
    (2, num_classes) logits (checked in eval mode without gradients; the module is returned in
    training mode)."""
    from ray_lips.config import ConfigError
    from ray_lips.data.userimport import import_object

    shape = tuple(int(s) for s in sample_shape)
    call = f"model: {path}({shape}, {num_classes})"
    builder = import_object(path, "model")
    try:
        model = builder(shape, num_classes)
    except Exception as err:  # noqa: BLE001 - the user's builder failed: say how, in one line
        raise ConfigError(f"{call} raised {_one_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{call} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.is_floating_point() for p in model.parameters()):
        raise ConfigError(f"{call} returned a module without float parameters to train")
    try:
        with torch.no_grad():
            model.eval()
            out = model(torch.zeros((2, *shape)))
    except Exception as err:  # noqa: BLE001 - the forward pass failed: say how, in one line
        hint = (f" (samples of shape {shape} are read as (C, L) signals; for a 2-D model "
                "give x as (N, C, H, W), e.g. x[:, None])" if len(shape) == 2 else "")
        raise ConfigError(f"{call}: a forward pass on a batch of shape {(2, *shape)} failed: "
                          f"{_one_line(err)}{hint}") from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{call}: a batch of shape {(2, *shape)} gives {got}; expected "
                          f"logits of shape (2, {num_classes})")
    return model


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def eligible_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters LIPS may sparsify.

    Weight and bias of every convolution (any torch ``ConvNd``, transposed included) except
    the first one in module order (the stem: the first registered, which is the first applied
    in ``nn.Sequential``-like models); never BatchNorm, Linear or other parameters. A model
    with fewer than two convolutions has none.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, _ANY_CONV)]
    known = {name for name, _ in model.named_parameters()}  # drops aliases of shared params
    names: list[str] = []
    for module_name, module in convs[1:]:
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if full in known:
                names.append(full)
    return names


def check_lips_eligible(eligible: list[str], model_name: str) -> None:
    """``handout: lips`` needs something to sparsify: ConfigError for a model whose
    :func:`eligible_parameter_names` is empty (fewer than two convolutions), as its "LIPS" run
    would be FedAvg under another name."""
    if not eligible:
        from ray_lips.config import ConfigError

        raise ConfigError(
            f"handout: 'lips' sparsifies every convolution but the first, and model "
            f"{model_name!r} has fewer than two convolutions; use handout: dense")


@dataclass(frozen=True)
class LayerGroup:
    """One parameter-owning module, for per-layer metrics."""

    name: str  # module name, e.g. "features.4" or "layer2.0.conv1"
    kind: str  # "conv", "bn", "linear" (or "other" for any other parameter owner)
    param_names: tuple[str, ...]
    eligible: bool  # True if its parameters are LIPS-eligible


def _kind(module: nn.Module) -> str:
    if isinstance(module, _ANY_CONV):
        return "conv"
    if isinstance(module, _ANY_BN):
        return "bn"
    if isinstance(module, nn.Linear):
        return "linear"
    return "other"


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """One group per module that directly owns parameters, in module order.

    Together the groups cover every entry of ``model.named_parameters()`` exactly once.
    """
    eligible = set(eligible_parameter_names(model))
    seen: set[int] = set()
    groups: list[LayerGroup] = []
    for module_name, module in model.named_modules():
        params = []
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # shared parameter already listed under an earlier module
                continue
            seen.add(id(param))
            params.append(f"{module_name}.{param_name}" if module_name else param_name)
        if params:
            groups.append(
                LayerGroup(
                    name=module_name,
                    kind=_kind(module),
                    param_names=tuple(params),
                    eligible=any(p in eligible for p in params),
                )
            )
    return groups


def classifier_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's classifier: its last ``nn.Linear`` in module order (``fc`` of the ResNets,
    ``classifier`` of VGG and SmallCNN), with its module name.

    The rule for every model, a user's included: the classifier's input is the model's
    *representation* (MOON's contrastive loss reads it) and the classifier's parameters are its
    *head* (FedRep, FedBABU); everything else is the *body*. A model whose last ``nn.Linear``
    is not the layer that maps the representation to the logits must be written so that it is.
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        from ray_lips.config import ConfigError

        raise ConfigError(f"model: {type(model).__name__} has no nn.Linear classifier, so no "
                          "head and no representation (the algorithm needs them)")
    return found[-1]


def head_parameter_names(model: nn.Module) -> list[str]:
    """The head's parameters: those of :func:`classifier_layer`."""
    name, layer = classifier_layer(model)
    return [f"{name}.{p}" if name else p for p, _ in layer.named_parameters(recurse=False)]


def batchnorm_entry_names(model: nn.Module) -> list[str]:
    """Every state entry of every BatchNorm layer: weight, bias, running mean and variance and
    the batch counter."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, _ANY_BN):
            prefix = f"{module_name}." if module_name else ""
            names += [prefix + k for k in module.state_dict()]
    return names
