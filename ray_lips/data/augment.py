"""Batch preparation on the training device: scaling, normalisation, crop + flip.

Augmentation is done with batched tensor ops (no per-sample Python loop, no PIL), so it runs
wherever the batch lives. The random offsets and flips are drawn on the CPU from the given
generator, so the same generator state gives the same batch on any device.

Order of operations: normalise first, then zero-pad for the random crop. Padding is therefore
zero in the *normalised* space (the channel mean in pixel space), not black pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare_batch(
    x: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    augment: bool,
    generator: torch.Generator | None = None,
    pad: int = 4,
) -> torch.Tensor:
    """Return ``x`` as normalised float32 (float64 stays float64, for exactness checks) on its
    device, randomly cropped and flipped if asked.

    ``uint8`` input is scaled to [0, 1] before ``(x - mean) / std`` per channel (dim 1).
    ``augment`` applies to 4-D image batches (N, C, H, W) only; other batches, such as 1-D
    signals (N, C, L), are just normalised. ``generator`` must be a CPU generator.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(dtype)
    if x.dtype == torch.uint8:
        out = out / 255.0
    view = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(view)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(view)
    out = (out - m) / s
    if augment and x.dim() == 4:
        out = random_crop_flip(out, pad=pad, generator=generator)
    return out


def random_crop_flip(
    x: torch.Tensor, *, pad: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per sample: zero-pad by ``pad``, crop back to (H, W) at a random offset, and flip
    horizontally with probability 1/2. ``x`` is (N, C, H, W)."""
    n, c, h, w = x.shape
    if n == 0:
        return x
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()

    rows = dy[:, None] + torch.arange(h)  # (N, H): padded-row index of each output row
    cols = dx[:, None] + torch.arange(w)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)

    padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]
