"""Batch preparation on the training device: scaling, normalisation and random augmentation.

A :class:`Normalisation` says how a pool turns stored samples into model inputs: ``uint8``
pixels are scaled to [0, 1], then an ordered list of :class:`Step` s is applied. ``normalise``
steps run on every batch; the random steps (crops, flips, rotations) only on training batches
of images (N, C, H, W), with a generator. Every step is a batched tensor op on the batch's
device (no per-sample Python loop, no PIL); the random parameters are drawn on the CPU from
the given generator(s), so the same generator state gives the same batch on any device.

Two pipelines exist (``data.augment``):

- today's (``auto``/``true``): normalise, then a random crop (zero padding 4, so the padding is
  zero in the *normalised* space) and a horizontal flip drawn together (``crop_flip``);
- the reference framework's (``reference``), per dataset, see :data:`REFERENCE`: horizontal
  flip and rotation on the [0, 1] pixels (rotated-out corners are black), normalisation, then
  for CIFAR-100 a random crop whose padding is zero in normalised space.

A batch of several clients (the batched trainer's client-major ``(G * B, ...)`` batch) takes one
generator per client: client k's parameters come from its own generator, drawn in the same
order as for its batch alone, so its pixels are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ray_lips.config import DataConfig
    from ray_lips.data.in_memory import ArrayDataset

Generators = torch.Generator | Sequence[torch.Generator | None] | None
STEP_KINDS = ("normalise", "crop_flip", "flip", "rotate", "crop")


@dataclass(frozen=True)
class Step:
    """One step of a pipeline: ``size`` is the padding of a crop (pixels) or the bound of a
    rotation (degrees, drawn uniformly from [-size, size])."""

    kind: str
    size: float = 0.0

    @property
    def random(self) -> bool:
        return self.kind != "normalise"


def standard_steps(pad: int = 4) -> tuple[Step, ...]:
    """Today's pipeline (``data.augment: auto`` / ``true``): normalise, then crop + flip."""
    return (Step("normalise"), Step("crop_flip", pad))


# The reference framework's default pipeline per dataset (LIPS_SPEC.md, "Data pipeline per
# dataset"): (mean, std, steps). CIFAR-10 is not normalised (mean 0 and std 1 make the
# normalisation of evaluation batches the identity, exactly).
REFERENCE_MEAN = (0.507, 0.487, 0.441)
REFERENCE_STD = (0.267, 0.256, 0.276)
REFERENCE_ROTATION = 15.0
REFERENCE: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple[Step, ...]]] = {
    "cifar10": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), ()),
    "cifar100": (REFERENCE_MEAN, REFERENCE_STD, (
        Step("flip"), Step("rotate", REFERENCE_ROTATION), Step("normalise"), Step("crop", 4))),
    "tinyimagenet": (REFERENCE_MEAN, REFERENCE_STD, (
        Step("flip"), Step("rotate", REFERENCE_ROTATION), Step("normalise"))),
}


@dataclass(frozen=True)
class Normalisation:
    """How a pool turns stored samples into model inputs.

    ``augment``: whether training batches get the random steps. ``steps``: the pipeline;
    ``None`` is today's (normalise, then crop with padding 4 + flip).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    steps: tuple[Step, ...] | None = None


def input_pipeline(data: DataConfig, dataset: ArrayDataset) -> Normalisation:
    """The pipeline ``data.augment`` names for ``dataset`` (loaded from ``data``).

    ``auto``: the dataset's own choice (crop + flip for CIFAR and Tiny-ImageNet, none
    otherwise); ``true``/``false``: crop + flip on any image data, or none; ``reference``: the
    reference framework's pipeline for cifar10, cifar100 and tinyimagenet, ``auto`` elsewhere.
    """
    mean, std = tuple(dataset.mean), tuple(dataset.std)
    choice = data.augment
    if choice == "reference" and data.dataset in REFERENCE:
        mean, std, steps = REFERENCE[data.dataset]
        return Normalisation(mean, std, augment=any(s.random for s in steps), steps=steps)
    augment = dataset.augment if choice in ("auto", "reference") else bool(choice)
    return Normalisation(mean, std, augment=augment)


def prepare_batch(
    x: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    augment: bool,
    generator: Generators = None,
    pad: int = 4,
    steps: tuple[Step, ...] | None = None,
) -> torch.Tensor:
    """Return ``x`` as model input: float32 (float64 stays float64, for exactness checks) on
    its device, after ``steps`` (default: today's pipeline with crop padding ``pad``).

    ``uint8`` input is scaled to [0, 1] first; ``normalise`` is ``(x - mean) / std`` per
    channel (dim 1). The random steps run only when ``augment`` and only on 4-D image batches
    (N, C, H, W); other batches, such as 1-D signals (N, C, L), are just normalised.
    ``generator`` is a CPU generator, or one per client for a client-major batch of equal
    client batches.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(dtype)
    if x.dtype == torch.uint8:
        out = out / 255.0
    steps = standard_steps(pad) if steps is None else steps
    gens = list(generator) if isinstance(generator, Sequence) else [generator]
    randomise = augment and x.dim() == 4 and x.shape[0] > 0
    for step in steps:
        if step.kind == "normalise":
            out = normalise(out, mean, std)
        elif step.kind not in STEP_KINDS:
            raise ValueError(f"unknown augmentation step {step.kind!r}")
        elif randomise:
            out = _RANDOM_STEPS[step.kind](out, step.size, gens)
    return out


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel (dim 1)."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(view)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(view)
    return (x - m) / s


# ----- random parameters: per client, from its own generator --------------------------------
def _draw(gens: list[torch.Generator | None], n: int,
          draw: Callable[[int, torch.Generator | None], tuple[torch.Tensor, ...]]
          ) -> tuple[torch.Tensor, ...]:
    """``draw(b, gen)`` for each client's ``b = n / len(gens)`` samples, concatenated."""
    if n % len(gens):
        raise ValueError(f"a batch of {n} samples cannot be split over {len(gens)} clients")
    if len(gens) == 1:
        return draw(n, gens[0])
    parts = [draw(n // len(gens), gen) for gen in gens]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def _coin(b: int, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, 2, (b,), generator=gen).bool()


def _random_crop_flip(x: torch.Tensor, pad: float, gens: list) -> torch.Tensor:
    p = int(pad)

    def draw(b: int, gen: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        return dy, dx, _coin(b, gen)

    dy, dx, flip = _draw(gens, x.shape[0], draw)
    return crop(x, dy, dx, pad=p, flip=flip)


def _random_crop(x: torch.Tensor, pad: float, gens: list) -> torch.Tensor:
    p = int(pad)

    def draw(b: int, gen: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 2 * p + 1, (b,), generator=gen),
                torch.randint(0, 2 * p + 1, (b,), generator=gen))

    dy, dx = _draw(gens, x.shape[0], draw)
    return crop(x, dy, dx, pad=p)


def _random_flip(x: torch.Tensor, size: float, gens: list) -> torch.Tensor:
    (flip,) = _draw(gens, x.shape[0], lambda b, gen: (_coin(b, gen),))
    return hflip(x, flip)


def _random_rotate(x: torch.Tensor, degrees: float, gens: list) -> torch.Tensor:
    def draw(b: int, gen: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        u = torch.rand(b, generator=gen, dtype=torch.float64)
        return ((2.0 * u - 1.0) * degrees,)

    (angles,) = _draw(gens, x.shape[0], draw)
    return rotate(x, angles)


_RANDOM_STEPS = {"crop_flip": _random_crop_flip, "crop": _random_crop, "flip": _random_flip,
                 "rotate": _random_rotate}


# ----- the operations, given their parameters -----------------------------------------------
def crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, *, pad: int,
         flip: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample: zero-pad (N, C, H, W) by ``pad``, take the (H, W) window at row ``dy[n]``,
    column ``dx[n]`` of the padded image, and mirror it horizontally where ``flip[n]``."""
    n, c, h, w = x.shape
    rows = dy[:, None] + torch.arange(h)  # (N, H): padded-row index of each output row
    cols = dx[:, None] + torch.arange(w)  # (N, W)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    picked = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return picked.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_crop_flip(x: torch.Tensor, *, pad: int = 4,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Today's augmentation of (N, C, H, W): zero-pad by ``pad``, crop back to (H, W) at a
    random offset, and flip horizontally with probability 1/2."""
    if x.shape[0] == 0:
        return x
    return _random_crop_flip(x, pad, [generator])


def hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the samples of (N, C, H, W) where the boolean ``flip[n]`` is set."""
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each sample of float (N, C, H, W) counter-clockwise by ``degrees[n]`` about the image
    centre, keeping its size: nearest-neighbour sampling, zero outside the image.

    This is torchvision's ``RandomRotation`` default (``InterpolationMode.NEAREST``,
    ``expand=False``, ``fill=0``) and PIL's ``Image.rotate(angle, Image.NEAREST)``: output
    pixel centres are mapped back into the input and read from the pixel they fall in, with
    pixel (i, j) covering [j, j + 1) x [i, i + 1) and the centre at (W / 2, H / 2).
    """
    n, _, h, w = x.shape
    rad = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    # affine_grid's coordinates run from -1 to 1 across the image's edges (align_corners=
    # False), so the pixel-space rotation is rescaled by the aspect ratio.
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * (h / w)
    theta[:, 1, 0], theta[:, 1, 1] = sin * (w / h), cos
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), [n, 1, h, w],
                         align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
