"""The IDX file format of MNIST and Fashion-MNIST (LeCun et al., http://yann.lecun.com/exdb/mnist/), raw or gzipped.

An IDX file is a big-endian header and a payload of unsigned bytes::

    magic   4 bytes   0x00000803 = 2051 for images (ubyte, 3 dimensions); 0x00000801 = 2049 for labels (1 dimension)
    sizes   4 bytes per dimension: N, then rows and columns for images
    payload N·rows·cols (images, row-major) or N (labels) bytes

:func:`read_idx` checks every field against what the caller expects, so a truncated, padded or mislabelled file is
an error naming the file and the mismatch, never a silently misread array. No checksum is compared: the files
shipped by Debian's ``dataset-fashion-mnist`` are recompressed (their ``.gz`` bytes differ from the official ones,
their contents do not), so the structure is what can be checked everywhere.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .base import DatasetError

#: Magic number of an IDX file of unsigned-byte images (3 dimensions).
IMAGES_MAGIC = 2051
#: Magic number of an IDX file of unsigned-byte labels (1 dimension).
LABELS_MAGIC = 2049

_DIMENSIONS = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}
_KIND = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}


def read_bytes(path: Path, *, fix: str) -> bytes:
    """The content of ``path``, decompressed when its name ends in ``.gz``.

    Costs one copy of the decompressed file in memory (47 MB for 60,000 images of 28×28); ``gzip.decompress`` checks
    the CRC and length in the gzip trailer, so a truncated or corrupt archive is caught here.
    """
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.name.endswith(".gz") else data
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DatasetError(f"could not read {path} ({type(e).__name__}: {e}); it is truncated or corrupt: {fix}") from e


def read_idx(path: Path, *, magic: int, count: int, image_side: int | None = None, fix: str) -> np.ndarray:
    """The uint8 array stored in the IDX file ``path`` (raw, or gzipped if its name ends in ``.gz``): shape
    ``(count, image_side, image_side)`` for images (``magic=IMAGES_MAGIC``), ``(count,)`` for labels.

    The magic number, every size in the header and the payload length must match; anything else raises
    :class:`~ormo.data.DatasetError` naming ``path``, what was found, what was expected, and then ``fix`` (how to get
    a good copy). The array is a read-only view of the decompressed bytes (``numpy.frombuffer``: no copy).
    """
    if magic not in _DIMENSIONS:
        raise ValueError(f"magic must be {IMAGES_MAGIC} (images) or {LABELS_MAGIC} (labels), not {magic}")
    kind, ndim = _KIND[magic], _DIMENSIONS[magic]
    expected_shape = (count,) if ndim == 1 else (count, image_side, image_side)
    data = read_bytes(path, fix=fix)
    header_bytes = 4 * (1 + ndim)
    if len(data) < header_bytes:
        raise DatasetError(f"{path} is {len(data)} bytes long, shorter than the {header_bytes}-byte header of an IDX "
                           f"file of {kind}; it is truncated: {fix}")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        what = f" (the magic of IDX {_KIND[found_magic]})" if found_magic in _KIND else ""
        raise DatasetError(f"{path} starts with magic number {found_magic}{what}; expected {magic}, an IDX file of "
                           f"{kind}: is it the right file? {fix}")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if shape[1:] != expected_shape[1:]:
        raise DatasetError(f"{path} holds images of {shape[1]}×{shape[2]} pixels; expected "
                           f"{image_side}×{image_side}: is it the right file? {fix}")
    if shape[0] != count:
        raise DatasetError(f"{path} holds {shape[0]} {kind}; expected {count}: is it the right file? {fix}")
    payload = len(data) - header_bytes
    expected_payload = int(np.prod(expected_shape))
    if payload != expected_payload:
        size = "×".join(str(v) for v in expected_shape)
        state = "truncated" if payload < expected_payload else "has trailing bytes"
        raise DatasetError(f"{path} has {payload} bytes after its header, but the header announces {size} = "
                           f"{expected_payload}; the file {state}: {fix}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(expected_shape)
