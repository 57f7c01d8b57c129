"""``data.augment: reference``: the reference framework's pipeline per dataset, and the batched
ops it is made of, against known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ray_lips.cluster.sweep_spec import load_spec
from ray_lips.config import validate_config
from ray_lips.data.augment import (
    REFERENCE,
    REFERENCE_MEAN,
    REFERENCE_STD,
    Normalisation,
    Step,
    crop,
    hflip,
    input_pipeline,
    normalise,
    prepare_batch,
    rotate,
)
from ray_lips.data.datasets import ArrayDataset

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def _images(n: int = 6, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- the ops -----------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(8, 8), (5, 7)])
def test_rotation_by_zero_is_the_identity(h, w):
    x = _images(4, h, w).float()
    assert torch.equal(rotate(x, torch.zeros(4)), x)


def test_rotation_by_90_degrees_is_rot90_counter_clockwise():
    x = _images(3, 8, 8).float()
    assert torch.equal(rotate(x, torch.full((3,), 90.0)), torch.rot90(x, 1, dims=(2, 3)))
    assert torch.equal(rotate(x, torch.full((3,), -90.0)), torch.rot90(x, -1, dims=(2, 3)))
    odd = _images(2, 5, 7).float()  # not square: a half turn keeps the frame
    assert torch.equal(rotate(odd, torch.full((2,), 180.0)), odd.flip(2).flip(3))
    both = rotate(x[:2], torch.tensor([0.0, 90.0]))  # one angle per sample
    assert torch.equal(both[0], x[0]) and torch.equal(both[1], torch.rot90(x[1], 1, (1, 2)))


def test_rotation_is_pil_nearest_with_black_fill():
    """What torchvision's RandomRotation does to the reference's PIL images (nearest, fill 0):
    the same pixels but for sampling points that fall within float32 rounding of a pixel
    boundary (measured: 2e-4 of the pixels)."""
    rng = np.random.default_rng(0)
    differing = total = 0
    for _ in range(20):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        angle = float(rng.uniform(-15, 15))
        expected = np.asarray(Image.fromarray(pixels).rotate(angle, Image.NEAREST, fillcolor=0))
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
        got = rotate(x, torch.tensor([angle]))[0].permute(1, 2, 0).numpy().astype(np.uint8)
        differing += int((got != expected).any(axis=2).sum())
        total += 32 * 32
    assert differing / total < 2e-3


def test_rotated_out_corners_are_zero():
    out = rotate(torch.ones(1, 1, 9, 9), torch.tensor([45.0]))[0, 0]
    assert out[4, 4] == 1 and out[0, 0] == out[0, 8] == out[8, 0] == out[8, 8] == 0


def test_flip_and_crop_known_answers():
    x = torch.arange(9.0).view(1, 1, 3, 3).repeat(2, 1, 1, 1)
    flipped = hflip(x, torch.tensor([False, True]))
    assert torch.equal(flipped[0, 0], x[0, 0])
    assert flipped[1, 0].tolist() == [[2, 1, 0], [5, 4, 3], [8, 7, 6]]
    # pad 1; window at padded row dy, column dx
    out = crop(x, torch.tensor([0, 2]), torch.tensor([0, 1]), pad=1)
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 3, 4]]
    assert out[1, 0].tolist() == [[3, 4, 5], [6, 7, 8], [0, 0, 0]]
    mirrored = crop(x, torch.tensor([1, 1]), torch.tensor([2, 1]), pad=1,
                    flip=torch.tensor([True, True]))
    assert mirrored[0, 0].tolist() == [[0, 2, 1], [0, 5, 4], [0, 8, 7]]
    assert torch.equal(mirrored[1], x[1].flip(2))


def test_normalisation_statistics_of_the_reference():
    assert REFERENCE_MEAN == (0.507, 0.487, 0.441) and REFERENCE_STD == (0.267, 0.256, 0.276)
    x = torch.full((1, 3, 2, 2), 0.5)
    out = normalise(x, REFERENCE_MEAN, REFERENCE_STD)
    for c in range(3):
        torch.testing.assert_close(out[0, c], torch.full((2, 2), (0.5 - REFERENCE_MEAN[c])
                                                        / REFERENCE_STD[c]))


# ----- the pipelines -------------------------------------------------------------------------
def _dataset(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), augment=True) -> ArrayDataset:
    empty = torch.zeros(0)
    return ArrayDataset(empty, empty, empty, empty, 10, (3, 32, 32), mean, std, augment)


def _data(dataset: str, augment) -> object:
    return validate_config({"data": {"dataset": dataset, "augment": augment, "clients": 2},
                            "resources": {"pools": 1}}).data


def test_reference_is_chosen_per_dataset_and_the_other_choices_keep_todays_pipeline():
    ten = input_pipeline(_data("cifar10", "reference"), _dataset())
    assert (ten.mean, ten.std, ten.steps, ten.augment) == ((0.0,) * 3, (1.0,) * 3, (), False)
    hundred = input_pipeline(_data("cifar100", "reference"), _dataset())
    assert hundred.steps == (Step("flip"), Step("rotate", 15.0), Step("normalise"),
                             Step("crop", 4))
    assert (hundred.mean, hundred.std, hundred.augment) == (REFERENCE_MEAN, REFERENCE_STD, True)
    tiny = input_pipeline(_data("tinyimagenet", "reference"), _dataset())
    assert tiny.steps == (Step("flip"), Step("rotate", 15.0), Step("normalise"))
    assert tiny.mean == REFERENCE_MEAN
    # today's pipeline under its names, and `reference` where the reference has none
    stats = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    assert input_pipeline(_data("cifar100", "auto"), _dataset()) == Normalisation(
        **stats, augment=True)
    assert input_pipeline(_data("cifar100", False), _dataset()) == Normalisation(
        **stats, augment=False)
    assert input_pipeline(_data("digits", True), _dataset(augment=False)).augment
    assert input_pipeline(_data("synthetic", "reference"), _dataset(augment=False)) == (
        Normalisation(**stats, augment=False))


def _run(x, pipeline: Normalisation, generator=None, augment=True) -> torch.Tensor:
    return prepare_batch(x, pipeline.mean, pipeline.std, augment=augment and pipeline.augment,
                         generator=generator, steps=pipeline.steps)


def test_cifar10_reference_leaves_pixels_in_unit_range_untouched():
    x = _images(5)
    ten = input_pipeline(_data("cifar10", "reference"), _dataset())
    assert torch.equal(_run(x, ten, _gen()), x.float() / 255.0)
    assert torch.equal(_run(x, ten, augment=False), x.float() / 255.0)
    # the unwired evaluation path (normalise with the pipeline's mean and std) agrees exactly
    assert torch.equal(prepare_batch(x, ten.mean, ten.std, augment=False), x.float() / 255.0)


@pytest.mark.parametrize("dataset", ["cifar100", "tinyimagenet"])
def test_reference_pipeline_is_flip_rotate_normalise_then_crop_in_that_order(dataset):
    """The pipeline equals the ops composed in the reference's order, each sample's
    parameters drawn from the generator in that order (flip, angle, then crop offsets)."""
    x = _images(6, 12, 12, seed=3)
    pipeline = input_pipeline(_data(dataset, "reference"), _dataset())
    got = _run(x, pipeline, _gen(7))
    gen = _gen(7)
    flip = torch.randint(0, 2, (6,), generator=gen).bool()
    angles = (2.0 * torch.rand(6, generator=gen, dtype=torch.float64) - 1.0) * 15.0
    expected = normalise(rotate(hflip(x.float() / 255.0, flip), angles), REFERENCE_MEAN,
                         REFERENCE_STD)
    if dataset == "cifar100":
        dy = torch.randint(0, 9, (6,), generator=gen)
        dx = torch.randint(0, 9, (6,), generator=gen)
        expected = crop(expected, dy, dx, pad=4)
    assert torch.equal(got, expected)
    assert not torch.equal(got, _run(x, pipeline, _gen(8)))
    # evaluation batches: normalised only
    assert torch.equal(_run(x, pipeline, augment=False),
                       normalise(x.float() / 255.0, REFERENCE_MEAN, REFERENCE_STD))


def test_cifar100_padding_is_zero_after_normalisation_and_rotated_corners_are_black():
    white = torch.full((64, 3, 16, 16), 255, dtype=torch.uint8)
    out = _run(white, input_pipeline(_data("cifar100", "reference"), _dataset()), _gen(1))
    m = torch.tensor(REFERENCE_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(REFERENCE_STD).view(1, 3, 1, 1)
    white_n, black_n = (1 - m) / s, (0 - m) / s
    is_white = torch.isclose(out, white_n.expand_as(out))
    is_black = torch.isclose(out, black_n.expand_as(out))
    is_pad = out == 0
    assert bool((is_white | is_black | is_pad).all())
    assert is_black.any() and is_pad.any() and is_white.float().mean() > 0.5


def test_each_client_of_a_batched_group_gets_its_own_pixels():
    x = _images(12, 8, 8, seed=5)
    pipeline = input_pipeline(_data("cifar100", "reference"), _dataset())
    together = _run(x, pipeline, [_gen(10 + k) for k in range(3)])
    for k in range(3):
        assert torch.equal(together[4 * k:4 * k + 4], _run(x[4 * k:4 * k + 4], pipeline,
                                                            _gen(10 + k)))


def test_todays_pipeline_is_normalise_then_crop_and_flip_drawn_together():
    x = _images(5, 8, 8, seed=2)
    got = prepare_batch(x, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), augment=True, generator=_gen(4))
    gen = _gen(4)
    dy, dx = (torch.randint(0, 9, (5,), generator=gen) for _ in range(2))
    flip = torch.randint(0, 2, (5,), generator=gen).bool()
    expected = crop(normalise(x.float() / 255.0, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)), dy, dx,
                    pad=4, flip=flip)
    assert torch.equal(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_reference_pipeline_gives_the_same_pixels_on_cuda():
    x = _images(64, 32, 32, seed=9)
    pipeline = input_pipeline(_data("cifar100", "reference"), _dataset())
    on_cpu = _run(x, pipeline, _gen(3))
    on_gpu = _run(x.cuda(), pipeline, _gen(3))
    assert on_gpu.device.type == "cuda"
    assert (on_gpu.cpu() != on_cpu).float().mean() < 1e-3


# ----- configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["paper_cifar10", "paper_cifar100", "paper_tinyimagenet",
                                  "paper_baselines_cifar10"])
def test_the_paper_specs_use_the_reference_pipeline(name):
    assert all(c.data.augment == "reference" for c in load_spec(SWEEPS / f"{name}.yaml")
               .trial_configs())


def test_pools_receive_the_reference_pipeline():
    from ray_lips.core.run import build_payloads

    cfg = validate_config({"data": {"dataset": "cifar100", "augment": "reference",
                                    "partition": "iid", "clients": 2, "train_per_client": 4,
                                    "test_per_client": 2},
                           "train": {"eval_test_samples": 0}, "resources": {"pools": 1}})
    labels = torch.arange(20) % 100
    dataset = ArrayDataset(_images(20, 32, 32), labels, _images(20, 32, 32), labels, 100,
                           (3, 32, 32), (0.5,) * 3, (0.25,) * 3, True)
    (payload,) = build_payloads(cfg, dataset, [[0, 1]])
    assert payload.norm == input_pipeline(cfg.data, dataset)
    assert payload.norm.steps == REFERENCE["cifar100"][2]
