"""``digits``: the 1,797 handwritten 8×8 digits bundled with scikit-learn (UCI optdigits test set); no download.

Pixels are counts 0..16 of a 4×4 block of a 32×32 bitmap; they are divided by 16 to lie in [0, 1]. The
train/test split is fixed, stratified 80/20: within each class, a permutation seeded by the constant
``SPLIT_SEED`` (independent of the run's seed, so every run evaluates on the same images) sends the first
``round(0.2 · class count)`` images to the test set: 1,438 training and 359 test images. Both sets keep the original
order of the images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..rules.base import invalid
from .base import Dataset, register_dataset, seeded_generator

#: Seed of the fixed train/test split (not the run's seed).
SPLIT_SEED = 0
#: Fraction of each class held out for testing.
TEST_FRACTION = 0.2

_STREAM_SPLIT = 0xD161
_UPSAMPLED_SIZE = 32


def stratified_split(labels: torch.Tensor, *, test_fraction: float, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending (train, test) indices: ``round(test_fraction · count)`` test examples from each class."""
    test_parts = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        perm = members[torch.randperm(len(members), generator=generator)]
        test_parts.append(perm[: round(test_fraction * len(members))])
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.cat(test_parts)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


@register_dataset("digits")
def digits(*, upsample: bool = False) -> Dataset:
    """1×8×8 digits in [0, 1], 10 classes; ``upsample=True`` gives 3×32×32 for CIFAR-sized models.

    Upsampling is bilinear (``align_corners=False``, which never leaves [0, 1]) followed by repeating the gray
    channel three times.
    """
    if not isinstance(upsample, bool):
        raise invalid("upsample", upsample, "True or False")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a dependency of ormo, but imported only when this dataset is loaded
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    raw = load_digits()
    x = torch.from_numpy(np.asarray(raw.images, dtype=np.float32) / np.float32(16.0)).unsqueeze(1)
    y = torch.from_numpy(np.asarray(raw.target, dtype=np.int64))
    if upsample:
        x = F.interpolate(x, size=(_UPSAMPLED_SIZE, _UPSAMPLED_SIZE), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0).repeat(1, 3, 1, 1)  # clamp: guard float rounding just outside [0, 1]
    train, test = stratified_split(y, test_fraction=TEST_FRACTION,
                                   generator=seeded_generator(SPLIT_SEED, _STREAM_SPLIT))
    return Dataset(name="digits", train_x=x[train].contiguous(), train_y=y[train], test_x=x[test].contiguous(),
                   test_y=y[test], num_classes=10)
