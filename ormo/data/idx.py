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
import os
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


#: How many decompressed bytes past the expected end are read to count trailing bytes (more is reported as "at
#: least"): a gzip bomb is never decompressed further.
_TRAILING_PROBE = 1 << 20


def read_idx(path: Path, *, magic: int, count: int, image_side: int | None = None, fix: str) -> np.ndarray:
    """The uint8 array stored in the IDX file ``path`` (raw, or gzipped if its name ends in ``.gz``): shape
    ``(count, image_side, image_side)`` for images (``magic=IMAGES_MAGIC``), ``(count,)`` for labels.

    The magic number, every size in the header and the payload length must match; anything else raises
    :class:`~ormo.data.DatasetError` naming ``path``, what was found, what was expected, and then ``fix`` (how to get
    a good copy). The header is read and checked first; then a raw file's size is compared with the header before
    its payload is read, and a gzipped file is decompressed as a stream of at most the expected payload plus
    :data:`_TRAILING_PROBE` bytes, so memory stays bounded by the expected size whatever the file holds (a sparse
    file of 40 GB, a gzip bomb). Reading a gzipped file to its end checks the CRC and length in its trailer.
    Costs one copy of the payload (47 MB for 60,000 images of 28×28); the array is a read-only view of it.
    """
    if magic not in _DIMENSIONS:
        raise ValueError(f"magic must be {IMAGES_MAGIC} (images) or {LABELS_MAGIC} (labels), not {magic}")
    kind, ndim = _KIND[magic], _DIMENSIONS[magic]
    expected_shape = (count,) if ndim == 1 else (count, image_side, image_side)
    expected_payload = int(np.prod(expected_shape))
    header_bytes = 4 * (1 + ndim)
    gzipped = path.name.endswith(".gz")
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            header = f.read(header_bytes)
            if len(header) < header_bytes:
                raise DatasetError(f"{path} is {len(header)} bytes long, shorter than the {header_bytes}-byte header "
                                   f"of an IDX file of {kind}; it is truncated: {fix}")
            _check_header(path, header, magic=magic, expected_shape=expected_shape, fix=fix)
            if not gzipped:  # the size is known before reading: a sparse 40 GB file is refused, not read
                payload = os.fstat(f.fileno()).st_size - header_bytes
                _check_payload(path, payload, expected_shape=expected_shape, exact=True, fix=fix)
            data = f.read(expected_payload + 1)  # one byte more tells a file with trailing bytes
            exact = True
            if gzipped and len(data) > expected_payload:  # count what follows, up to a bound
                extra = len(f.read(_TRAILING_PROBE))
                exact = extra < _TRAILING_PROBE
                payload = len(data) + extra
            else:
                payload = len(data)
    except PermissionError as e:  # the file may be whole: deleting it (``fix``) would be the wrong advice
        raise DatasetError(f"could not read {path} (PermissionError: {e.strerror}); give this user read access to "
                           f"it (e.g. chmod a+r {path}), or point data.data_dir at a readable copy") from e
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DatasetError(f"could not read {path} ({type(e).__name__}: {e}); it is truncated or corrupt: {fix}") from e
    _check_payload(path, payload, expected_shape=expected_shape, exact=exact, fix=fix)
    return np.frombuffer(data, dtype=np.uint8).reshape(expected_shape)


def _check_header(path: Path, header: bytes, *, magic: int, expected_shape: tuple[int, ...], fix: str) -> None:
    kind = _KIND[magic]
    found_magic = int.from_bytes(header[:4], "big")
    if found_magic != magic:
        what = f" (the magic of IDX {_KIND[found_magic]})" if found_magic in _KIND else ""
        raise DatasetError(f"{path} starts with magic number {found_magic}{what}; expected {magic}, an IDX file of "
                           f"{kind}: is it the right file? {fix}")
    shape = tuple(int(v) for v in np.frombuffer(header, dtype=">u4", offset=4))
    if shape[1:] != expected_shape[1:]:
        raise DatasetError(f"{path} holds images of {shape[1]}×{shape[2]} pixels; expected "
                           f"{expected_shape[1]}×{expected_shape[2]}: is it the right file? {fix}")
    if shape[0] != expected_shape[0]:
        raise DatasetError(f"{path} holds {shape[0]} {kind}; expected {expected_shape[0]}: is it the right file? "
                           f"{fix}")


def _check_payload(path: Path, payload: int, *, expected_shape: tuple[int, ...], exact: bool, fix: str) -> None:
    expected_payload = int(np.prod(expected_shape))
    if payload == expected_payload:
        return
    if len(expected_shape) == 1:
        announced = f"{expected_shape[0]} labels of one byte each"
    else:
        announced = f"{'×'.join(str(v) for v in expected_shape)} = {expected_payload} bytes"
    state = "is truncated" if payload < expected_payload else "has trailing bytes"
    found = f"{payload}" if exact else f"at least {payload}"
    raise DatasetError(f"{path} has {found} bytes after its header, but the header announces {announced}; the file "
                       f"{state}: {fix}")
