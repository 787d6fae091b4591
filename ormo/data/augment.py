"""Whole-batch image augmentation in torch: random crop with zero padding, random horizontal flip, normalization.

The standard CIFAR recipe (He et al., 2016, *Deep Residual Learning*, §4.2): pad each side by ``p`` zero pixels,
crop an H×W window at an offset drawn uniformly from {0, …, 2p}² per image, mirror the window left–right with
probability 1/2 per image, then subtract the per-channel mean and divide by the per-channel std.

Every random draw comes from the caller's ``torch.Generator`` (no global random state), so a worker's augmented
minibatch is a pure function of its key (see :func:`ormo.data.sampler.minibatch_generator`). Per batch of N images
the draws are, in this order: N row offsets, N column offsets (both skipped when ``p = 0``), then N uniform
numbers, an image being flipped when its number is < 0.5 (skipped when flipping is off). The crop and the flip are
one gather of per-image pixel indices into the padded batch: no Python loop over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rules.base import check_int_at_least, invalid
from .sampler import to_device


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x − mean_c) / std_c`` per channel of a ...×C×H×W batch (a new tensor; ``x`` is not modified)."""
    c = x.shape[-3] if x.dim() >= 3 else None
    if c is None or len(mean) != c or len(std) != c:
        raise invalid("mean/std", (tuple(mean), tuple(std)), f"one value per channel of images shaped "
                      f"{tuple(x.shape)} (channels at dim -3)")
    m = to_device(torch.tensor(mean, dtype=x.dtype), x.device)[:, None, None]
    s = to_device(torch.tensor(std, dtype=x.dtype), x.device)[:, None, None]
    return (x - m) / s


def random_crop_flip(x: Tensor, *, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Crop each image of an N×C×H×W batch from its zero-padded version at a random offset, and mirror it with
    probability 1/2; see the module docstring for the draw order. Output shape equals input shape.

    ``out[n, c, i, j] = padded[n, c, oy_n + i, ox_n + j']`` with ``j' = W − 1 − j`` if image ``n`` is flipped,
    else ``j' = j``; ``padded`` is ``x`` with ``padding`` zero pixels on every side. Offsets and coins are drawn
    on ``generator.device`` and moved to ``x.device`` (a small host-to-device copy for a CPU generator).
    """
    n, _, h, w = x.shape
    span = 2 * padding + 1
    gen_device = generator.device
    if padding:
        oy = to_device(torch.randint(0, span, (n,), generator=generator, device=gen_device), x.device)
        ox = to_device(torch.randint(0, span, (n,), generator=generator, device=gen_device), x.device)
    else:
        oy = ox = torch.zeros(n, dtype=torch.int64, device=x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # N×H
    cols = ox[:, None] + torch.arange(w, device=x.device)  # N×W
    if flip:
        flipped = to_device(torch.rand(n, generator=generator, device=gen_device) < 0.5, x.device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)  # mirror of a window = reversed column indices
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    hp, wp = h + 2 * padding, w + 2 * padding
    # One gather along the flattened padded image (on one CPU thread, ~0.4 ms for 128×3×32×32, about 5x faster than
    # advanced indexing with four index tensors and 4x faster than a loop over the (2p+1)² offsets).
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, x.shape[1], h * w)
    return padded.reshape(n, x.shape[1], hp * wp).gather(2, flat).reshape(x.shape)


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation ``aug(x, generator) -> x'`` of an N×C×H×W float batch.

    Random crop with ``crop_padding`` zero pixels (0 disables it), random horizontal flip if ``flip``, then
    :func:`normalize` if ``mean`` and ``std`` are given (typically a dataset's ``mean`` and ``std``). Evaluation
    uses :func:`normalize` alone.
    """

    #: Zero pixels added on each side before cropping back to H×W (the CIFAR recipe uses 4).
    crop_padding: int = 4
    #: Mirror each image left–right with probability 1/2.
    flip: bool = True
    #: Per-channel mean subtracted last (None: no normalization; give both or neither).
    mean: Sequence[float] | None = None
    #: Per-channel standard deviation divided by last.
    std: Sequence[float] | None = None

    def __post_init__(self) -> None:
        check_int_at_least("crop_padding", self.crop_padding, 0)
        if not isinstance(self.flip, bool):
            raise invalid("flip", self.flip, "True or False")
        if (self.mean is None) != (self.std is None):
            raise invalid("mean/std", (self.mean, self.std), "both given or both None")
        if self.mean is not None and self.std is not None:
            mean, std = _floats("mean", self.mean), _floats("std", self.std)
            if len(mean) != len(std):
                raise invalid("std", std, f"one value per channel, like mean ({len(mean)} values)")
            if any(s <= 0 for s in std):
                raise invalid("std", std, "values > 0")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)

    @property
    def random(self) -> bool:
        """Whether calls draw from the generator."""
        return self.crop_padding > 0 or self.flip

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise invalid("x", getattr(x, "shape", type(x).__name__), "a floating-point N×C×H×W batch")
        if self.random:
            if not isinstance(generator, torch.Generator):
                raise invalid("generator", generator, "a torch.Generator (random crop or flip is on)")
            x = random_crop_flip(x, padding=self.crop_padding, flip=self.flip, generator=generator)
        if self.mean is not None and self.std is not None:
            x = normalize(x, self.mean, self.std)
        return x


def _floats(field: str, values: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise invalid(field, values, "a sequence of numbers, one per channel") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise invalid(field, values, "a non-empty sequence of finite numbers")
    return out
