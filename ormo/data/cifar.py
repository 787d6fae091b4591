"""``cifar10`` and ``cifar100``: the "python version" archives of Krizhevsky (2009), *Learning Multiple Layers of
Features from Tiny Images*, https://www.cs.toronto.edu/~kriz/cifar.html.

In ``data_dir`` the loader uses, in this order: the extracted folder (``cifar-10-batches-py/`` with
``data_batch_1`` … ``data_batch_5`` and ``test_batch``; ``cifar-100-python/`` with ``train`` and ``test``), else the
``.tar.gz`` archive, whose MD5 is checked against :data:`MD5` and whose members are read in place (nothing is
extracted, so a read-only data directory works), else, with ``download=True``, a fresh download of the archive.

Each member is a pickle (written by Python 2, hence ``encoding="bytes"``) of a dict with ``b"data"``, an N×3072
uint8 array whose rows are 3×32×32 images in row-major order (all red, then green, then blue), and the labels
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100's 100 classes), a list of ints. Every file must hold the
published number of images (:attr:`CifarLayout.train_images_per_file`), so an incomplete copy is an error. The
pickles are read with a restricted unpickler (:class:`_BatchUnpickler`): plain data and numpy arrays only, so a
crafted file in an extracted folder is refused instead of running code.
"""

from __future__ import annotations

import codecs
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .base import Dataset, DatasetError, register_dataset
from .download import download as fetch
from .download import verify_md5

#: Expected MD5 of each archive, by file name (tests substitute the checksums of their small archives).
MD5: dict[str, str] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}

#: Where each archive is downloaded from, by file name.
URLS: dict[str, str] = {
    "cifar-10-python.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar-100-python.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

_IMAGE_SHAPE = (3, 32, 32)
_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its batches, and how its labels are stored."""

    #: Registry name.
    name: str
    #: Archive file name (a key of :data:`MD5` and :data:`URLS`).
    archive: str
    #: Top-level folder inside the archive (and after extraction).
    folder: str
    #: Member files of the training set, in order.
    train_files: tuple[str, ...]
    #: Member files of the test set.
    test_files: tuple[str, ...]
    #: Key of the label list in each pickle.
    label_key: bytes
    num_classes: int
    #: Images in each training file (published: CIFAR-10's five hold 10,000 each, CIFAR-100's one 50,000).
    train_images_per_file: int
    #: Images in each test file (published: 10,000).
    test_images_per_file: int

    def images_in(self, file: str) -> int:
        """How many images the member ``file`` holds."""
        return self.train_images_per_file if file in self.train_files else self.test_images_per_file


CIFAR10 = CifarLayout(name="cifar10", archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
                      train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
                      label_key=b"labels", num_classes=10, train_images_per_file=10_000,
                      test_images_per_file=10_000)
CIFAR100 = CifarLayout(name="cifar100", archive="cifar-100-python.tar.gz", folder="cifar-100-python",
                       train_files=("train",), test_files=("test",), label_key=b"fine_labels", num_classes=100,
                       train_images_per_file=50_000, test_images_per_file=10_000)

#: The layouts by registry name, looked up at load time (tests substitute small numbers of images per file).
LAYOUTS: dict[str, CifarLayout] = {"cifar10": CIFAR10, "cifar100": CIFAR100}


@register_dataset("cifar10")
def cifar10(*, data_dir: Path, download: bool) -> Dataset:
    """CIFAR-10: 50,000 training and 10,000 test 3×32×32 images, 10 classes."""
    return load_cifar(LAYOUTS["cifar10"], data_dir=data_dir, download=download)


@register_dataset("cifar100")
def cifar100(*, data_dir: Path, download: bool) -> Dataset:
    """CIFAR-100: 50,000 training and 10,000 test 3×32×32 images, 100 fine classes."""
    return load_cifar(LAYOUTS["cifar100"], data_dir=data_dir, download=download)


def load_cifar(layout: CifarLayout, *, data_dir: Path, download: bool) -> Dataset:
    """Read ``layout`` from ``data_dir`` (folder, else verified archive, else download); see the module docstring."""
    folder, archive = data_dir / layout.folder, data_dir / layout.archive
    url, md5 = URLS[layout.archive], MD5[layout.archive]
    if folder.is_dir():
        train = [_read_from_folder(folder, f, layout) for f in layout.train_files]
        test = [_read_from_folder(folder, f, layout) for f in layout.test_files]
    else:
        if archive.is_file():
            try:
                verify_md5(archive, md5, url=url)
            except DatasetError:
                if not download:
                    raise
                fetch(url, archive, md5=md5)  # replace the corrupt copy
        elif download:
            fetch(url, archive, md5=md5)
        else:
            raise DatasetError(
                f"{layout.name}: found neither the folder {folder}/ nor the archive {archive}; download {url} and "
                f"put it in {data_dir} (or pass download=True, or point data_dir or $ORMO_DATA elsewhere)"
            )
        train, test = _read_from_archive(archive, layout)
    train_x, train_y = _stack(train)
    test_x, test_y = _stack(test)
    return Dataset(name=layout.name, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                   num_classes=layout.num_classes)


def _read_from_folder(folder: Path, file: str, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    path = folder / file
    if not path.is_file():
        raise DatasetError(
            f"{layout.name}: the folder {folder}/ has no file {file!r} (expected {', '.join(layout.train_files)}, "
            f"{', '.join(layout.test_files)}); extract {layout.archive} again, or delete the folder so that the "
            f"archive in {folder.parent} is read instead"
        )
    try:
        with open(path, "rb") as f:
            return _decode(f, source=str(path), layout=layout, images=layout.images_in(file))
    except OSError as e:
        raise DatasetError(f"{layout.name}: could not read {path} ({_one_line(e)}); extract {layout.archive} "
                           f"again") from e


def _read_from_archive(archive: Path, layout: CifarLayout
                       ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    def member(tf: tarfile.TarFile, file: str) -> tuple[np.ndarray, np.ndarray]:
        name = f"{layout.folder}/{file}"
        try:
            info = tf.getmember(name)
        except KeyError:
            raise DatasetError(
                f"{layout.name}: the archive {archive} has no member {name!r}; it is not the CIFAR python archive: "
                f"delete it and download {URLS[layout.archive]} again"
            ) from None
        # a link member is refused, not followed: its target may be missing (a KeyError) or another member
        f = tf.extractfile(info) if info.isfile() else None
        if f is None:
            raise DatasetError(f"{layout.name}: member {name!r} of {archive} is not a regular file; it is not the "
                               f"CIFAR python archive: delete it and download {URLS[layout.archive]} again")
        with f:
            return _decode(f, source=f"{archive}:{name}", layout=layout, images=layout.images_in(file))

    try:
        with tarfile.open(archive, "r:gz") as tf:
            train = [member(tf, file) for file in layout.train_files]
            test = [member(tf, file) for file in layout.test_files]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DatasetError(
            f"{layout.name}: could not read the archive {archive} ({type(e).__name__}: {e}); it is truncated or "
            f"corrupt: delete it and download {URLS[layout.archive]} again (or pass download=True)"
        ) from e
    return train, test


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that a CIFAR batch never holds."""


def _guarded_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by __setstate__; anything else is crafted
    if subtype is not np.ndarray or shape != (0,):
        raise pickle.UnpicklingError(f"numpy's _reconstruct called with {subtype!r}, {shape!r}: not a numpy array")
    return _NUMPY_RECONSTRUCT(subtype, shape, dtype)


def _guarded_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.hasobject:  # an object array would unpickle arbitrary elements; CIFAR holds bytes and numbers only
        raise pickle.UnpicklingError(f"numpy dtype {dtype} holds Python objects")
    return dtype


def _guarded_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(buffer, bytes | bytearray | pickle.PickleBuffer) or not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"numpy's _frombuffer called with {type(buffer).__name__}: not a numpy array")
    return _NUMPY_FROMBUFFER(buffer, dtype, shape, order)


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # protocol 2 written by Python 3 stores bytes as _codecs.encode(str, "latin1"); no other codec is allowed
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode called with a {type(text).__name__} and {encoding!r}")
    return codecs.encode(text, "latin1")


_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy._core.multiarray._reconstruct (numpy.core.… before 2.0)
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy._core.numeric._frombuffer (protocol 5)

#: The only globals a CIFAR pickle may name: numpy's array and dtype reconstruction (under the module names of
#: numpy 1 and 2, for protocols 2 to 5), and the bytes encoding of protocol 2 as written by Python 3.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): _guarded_reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _guarded_frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _guarded_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


def _check_keys(keys: list[Any]) -> None:
    for key in keys:
        if type(key) not in (bytes, str, int):
            raise pickle.UnpicklingError(f"a dict key is a {type(key).__name__}; a CIFAR batch's keys are strings")


class _BatchUnpickler(pickle._Unpickler):
    """An unpickler that builds dicts, lists, tuples, bytes, strings, numbers and numpy arrays, and nothing else:
    any other global (``os.system``, ``builtins.eval``, a class) is refused before it is looked up.

    Dict keys must be bytes, str or int, and sets are refused, before anything is hashed: hashing a crafted key (a
    tuple nested 200,000 deep: 200 KB of pickle) recurses in C past the stack and kills the process. Hence pickle's
    Python implementation, whose opcodes can be amended; a batch is a few large strings and some 20,000 small
    opcodes, which it reads about as fast as the C one."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None

    # After a MARK, self.stack holds only what followed it: the keys of SETITEMS and DICT are its even entries.
    def _load_setitem(self) -> None:
        _check_keys(self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)

    def _load_setitems(self) -> None:
        _check_keys(self.stack[0::2])
        pickle._Unpickler.load_setitems(self)

    def _load_dict(self) -> None:
        _check_keys(self.stack[0::2])
        pickle._Unpickler.load_dict(self)

    def _refuse_set(self) -> None:
        raise pickle.UnpicklingError("the pickle builds a set; a CIFAR batch holds none")

    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict
    for _opcode in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_opcode[0]] = _refuse_set
    del _opcode


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())  # one line, however the message was built
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


def _describe_keys(batch: dict, limit: int = 8) -> str:
    # repr, not the keys themselves: a crafted dict may mix bytes, str and int keys, which do not sort together
    keys = sorted(_describe_key(k) for k in batch)
    return "[" + ", ".join(keys[:limit]) + (f", … ({len(keys)} keys)" if len(keys) > limit else "") + "]"


def _describe_key(key: Any, limit: int = 40) -> str:
    """A short repr of a dict key; only its type for a key that has no short repr (a tuple nested thousands deep,
    whose repr exceeds the recursion limit, or an int of thousands of digits, which repr refuses)."""
    if isinstance(key, bytes | str):
        return repr(key[:limit]) + ("…" if len(key) > limit else "")
    if type(key) is int and key.bit_length() <= 64:
        return repr(key)
    return f"<{type(key).__name__}>"


def _decode(f: IO[bytes], *, source: str, layout: CifarLayout, images: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch as (``images``×3072 uint8 array, int64 labels), after checking its structure."""
    fix = f"delete it and extract {layout.archive} again (or delete the folder so that the archive is read)"
    try:
        batch: Any = _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, zlib.error, tarfile.TarError):
        raise  # the file or archive itself cannot be read: reported by the caller, which knows which
    except _RefusedGlobal as e:
        raise DatasetError(f"{layout.name}: {source} is not a CIFAR batch: its pickle names {str(e)!r}, which a "
                           f"CIFAR batch never holds (only dicts, lists, bytes, strings, numbers and numpy arrays are "
                           f"read; this one may have been crafted to run code): {fix}") from None
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types; all mean "not a readable batch"
        raise DatasetError(f"{layout.name}: {source} is not a readable pickle ({_one_line(e)}); it is truncated, "
                           f"corrupt or not a CIFAR batch: {fix}") from None
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        keys = _describe_keys(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetError(f"{layout.name}: {source} should hold a dict with keys b'data' and "
                           f"{layout.label_key!r}; found {keys}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{layout.name}: b'data' in {source} is a {found}; expected an N×{_PIXELS} uint8 array "
                           "(3×32×32 images in row-major order)")
    if data.shape[0] != images:
        raise DatasetError(f"{layout.name}: {source} holds {data.shape[0]} images; expected {images}, as in the "
                           f"published {layout.archive}: the file is incomplete or from another dataset; {fix}")
    raw = batch[layout.label_key]
    # A list must hold ints only before numpy sees it: a few KB of pickle can nest shared lists whose array would
    # take gigabytes, and mixed types would become an object or string array.
    if isinstance(raw, list) and not all(type(v) is int for v in raw):
        odd = next(type(v).__name__ for v in raw if type(v) is not int)
        raise DatasetError(f"{layout.name}: {layout.label_key!r} in {source} is a list holding a {odd}; expected "
                           f"{data.shape[0]} integer labels, one per image")
    if not isinstance(raw, list | np.ndarray):
        raise DatasetError(f"{layout.name}: {layout.label_key!r} in {source} is a {type(raw).__name__}; expected a "
                           f"list or array of {data.shape[0]} integer labels, one per image")
    labels = np.asarray(raw)
    # kind i or u: np.issubdtype counts timedelta64 as an integer type, and bool is not a class index
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DatasetError(f"{layout.name}: {layout.label_key!r} in {source} has shape {labels.shape} and dtype "
                           f"{labels.dtype}; expected {data.shape[0]} integer labels, one per image")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DatasetError(f"{layout.name}: labels in {source} span [{labels.min()}, {labels.max()}]; expected "
                           f"values in [0, {layout.num_classes})")
    return data, labels.astype(np.int64)


def _stack(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.concatenate([d for d, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    # Costs one float32 copy of the set (600 MB for CIFAR-10's training set); the uint8 source is then freed.
    x = torch.from_numpy(data).view(-1, *_IMAGE_SHAPE).to(torch.float32).div_(255.0)
    return x, torch.from_numpy(labels)
