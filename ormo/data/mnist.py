"""``fashion-mnist`` (alias ``fashion_mnist``) and ``mnist``: 60,000 training and 10,000 test 28×28 grayscale
images in 10 classes, read from the four IDX files of either set (the two share file names and format).

Fashion-MNIST: Xiao, Rasul & Vollgraf (2017), *Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms*, https://github.com/zalandoresearch/fashion-mnist. MNIST: LeCun, Bottou, Bengio & Haffner
(1998), http://yann.lecun.com/exdb/mnist/.

Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each raw or gzipped (``.gz`` appended; the raw file wins when both are there).

Where they are looked for, in order, in each folder ``D`` first ``D/<name>/`` (``D/fashion-mnist/``, ``D/mnist/``)
and then ``D`` itself:

* with ``data_dir`` given (``data.data_dir``): that folder only. A named folder is a decision; falling back to
  other copies would hide a typo and make a run's data depend on the machine.
* otherwise ``$ORMO_DATA`` (if set), then ``~/.cache/ormo``, then, for Fashion-MNIST, Debian's folder
  :data:`DEBIAN_FASHION_MNIST_DIR` (``apt-get install dataset-fashion-mnist``), so a fresh Debian or Ubuntu
  machine trains offline.

The first folder holding any of the four files is the one read, and it must hold all four. With ``download=True``
and no copy found, the four official ``.gz`` files are fetched (MD5-checked against the published sums) into
``<data_dir>/<name>/`` (a subfolder, since the two sets share file names); files missing from that folder are
fetched too. A damaged file is never replaced: the error names it, to be deleted and fetched again.

Checks: the IDX structure of every file (:mod:`ormo.data.idx`), the counts, labels in 0..9, and the number of
images per class against the published counts (:attr:`IdxLayout.train_counts`), which also tells MNIST files from
Fashion-MNIST files. The checksums of the official ``.gz`` files are checked only on download: Debian's copies are
recompressed, with other ``.gz`` bytes and the same contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..rules.base import invalid
from .base import Dataset, DatasetError, default_data_dirs, register_dataset
from .download import download as fetch
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx

#: Where Debian's ``dataset-fashion-mnist`` package installs the four ``.gz`` files (searched last, and only
#: when no ``data_dir`` is given).
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

IMAGE_SIDE = 28
_UPSAMPLED_SIZE = 32
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class IdxLayout:
    """What one IDX dataset holds and where it comes from."""

    #: Registry name, and the subfolder searched in each data folder.
    name: str
    #: Human name used in messages.
    title: str
    #: Images per class in the training set (published; their sum is the training-set size).
    train_counts: tuple[int, ...]
    #: Images per class in the test set.
    test_counts: tuple[int, ...]
    #: Base URLs of the official ``.gz`` files, tried in order.
    mirrors: tuple[str, ...]
    #: Published MD5 of each official ``.gz`` file, by file name.
    md5: dict[str, str]
    #: The Debian package that installs the files, if any.
    debian_package: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.train_counts)


FASHION_MNIST = IdxLayout(
    name="fashion-mnist", title="Fashion-MNIST", train_counts=(6000,) * 10, test_counts=(1000,) * 10,
    mirrors=("https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
             "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    debian_package="dataset-fashion-mnist",
)
MNIST = IdxLayout(
    name="mnist", title="MNIST",
    train_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    test_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    # PyTorch's mirror (torchvision's first choice) and Google's CVDF mirror; yann.lecun.com now asks for a login.
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
             "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
)

#: The layouts by registry name, looked up at load time (tests substitute small class counts).
LAYOUTS: dict[str, IdxLayout] = {"fashion-mnist": FASHION_MNIST, "mnist": MNIST}


@register_dataset("fashion-mnist")
def fashion_mnist(*, data_dir: Path, data_dir_given: bool, download: bool, upsample: bool = False,
                  channels: int | None = None) -> Dataset:
    """Fashion-MNIST: 60,000 + 10,000 images of clothing, 1×28×28 (options as :func:`load_idx_dataset`)."""
    return load_idx_dataset(LAYOUTS["fashion-mnist"], data_dir=data_dir, data_dir_given=data_dir_given,
                            download=download, upsample=upsample, channels=channels)


register_dataset("fashion_mnist")(fashion_mnist)


@register_dataset("mnist")
def mnist(*, data_dir: Path, data_dir_given: bool, download: bool, upsample: bool = False,
          channels: int | None = None) -> Dataset:
    """MNIST: 60,000 + 10,000 handwritten digits, 1×28×28 (options as :func:`load_idx_dataset`)."""
    return load_idx_dataset(LAYOUTS["mnist"], data_dir=data_dir, data_dir_given=data_dir_given,
                            download=download, upsample=upsample, channels=channels)


def search_folders(layout: IdxLayout, *, data_dir: Path, data_dir_given: bool) -> list[Path]:
    """The folders searched for ``layout``'s files, in order (see the module docstring)."""
    roots = [data_dir] if data_dir_given else list(default_data_dirs())
    folders = [folder for root in roots for folder in (root / layout.name, root)]
    if layout.debian_package and not data_dir_given:
        folders.append(DEBIAN_FASHION_MNIST_DIR)
    return list(dict.fromkeys(folders))  # drop repeats, keep the order


def load_idx_dataset(layout: IdxLayout, *, data_dir: Path, data_dir_given: bool, download: bool,
                     upsample: bool = False, channels: int | None = None) -> Dataset:
    """Read ``layout`` (search, checks and download as in the module docstring) as float32 images in [0, 1].

    ``upsample=True`` resizes to 32×32 for CIFAR-sized models, bilinearly (``align_corners=False``, which never
    leaves [0, 1]), as the ``digits`` option does. ``channels`` repeats the gray channel (1 or 3); its default is
    1, or 3 with ``upsample`` (again as ``digits``, whose upsampled images are 3×32×32).
    """
    if not isinstance(upsample, bool):
        raise invalid("upsample", upsample, "True or False")
    if channels is None:
        channels = 3 if upsample else 1
    if isinstance(channels, bool) or channels not in (1, 3):
        raise invalid("channels", channels, "1 or 3 (the gray channel, repeated)")
    folders = search_folders(layout, data_dir=data_dir, data_dir_given=data_dir_given)
    download_folder = data_dir / layout.name
    folder = next((f for f in folders if any(_find(f, name) for name in FILES)), None)
    if download and folder in (None, download_folder):
        _fetch_missing(layout, download_folder)
        folder = download_folder
    if folder is None:
        raise DatasetError(
            f"{layout.name}: found none of the {layout.title} files {', '.join(FILES)} (raw or .gz) in "
            f"{', '.join(str(f) for f in folders)}; {_how_to_get(layout, download_folder)}"
        )
    missing = [name for name in FILES if _find(folder, name) is None]
    if missing:
        raise DatasetError(
            f"{layout.name}: the folder {folder} holds some {layout.title} files but not {', '.join(missing)} "
            f"(raw or .gz); {_how_to_complete(layout, folder, download_folder)}"
        )
    fix = _how_to_replace(layout, folder, download_folder)
    train_x, train_y = _read_split(layout, folder, "train", layout.train_counts, fix=fix)
    test_x, test_y = _read_split(layout, folder, "t10k", layout.test_counts, fix=fix)
    return Dataset(name=layout.name, train_x=_to_images(train_x, upsample=upsample, channels=channels),
                   train_y=train_y, test_x=_to_images(test_x, upsample=upsample, channels=channels),
                   test_y=test_y, num_classes=layout.num_classes)


def _find(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _how_to_get(layout: IdxLayout, download_folder: Path) -> str:
    ways = []
    if layout.debian_package:
        ways.append(f"on Debian or Ubuntu run `apt-get install {layout.debian_package}` (installs them in "
                    f"{DEBIAN_FASHION_MNIST_DIR}, searched when no data_dir is given)")
    ways.append(f"set data.download = true (download=True) to fetch them from {layout.mirrors[0]} into "
                f"{download_folder}")
    ways.append("put them in one of those folders yourself")
    return "to get them, " + "; or ".join(ways)


def _how_to_complete(layout: IdxLayout, folder: Path, download_folder: Path) -> str:
    if folder == download_folder:  # download=True fetches what is missing there
        return _how_to_get(layout, download_folder)
    # The search stops at the first folder holding any of the files, so this one must be completed or cleared.
    return (f"add the missing files there, or delete the {layout.title} files in {folder} so that the search goes "
            f"on; {_how_to_get(layout, download_folder)}")


def _how_to_replace(layout: IdxLayout, folder: Path, download_folder: Path) -> str:
    if layout.debian_package and folder == DEBIAN_FASHION_MNIST_DIR:
        return (f"reinstall the package (`apt-get install --reinstall {layout.debian_package}`, or "
                f"`apt-get install {layout.debian_package}` if it was removed), or set data.download = true with a "
                f"data_dir to fetch a fresh copy there")
    if folder == download_folder:
        fetch_again = "delete it and set data.download = true (download=True) to fetch the official file again"
    else:  # deleting one file would leave an incomplete set that stops the search: clear the folder's set
        fetch_again = (f"delete the {layout.title} files in {folder} and set data.download = true (download=True) "
                       f"to fetch the official ones into {download_folder}")
    package = (f"; or delete them and use Debian's copy: `apt-get install {layout.debian_package}` (read when no "
               f"data_dir is given)") if layout.debian_package else ""
    return f"{fetch_again} from {layout.mirrors[0]}{package}"


def _read_split(layout: IdxLayout, folder: Path, prefix: str, class_counts: tuple[int, ...], *, fix: str
                ) -> tuple[np.ndarray, torch.Tensor]:
    count = sum(class_counts)
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    assert images_path is not None and labels_path is not None  # checked by the caller
    images = read_idx(images_path, magic=IMAGES_MAGIC, count=count, image_side=IMAGE_SIDE, fix=fix)
    labels = read_idx(labels_path, magic=LABELS_MAGIC, count=count, fix=fix)
    if labels.size and int(labels.max()) >= layout.num_classes:
        raise DatasetError(f"{labels_path} has labels up to {int(labels.max())}; expected values in "
                           f"0..{layout.num_classes - 1}: {fix}")
    found = np.bincount(labels, minlength=layout.num_classes)
    if tuple(found.tolist()) != class_counts:
        other = next((o for o in LAYOUTS.values() if o is not layout and tuple(found.tolist()) in
                      (o.train_counts, o.test_counts)), None)
        hint = (f" These are {other.title}'s counts (the two sets share file names): keep each set in its own "
                f"subfolder, <data_dir>/{layout.name}/ and <data_dir>/{other.name}/." if other else f" {fix}")
        raise DatasetError(f"{labels_path} has {found.tolist()} images per class; {layout.title} has "
                           f"{list(class_counts)}.{hint}")
    return images, torch.from_numpy(labels.astype(np.int64))


def _to_images(raw: np.ndarray, *, upsample: bool, channels: int) -> torch.Tensor:
    """N×28×28 uint8 → N×C×H×W float32 in [0, 1]. One float32 array (188 MB for the training set); upsampling and
    repeating channels each make one more, larger, copy."""
    # One pass from the read-only uint8 view to a new float32 array (3x faster than copy, convert, divide in torch),
    # bit-identical to x.float() / 255.
    x = torch.from_numpy(np.divide(raw, np.float32(255.0), dtype=np.float32)).unsqueeze(1)
    if upsample:
        x = F.interpolate(x, size=(_UPSAMPLED_SIZE, _UPSAMPLED_SIZE), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0)  # guard float rounding just outside [0, 1]
    return x.repeat(1, channels, 1, 1) if channels > 1 else x


def _fetch_missing(layout: IdxLayout, folder: Path) -> None:
    """Download into ``folder`` every official ``.gz`` file absent there (raw or .gz), trying each mirror."""
    for name in FILES:
        if _find(folder, name) is not None:
            continue
        archive = f"{name}.gz"
        errors = []
        for base in layout.mirrors:
            try:
                fetch(base + archive, folder / archive, md5=layout.md5[archive])
                break
            except DatasetError as e:
                errors.append(str(e))
        else:
            raise DatasetError(f"{layout.name}: every mirror failed for {archive}: " + " | ".join(errors))
