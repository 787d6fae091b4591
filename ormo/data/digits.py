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


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (float32, 8×8, values 0–16) and labels (int64) that scikit-learn ships as
    ``datasets/data/digits.csv.gz``, read directly: importing scikit-learn costs ~0.8 s, a third of a quickstart
    run. Checked on the way in (shape, ranges); without the file, scikit-learn's own loader is used."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    path = (Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not path.is_file():
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # a dependency of ormo, but needed only when this dataset is loaded
            raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
        raw = load_digits()
        return np.asarray(raw.images, dtype=np.float32), np.asarray(raw.target, dtype=np.int64)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.shape != (1797, 65) or table.min() < 0 or table[:, :64].max() > 16 or table[:, 64].max() > 9 \
            or not np.array_equal(table, np.round(table)):
        raise ValueError(f"{path}: not scikit-learn's digits table (expected 1797 rows of 64 pixels in 0..16 and a "
                         f"label in 0..9, got shape {table.shape}); reinstall scikit-learn")
    return table[:, :64].reshape(-1, 8, 8).astype(np.float32), table[:, 64].astype(np.int64)


@register_dataset("digits")
def digits(*, upsample: bool = False) -> Dataset:
    """1×8×8 digits in [0, 1], 10 classes; ``upsample=True`` gives 3×32×32 for CIFAR-sized models.

    Upsampling is bilinear (``align_corners=False``, which never leaves [0, 1]) followed by repeating the gray
    channel three times.
    """
    if not isinstance(upsample, bool):
        raise invalid("upsample", upsample, "True or False")
    images, target = _read_digits()
    x = torch.from_numpy(images / np.float32(16.0)).unsqueeze(1)
    y = torch.from_numpy(target)
    if upsample:
        x = F.interpolate(x, size=(_UPSAMPLED_SIZE, _UPSAMPLED_SIZE), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0).repeat(1, 3, 1, 1)  # clamp: guard float rounding just outside [0, 1]
    train, test = stratified_split(y, test_fraction=TEST_FRACTION,
                                   generator=seeded_generator(SPLIT_SEED, _STREAM_SPLIT))
    return Dataset(name="digits", train_x=x[train].contiguous(), train_y=y[train], test_x=x[test].contiguous(),
                   test_y=y[test], num_classes=10)
