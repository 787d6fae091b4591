"""``tinyimagenet``: Tiny ImageNet (Le & Yang, 2015, CS231N), 200 classes of 3×64×64 images.

The standard folder ``tiny-imagenet-200/`` in ``data_dir``::

    wnids.txt                         one WordNet id per line; line order = class index
    train/<wnid>/images/*.JPEG        500 training images per class (100,000 in all), read in file-name order
    val/images/*.JPEG                 10,000 validation images, used as the test set
    val/val_annotations.txt           tab-separated: file name, wnid, then a bounding box (ignored)

A folder with other counts than these (200 classes, 500 training images each, 10,000 validation images) is refused:
an interrupted or edited unzip would otherwise train on part of the data.

The official test split has no labels and is not read. With ``download=True`` and no folder, the zip archive is
fetched (MD5-checked) and extracted into a temporary folder, which is renamed into place only when complete.
Images are decoded with Pillow and converted to RGB (a few training images are grayscale).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from .base import Dataset, DatasetError, register_dataset
from .download import download as fetch
from .download import md5_of

FOLDER = "tiny-imagenet-200"
ARCHIVE = "tiny-imagenet-200.zip"
#: Expected MD5 of the archive, by file name (tests substitute the checksum of their small archive).
MD5: dict[str, str] = {ARCHIVE: "90528d7ca1a48142e341f4ef8d21d0de"}
#: Where the archive is downloaded from, by file name.
URLS: dict[str, str] = {ARCHIVE: "http://cs231n.stanford.edu/tiny-imagenet-200.zip"}

#: The real Tiny ImageNet's sizes. A folder of other sizes is an interrupted or edited unzip, which would otherwise
#: train on part of the data without a word (tests substitute their small folder's sizes).
SIZES: dict[str, int] = {"classes": 200, "train_per_class": 500, "val": 10_000}

IMAGE_SIZE = 64
# Pillow releases the GIL while decoding, so threads overlap file reads and JPEG decoding (~110,000 small files).
_DECODE_THREADS = min(8, os.cpu_count() or 1)


@register_dataset("tinyimagenet")
def tinyimagenet(*, data_dir: Path, download: bool) -> Dataset:
    """100,000 training and 10,000 test (the labelled validation split) 3×64×64 images, 200 classes."""
    root = data_dir / FOLDER
    if not root.is_dir():
        if not download:
            raise DatasetError(
                f"tinyimagenet: no folder {root}/; download {URLS[ARCHIVE]}, unzip it in {data_dir} (it creates "
                f"{FOLDER}/), or pass download=True"
            )
        _download_and_extract(data_dir)
    wnids = _read_wnids(root)
    class_of = {w: i for i, w in enumerate(wnids)}
    train_files: list[Path] = []
    train_labels: list[int] = []
    for i, wnid in enumerate(wnids):
        images = root / "train" / wnid / "images"
        if not images.is_dir():
            raise DatasetError(f"tinyimagenet: class {wnid} of {root / 'wnids.txt'} has no folder {images}/; the "
                               f"folder {root}/ is incomplete: unzip {ARCHIVE} again")
        files = sorted(images.glob("*.JPEG"))
        if not files:
            raise DatasetError(f"tinyimagenet: {images}/ holds no *.JPEG image (every class of Tiny ImageNet has "
                               f"500); the folder {root}/ is incomplete: unzip {ARCHIVE} again")
        if len(files) != SIZES["train_per_class"]:
            raise DatasetError(f"tinyimagenet: {images}/ holds {len(files)} *.JPEG images; every class of Tiny "
                               f"ImageNet has {SIZES['train_per_class']}: the folder {root}/ is incomplete or edited: "
                               f"unzip {ARCHIVE} again")
        train_files += files
        train_labels += [i] * len(files)
    if len(wnids) != SIZES["classes"]:
        raise DatasetError(f"tinyimagenet: {root / 'wnids.txt'} lists {len(wnids)} classes; Tiny ImageNet has "
                           f"{SIZES['classes']}: the folder {root}/ is incomplete or edited: unzip {ARCHIVE} again")
    test_files, test_labels = _read_val_annotations(root, class_of)
    train_x = _decode_all(train_files)
    test_x = _decode_all(test_files)
    return Dataset(name="tinyimagenet", train_x=train_x, train_y=torch.tensor(train_labels, dtype=torch.int64),
                   test_x=test_x, test_y=torch.tensor(test_labels, dtype=torch.int64), num_classes=len(wnids))


def _read_wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    if not path.is_file():
        raise DatasetError(f"tinyimagenet: no class list {path}; the folder {root}/ is incomplete: unzip "
                           f"{ARCHIVE} again")
    wnids = [line.strip() for line in _read_lines(path, root=root) if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(f"tinyimagenet: {path} should list distinct WordNet ids, one per line; found "
                           f"{len(wnids)} lines, {len(set(wnids))} distinct")
    for wnid in wnids:  # each names a folder train/<wnid>/: it must not lead out of the dataset
        if not _is_plain_name(wnid):
            raise DatasetError(f"tinyimagenet: {path} lists {wnid!r}; expected WordNet ids such as 'n01443537', "
                               f"plain folder names (no '/', '\\' or '..'): unzip {ARCHIVE} again")
    return wnids


def _is_plain_name(name: str) -> bool:
    """True for a name that stays inside its folder: no separator, not '.' or '..', no NUL."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _read_lines(path: Path, *, root: Path) -> list[str]:
    """The lines of a text file of the dataset (ASCII in the official archive)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"tinyimagenet: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                           f"{e.start}); the folder {root}/ is damaged: unzip {ARCHIVE} again") from None


def _read_val_annotations(root: Path, class_of: dict[str, int]) -> tuple[list[Path], list[int]]:
    path = root / "val" / "val_annotations.txt"
    if not path.is_file():
        raise DatasetError(f"tinyimagenet: no validation labels {path} (tab-separated: file name, wnid, box); the "
                           f"folder {root}/ is incomplete: unzip {ARCHIVE} again")
    files: list[Path] = []
    labels: list[int] = []
    for number, line in enumerate(_read_lines(path, root=root), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in class_of:
            raise DatasetError(f"tinyimagenet: line {number} of {path} should be 'file<TAB>wnid<TAB>box…' with a "
                               f"wnid from wnids.txt; found {line!r}")
        if not _is_plain_name(fields[0]):  # '../../outside/secret.JPEG' would read a file outside the dataset
            raise DatasetError(f"tinyimagenet: line {number} of {path} names the image {fields[0]!r}; expected a "
                               f"plain file name in {root / 'val' / 'images'}/ (no '/', '\\' or '..'): unzip "
                               f"{ARCHIVE} again")
        image = root / "val" / "images" / fields[0]
        if not image.is_file():
            raise DatasetError(f"tinyimagenet: {path} line {number} lists {fields[0]}, but {image} does not exist; "
                               f"the folder {root}/ is incomplete: unzip {ARCHIVE} again")
        files.append(image)
        labels.append(class_of[fields[1]])
    if not files:  # an empty test set would only fail later, dividing by zero in evaluation
        raise DatasetError(f"tinyimagenet: {path} lists no validation image; expected one line per image of "
                           f"{root / 'val' / 'images'}/ (10,000 in Tiny ImageNet): unzip {ARCHIVE} again")
    if len(files) != SIZES["val"] or len(set(files)) != len(files):
        raise DatasetError(f"tinyimagenet: {path} lists {len(files)} validation images ({len(set(files))} distinct); "
                           f"Tiny ImageNet has {SIZES['val']:,}: the folder {root}/ is incomplete or edited: unzip "
                           f"{ARCHIVE} again")
    return files, labels


def _decode_all(files: list[Path]) -> torch.Tensor:
    """N×3×64×64 float32 in [0, 1]. Holds one uint8 copy (N·12 KB) and one float32 copy of the set."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # Pillow is not a dependency of ormo
        raise ImportError("the 'tinyimagenet' dataset needs Pillow: pip install pillow") from e
    out = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        rgb = None
        # Only a regular file is opened: a FIFO named *.JPEG would block Image.open (and this pool's shutdown) forever
        if not files[i].is_file():
            raise DatasetError(f"tinyimagenet: {files[i]} is not a regular file (a pipe, a device, a broken link?); "
                               f"it is not a Tiny ImageNet image: unzip {ARCHIVE} again")
        try:
            with Image.open(files[i]) as img:  # reads the header only: the size is known before any decoding
                size = img.size
                if size == (IMAGE_SIZE, IMAGE_SIZE):  # a file declaring 9000×9000 pixels is never decoded
                    rgb = np.asarray(img.convert("RGB"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning, when made an error
            raise DatasetError(f"tinyimagenet: {files[i]} declares far more than {IMAGE_SIZE}×{IMAGE_SIZE} pixels "
                               f"({type(e).__name__}: {e}); it is not a Tiny ImageNet image: unzip {ARCHIVE} "
                               f"again") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DatasetError(f"tinyimagenet: cannot decode {files[i]} ({type(e).__name__}: {e}); the file is "
                               f"corrupt: unzip {ARCHIVE} again") from e
        if rgb is None:
            raise DatasetError(f"tinyimagenet: {files[i]} is {size[0]}×{size[1]} pixels; expected "
                               f"{IMAGE_SIZE}×{IMAGE_SIZE}: it is not a Tiny ImageNet image: unzip {ARCHIVE} again")
        out[i] = rgb

    pool = ThreadPoolExecutor(max_workers=_DECODE_THREADS)
    try:
        futures = [pool.submit(decode, i) for i in range(len(files))]
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        # After the first failure (or an interrupt) the decodes not yet started are cancelled, so the error comes
        # now rather than after every other image; the ones running finish first.
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:  # in file order, the first failure among those that ran
        error = None if future.cancelled() else future.exception()
        if error is not None:
            raise error
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


def _download_and_extract(data_dir: Path) -> None:
    """Fetch (or reuse a verified) archive, extract it beside its destination, then rename the folder into place."""
    archive, url, md5 = data_dir / ARCHIVE, URLS[ARCHIVE], MD5[ARCHIVE]
    if not (archive.is_file() and md5_of(archive) == md5):  # absent or corrupt: (re)download
        fetch(url, archive, md5=md5)
    staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", dir=data_dir))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():  # refuse absolute paths and '..' (no writes outside the staging folder)
                    if name.startswith(("/", "\\")) or ".." in Path(name).parts:
                        raise DatasetError(f"tinyimagenet: {archive} has an unsafe member name {name!r}")
                if f"{FOLDER}/wnids.txt" not in zf.namelist():
                    raise DatasetError(f"tinyimagenet: {archive} has no member {FOLDER}/wnids.txt; it is not the "
                                       f"Tiny ImageNet archive: delete it and download {url} again")
                zf.extractall(staging)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DatasetError(f"tinyimagenet: could not extract {archive} ({type(e).__name__}: {e}); delete it "
                               f"and download {url} again") from e
        os.replace(staging / FOLDER, data_dir / FOLDER)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
