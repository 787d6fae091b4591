"""``synthetic``: seeded class-conditional Gaussian images of any shape, for tests and quick runs; no files.

Class ``c`` has a prototype image ``μ_c`` with pixels drawn i.i.d. from U(0.25, 0.75). An example of class ``c`` is
``clamp(μ_c + noise · ε, 0, 1)`` with ``ε ~ N(0, I)``; the clamp keeps the [0, 1] convention of every dataset
(it matters only when ``noise`` is large). Labels cycle through the classes (sizes differ by at most one) in a
seeded random order. Prototypes, training set and test set come from three generator streams of ``seed``, so the
test set does not change with ``train_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..rules.base import check_int_at_least, invalid
from .base import Dataset, register_dataset, seeded_generator

_STREAM_PROTOTYPES = 0x5470
_STREAM_TRAIN = 0x5471
_STREAM_TEST = 0x5472


@register_dataset("synthetic")
def synthetic(*, seed: int, num_classes: int = 10, image_shape: Sequence[int] = (3, 32, 32),
              train_size: int = 1000, test_size: int = 200, noise: float = 0.2) -> Dataset:
    """``train_size`` training and ``test_size`` test images of shape ``image_shape`` (C, H, W), fully determined
    by ``seed`` and the options."""
    check_int_at_least("num_classes", num_classes, 1)
    shape = _check_shape(image_shape)
    check_int_at_least("train_size", train_size, 1)
    check_int_at_least("test_size", test_size, 1)
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not math.isfinite(noise) or noise < 0:
        raise invalid("noise", noise, "a finite number >= 0")
    prototypes = 0.25 + 0.5 * torch.rand(num_classes, *shape, generator=seeded_generator(seed, _STREAM_PROTOTYPES))
    train_x, train_y = _sample(prototypes, train_size, noise, seeded_generator(seed, _STREAM_TRAIN))
    test_x, test_y = _sample(prototypes, test_size, noise, seeded_generator(seed, _STREAM_TEST))
    return Dataset(name="synthetic", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                   num_classes=num_classes)


def _sample(prototypes: torch.Tensor, size: int, noise: float, g: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    labels = (torch.arange(size) % prototypes.shape[0])[torch.randperm(size, generator=g)]
    eps = torch.randn(size, *prototypes.shape[1:], generator=g)
    return (prototypes[labels] + noise * eps).clamp_(0.0, 1.0), labels


def _check_shape(image_shape: Any) -> tuple[int, int, int]:
    if (not isinstance(image_shape, Sequence) or isinstance(image_shape, str) or len(image_shape) != 3
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in image_shape)):
        raise invalid("image_shape", image_shape, "three positive integers (C, H, W)")
    return (image_shape[0], image_shape[1], image_shape[2])
