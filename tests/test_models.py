"""Tests for the model zoo and the LIPS eligibility rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ray_lips.models import (
    MODEL_NAMES,
    build_model,
    eligible_parameter_names,
    layer_groups,
)

CONVS = (nn.Conv1d, nn.Conv2d)

# (model, sample_shape, num_classes) for every model on the inputs it is meant for.
CASES = [
    ("resnet4", (3, 32, 32), 10),
    ("resnet6", (3, 32, 32), 10),
    ("resnet8", (3, 32, 32), 10),
    ("resnet10", (3, 32, 32), 10),
    ("resnet18", (3, 32, 32), 10),
    ("vgg11_bn", (3, 32, 32), 10),
    ("resnet10", (3, 64, 64), 200),
    ("vgg11_bn", (3, 64, 64), 200),
    ("smallcnn", (1, 8, 8), 10),
    ("smallcnn", (1, 28, 28), 10),
    ("smallcnn", (1, 40), 10),
    ("smallcnn", (1, 8), 10),
    ("resnet8_1d", (1, 40), 10),
    ("resnet10_1d", (1, 40), 10),
    ("vgg11_bn_1d", (1, 40), 10),
    ("vgg11_bn_1d", (1, 8), 10),
]
ONE_PER_MODEL = [
    (name, (1, 40) if name.endswith("_1d") else (3, 32, 32), 10) for name in MODEL_NAMES
]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CONVS)]


@pytest.mark.parametrize(("name", "shape", "classes"), CASES)
def test_forward_shape(name: str, shape: tuple[int, ...], classes: int) -> None:
    model = build_model(name, shape, classes)
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_vgg11_bn_parameter_count() -> None:
    plan = [64, 128, 256, 256, 512, 512, 512, 512]
    widths = [3, *plan[:-1]]
    convs = sum(cin * cout * 9 + cout for cin, cout in zip(widths, plan, strict=True))
    bns = sum(2 * c for c in plan)
    expected = convs + bns + 512 * 10 + 10
    assert expected == 9_231_114
    assert _count(build_model("vgg11_bn", (3, 32, 32), 10)) == expected


def test_vgg11_bn_single_linear_classifier() -> None:
    model = build_model("vgg11_bn", (3, 32, 32), 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 512
    assert len(_conv_modules(model)) == 8
    assert all(m.bias is not None for _, m in _conv_modules(model))


def test_resnet8_structure() -> None:
    model = build_model("resnet8", (3, 32, 32), 10)
    stem = model.conv1
    assert isinstance(stem, nn.Conv2d)
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7), (2, 2), (3, 3))
    assert stem.bias is None
    stages = [getattr(model, f"layer{i}") for i in (1, 2, 3)]
    assert not hasattr(model, "layer4")
    assert [len(s) for s in stages] == [1, 1, 1]
    assert [s[0].conv2.out_channels for s in stages] == [64, 128, 256]
    assert stages[0][0].downsample is None
    assert stages[1][0].downsample is not None and stages[1][0].conv1.stride == (2, 2)
    assert model.fc.in_features == 256
    # stem + BN, three BasicBlocks (two with a 1x1 projection), classifier
    expected = 3 * 64 * 49 + 2 * 64
    for cin, cout in [(64, 64), (64, 128), (128, 256)]:
        expected += cin * cout * 9 + cout * cout * 9 + 4 * cout
        if cin != cout:
            expected += cin * cout + 2 * cout
    expected += 256 * 10 + 10
    assert _count(model) == expected == 1_235_274


def test_resnet18_has_two_blocks_per_stage() -> None:
    model = build_model("resnet18", (3, 32, 32), 10)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert model.fc.in_features == 512


def test_1d_variants_use_1d_layers() -> None:
    for name in ("resnet8_1d", "resnet10_1d", "vgg11_bn_1d"):
        model = build_model(name, (1, 40), 10)
        kinds = {type(m) for m in model.modules()}
        assert nn.Conv1d in kinds and nn.BatchNorm1d in kinds
        assert not kinds & {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d}
    assert isinstance(build_model("smallcnn", (1, 40), 10).features[0], nn.Conv1d)
    assert isinstance(build_model("smallcnn", (1, 8, 8), 10).features[0], nn.Conv2d)


@pytest.mark.parametrize(("name", "shape", "classes"), ONE_PER_MODEL)
def test_eligibility_rule(name: str, shape: tuple[int, ...], classes: int) -> None:
    model = build_model(name, shape, classes)
    eligible = eligible_parameter_names(model)
    assert len(eligible) == len(set(eligible))
    convs = _conv_modules(model)
    stem_name, _ = convs[0]
    expected = {f"{n}.{p}" for n, m in convs[1:] for p, _ in m.named_parameters(recurse=False)}
    assert set(eligible) == expected
    assert not any(e.startswith(f"{stem_name}.") for e in eligible)
    assert set(eligible) <= dict(model.named_parameters()).keys()
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            for p, _ in module.named_parameters(recurse=False):
                assert f"{module_name}.{p}" not in eligible


def test_eligibility_concrete_names() -> None:
    resnet = eligible_parameter_names(build_model("resnet8", (3, 32, 32), 10))
    assert "conv1.weight" not in resnet
    assert "layer1.0.conv1.weight" in resnet and "layer2.0.downsample.0.weight" in resnet
    assert len(resnet) == 8  # 6 block convs + 2 projections, no biases
    vgg = eligible_parameter_names(build_model("vgg11_bn", (3, 32, 32), 10))
    assert "features.0.weight" not in vgg and "features.0.bias" not in vgg
    assert len(vgg) == 14  # 7 non-stem convs, weight and bias each
    assert sum(n.endswith(".bias") for n in vgg) == 7
    small = eligible_parameter_names(build_model("smallcnn", (1, 8, 8), 10))
    assert small == ["features.3.weight", "features.7.weight"]


@pytest.mark.parametrize(
    ("name_2d", "name_1d"),
    [("resnet8", "resnet8_1d"), ("resnet10", "resnet10_1d"), ("vgg11_bn", "vgg11_bn_1d")],
)
def test_eligibility_same_for_1d_and_2d(name_2d: str, name_1d: str) -> None:
    two = eligible_parameter_names(build_model(name_2d, (3, 32, 32), 10))
    one = eligible_parameter_names(build_model(name_1d, (1, 40), 10))
    assert two == one


@pytest.mark.parametrize(("name", "shape", "classes"), ONE_PER_MODEL)
def test_layer_groups_cover_parameters_once(
    name: str, shape: tuple[int, ...], classes: int
) -> None:
    model = build_model(name, shape, classes)
    groups = layer_groups(model)
    listed = [p for g in groups for p in g.param_names]
    assert listed == [n for n, _ in model.named_parameters()]
    assert {g.kind for g in groups} <= {"conv", "bn", "linear"}
    eligible = set(eligible_parameter_names(model))
    conv_groups = [g for g in groups if g.kind == "conv"]
    assert not conv_groups[0].eligible
    assert all(g.eligible for g in conv_groups[1:])
    for g in groups:
        assert g.eligible == (g.kind == "conv" and g is not conv_groups[0])
        assert g.eligible == set(g.param_names).issubset(eligible)
    assert groups[-1].kind == "linear"


def test_layer_group_names() -> None:
    groups = {g.name: g for g in layer_groups(build_model("resnet8", (3, 32, 32), 10))}
    assert groups["layer2.0.conv1"].kind == "conv"
    assert groups["layer2.0.conv1"].param_names == ("layer2.0.conv1.weight",)
    assert groups["bn1"].kind == "bn" and groups["fc"].kind == "linear"
    assert groups["fc"].param_names == ("fc.weight", "fc.bias")


def test_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match="model"):
        build_model("resnet50", (3, 32, 32), 10)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("resnet8", (1, 40)),
        ("vgg11_bn", (1, 40)),
        ("resnet8_1d", (3, 32, 32)),
        ("vgg11_bn_1d", (3, 32, 32)),
        ("smallcnn", (3,)),
        ("smallcnn", (1, 2, 8, 8)),
    ],
)
def test_dimension_mismatch_raises(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="model"):
        build_model(name, shape, 10)


@pytest.mark.parametrize(
    ("name", "shape"), [("resnet8", (3, 32, 32)), ("vgg11_bn_1d", (1, 40)), ("smallcnn", (1, 8, 8))]
)
def test_construction_is_deterministic(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(123)
    first = build_model(name, shape, 10).state_dict()
    torch.manual_seed(123)
    second = build_model(name, shape, 10).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(124)
    third = build_model(name, shape, 10).state_dict()
    assert not all(torch.equal(first[k], third[k]) for k in first)
