"""Datasets for the training experiments: in-memory image tensors, seeded subsets, augmentation and sampling.

Public API::

    ds = ormo.data.load_dataset("cifar10", data_dir="~/data", download=True, subset=5000, seed=0)
    ds.train_x, ds.train_y, ds.test_x, ds.test_y, ds.mean, ds.std, ds.image_shape, ds.num_classes
    aug = Augment(crop_padding=4, flip=True, mean=ds.mean, std=ds.std)
    idx = minibatch_indices(ds.train_size, 128, seed=0, worker=k, index=t, step=h)
    xb = aug(ds.train_x[idx], minibatch_generator(0, k, t, h, AUGMENT_STREAM))

Registered datasets: ``digits`` (scikit-learn's bundled 8×8 digits), ``fashion-mnist`` (alias ``fashion_mnist``;
read offline from Debian's ``dataset-fashion-mnist`` when installed), ``mnist``, ``cifar10``, ``cifar100``,
``tinyimagenet`` and ``synthetic``; add your own with :func:`register_dataset`. Importing this package registers
them all (their heavy imports, scikit-learn and Pillow, happen only when loading).
"""

from . import cifar, digits, mnist, synthetic, tinyimagenet  # noqa: F401  (registration side effects)
from .augment import Augment, normalize, random_crop_flip
from .base import (
    DATA_ENV,
    Dataset,
    DatasetError,
    dataset_names,
    default_data_dir,
    load_dataset,
    register_dataset,
)
from .sampler import AUGMENT_STREAM, INDICES_STREAM, minibatch_generator, minibatch_indices

__all__ = [
    "AUGMENT_STREAM",
    "DATA_ENV",
    "INDICES_STREAM",
    "Augment",
    "Dataset",
    "DatasetError",
    "dataset_names",
    "default_data_dir",
    "load_dataset",
    "minibatch_generator",
    "minibatch_indices",
    "normalize",
    "random_crop_flip",
    "register_dataset",
]
