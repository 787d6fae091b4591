"""fashion-mnist and mnist: small IDX files written here byte by byte (raw and gzipped) for every good and bad case,
the search order, downloads through a stand-in downloader, the options, a training run, and the real files from
Debian's dataset-fashion-mnist when installed."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from ormo.data import DatasetError, load_dataset, mnist
from ormo.data import base as data_base
from ormo.data.idx import read_idx
from ormo.experiment import load_config, train
from ormo.experiment.metrics import read_metrics
from ormo.rules.base import ConfigError

# Small stand-ins for the published class counts: 30 + 10 images for Fashion-MNIST, 25 + 11 for MNIST.
SMALL = {
    "fashion-mnist": dataclasses.replace(mnist.FASHION_MNIST, train_counts=(3,) * 10, test_counts=(1,) * 10),
    "mnist": dataclasses.replace(mnist.MNIST, train_counts=(2, 3) * 5, test_counts=(1,) * 9 + (2,)),
}
APT = "apt-get install dataset-fashion-mnist"


@pytest.fixture
def small(tmp_path, monkeypatch):
    """Small class counts, no $ORMO_DATA, a private home folder and an empty Debian folder: nothing of the machine's
    own copies is ever read."""
    for name, layout in SMALL.items():
        monkeypatch.setitem(mnist.LAYOUTS, name, layout)
    monkeypatch.delenv("ORMO_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    return tmp_path


def _idx(magic: int, array: np.ndarray) -> bytes:
    """An IDX file written from the format's definition: big-endian magic, sizes, then the bytes."""
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _make_set(layout_name: str, seed: int) -> dict[str, np.ndarray]:
    """Random 28×28 images and labels with the class counts of SMALL[layout_name], labels shuffled."""
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, counts in (("train", SMALL[layout_name].train_counts), ("t10k", SMALL[layout_name].test_counts)):
        labels = rng.permutation(np.repeat(np.arange(10), counts))
        out[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        out[f"{prefix}-labels-idx1-ubyte"] = labels.astype(np.uint8)
    out["train-images-idx3-ubyte"][0] = 0  # the extremes occur, so the range is exactly [0, 1]
    out["train-images-idx3-ubyte"][1] = 255
    return out


def _write(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool | tuple[str, ...] = False,
           raw_bytes: dict[str, bytes] | None = None, omit: tuple[str, ...] = ()) -> Path:
    """Write the four files to ``folder``: gzipped when ``gz`` is True or names them; ``raw_bytes`` replaces a
    file's content (before any compression)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if name in omit:
            continue
        content = (raw_bytes or {}).get(name) or _idx(2051 if "images" in name else 2049, array)
        if gz is True or (isinstance(gz, tuple) and name in gz):
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)
    return folder


def _check_matches(ds, arrays: dict[str, np.ndarray], *, name: str) -> None:
    assert ds.name == name and ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        expected = arrays[f"{prefix}-images-idx3-ubyte"]
        assert x.dtype == torch.float32 and x.shape == (len(expected), 1, 28, 28)
        assert torch.equal(x[:, 0], torch.from_numpy(expected.astype(np.float32)) / 255)  # the definition of scaling
        assert y.dtype == torch.int64 and y.tolist() == arrays[f"{prefix}-labels-idx1-ubyte"].tolist()
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("gz", [False, True, ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
                         ids=["raw", "gz", "mixed"])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_reads_raw_gz_and_mixed_files(small, name, gz):
    arrays = _make_set(name, seed=1)
    _write(small / "data", arrays, gz=gz)
    ds = load_dataset(name, data_dir=small / "data")
    _check_matches(ds, arrays, name=name)
    # Row-major 28×28: pixel (h, w) of image 4 is byte 16 + 4·784 + 28·h + w of the file.
    content = _idx(2051, arrays["train-images-idx3-ubyte"])
    assert float(ds.train_x[4, 0, 9, 13]) * 255 == pytest.approx(content[16 + 4 * 784 + 28 * 9 + 13])


def test_alias_fashion_mnist_reads_the_same_set(small):
    arrays = _make_set("fashion-mnist", seed=2)
    _write(small / "data", arrays)
    ds = load_dataset("fashion_mnist", data_dir=small / "data")
    _check_matches(ds, arrays, name="fashion-mnist")


def test_raw_file_wins_over_its_gz(small):
    raw, other = _make_set("mnist", seed=3), _make_set("mnist", seed=4)
    _write(small / "data", other, gz=True)
    _write(small / "data", raw)
    _check_matches(load_dataset("mnist", data_dir=small / "data"), raw, name="mnist")


def test_statistics_are_those_of_the_training_images(small):
    arrays = _make_set("fashion-mnist", seed=5)
    _write(small / "data", arrays)
    ds = load_dataset("fashion-mnist", data_dir=small / "data")
    x = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    assert ds.mean == pytest.approx((x.mean(),), abs=1e-7) and ds.std == pytest.approx((x.std(),), abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# search order


def test_named_data_dir_prefers_the_named_subfolder_and_is_the_only_place_searched(small, monkeypatch):
    data = small / "data"
    direct, sub = _make_set("fashion-mnist", seed=6), _make_set("fashion-mnist", seed=7)
    _write(data, direct)
    _check_matches(load_dataset("fashion-mnist", data_dir=data), direct, name="fashion-mnist")
    _write(data / "fashion-mnist", sub)
    _check_matches(load_dataset("fashion-mnist", data_dir=data), sub, name="fashion-mnist")
    # Copies elsewhere are not a fallback for a named folder.
    _write(mnist.DEBIAN_FASHION_MNIST_DIR, direct)
    monkeypatch.setenv("ORMO_DATA", str(small / "env"))
    _write(small / "env", direct)
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist", data_dir=small / "empty")
    msg = str(info.value)
    assert f"in {small}/empty/fashion-mnist, {small}/empty;" in msg
    assert str(small / "env") not in msg and str(small / "debian") not in msg.split(";")[0]


def test_default_order_is_env_then_cache_then_debian(small, monkeypatch):
    env, cache, debian = small / "env", small / "home" / ".cache" / "ormo", mnist.DEBIAN_FASHION_MNIST_DIR
    sets = {folder: _make_set("fashion-mnist", seed=k) for k, folder in enumerate((env, cache, debian), start=10)}
    for folder, arrays in sets.items():
        _write(folder, arrays, gz=True)
    monkeypatch.setenv("ORMO_DATA", str(env))
    _check_matches(load_dataset("fashion-mnist"), sets[env], name="fashion-mnist")
    monkeypatch.delenv("ORMO_DATA")
    _check_matches(load_dataset("fashion-mnist"), sets[cache], name="fashion-mnist")
    for path in cache.iterdir():
        path.unlink()
    _check_matches(load_dataset("fashion-mnist"), sets[debian], name="fashion-mnist")


def test_debian_folder_is_not_searched_for_mnist(small):
    _write(mnist.DEBIAN_FASHION_MNIST_DIR, _make_set("mnist", seed=13))
    with pytest.raises(DatasetError, match=r"mnist: found none of the MNIST files") as info:
        load_dataset("mnist")
    assert "apt-get" not in str(info.value) and "data.download = true" in str(info.value)


def test_default_data_dirs_and_the_data_dir_given_flag(small, monkeypatch):
    cache = small / "home" / ".cache" / "ormo"
    assert data_base.default_data_dirs() == (cache,)
    monkeypatch.setenv("ORMO_DATA", str(small / "env"))
    assert data_base.default_data_dirs() == (small / "env", cache)
    seen = []
    monkeypatch.setattr(data_base, "_REGISTRY", dict(data_base._REGISTRY))  # "probe" vanishes with the test

    @data_base.register_dataset("probe")
    def probe(*, data_dir, data_dir_given):
        seen.append((data_dir, data_dir_given))
        return load_dataset("synthetic", num_classes=2, image_shape=(1, 2, 2), train_size=4, test_size=2)

    load_dataset("probe")
    load_dataset("probe", data_dir=small / "x")
    assert seen == [(small / "env", False), (small / "x", True)]


# ---------------------------------------------------------------------------------------------------------------
# missing and damaged files


def test_nothing_found_says_where_it_looked_and_how_to_get_the_files(small):
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist")
    msg = str(info.value)
    cache = small / "home" / ".cache" / "ormo"
    assert f"in {cache}/fashion-mnist, {cache}, {small}/debian;" in msg
    for name in mnist.FILES:
        assert name in msg
    assert APT in msg and "data.download = true" in msg
    github = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"
    assert f"fetch them from {github} into {cache}/fashion-mnist" in msg


def test_incomplete_folder_names_the_missing_file(small):
    arrays = _make_set("fashion-mnist", seed=14)
    _write(small / "data", arrays, omit=("t10k-labels-idx1-ubyte",))
    with pytest.raises(DatasetError, match=rf"the folder {small}/data holds some Fashion-MNIST files but not "
                                           rf"t10k-labels-idx1-ubyte \(raw or .gz\); add the missing files there, or "
                                           rf"delete the Fashion-MNIST files in {small}/data so that the search goes "
                                           rf"on; to get them, .*{APT}.*data.download = true"):
        load_dataset("fashion-mnist", data_dir=small / "data")
    # In the download folder, downloading completes the set: the message says so directly.
    _write(small / "other" / "fashion-mnist", arrays, omit=("train-images-idx3-ubyte",))
    with pytest.raises(DatasetError, match=r"but not train-images-idx3-ubyte \(raw or .gz\); to get them, on Debian"):
        load_dataset("fashion-mnist", data_dir=small / "other")


def _header(magic: int, *sizes: int) -> bytes:
    return struct.pack(f">{1 + len(sizes)}I", magic, *sizes)


_IMAGES, _LABELS = "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
_PIXELS = bytes(30 * 784)

# (file, its bytes before compression, the message expected); the small training set has 30 images, the test 10.
BAD_FILES = {
    "short header": (_IMAGES, _header(2051, 30), r"is 8 bytes long, shorter than the 16-byte header of an IDX file "
                                                 r"of images; it is truncated"),
    "labels as images": (_IMAGES, _header(2049, 30) + bytes(30), r"starts with magic number 2049 \(the magic of "
                                                                r"IDX labels\); expected 2051, an IDX file of images"),
    "wrong magic": (_LABELS, _header(2304, 10) + bytes(10), r"starts with magic number 2304; expected 2049"),
    "wrong side": (_IMAGES, _header(2051, 30, 27, 28) + bytes(30 * 27 * 28),
                   r"holds images of 27×28 pixels; expected 28×28"),
    "wrong count": (_IMAGES, _header(2051, 29, 28, 28) + bytes(29 * 784), r"holds 29 images; expected 30"),
    "wrong label count": (_LABELS, _header(2049, 11) + bytes(11), r"holds 11 labels; expected 10"),
    "truncated payload": (_IMAGES, _header(2051, 30, 28, 28) + _PIXELS[:-5],
                          r"has 23515 bytes after its header, but the header announces 30×28×28 = 23520 bytes; the "
                          r"file is truncated"),
    "trailing bytes": (_LABELS, _header(2049, 10) + bytes(range(10)) + b"\0",
                       r"has 11 bytes after its header, but the header announces 10 labels of one byte each; the "
                       r"file has trailing bytes"),
    "label out of range": (_LABELS, _header(2049, 10) + bytes([0, 1, 2, 3, 4, 5, 6, 7, 8, 10]),
                           r"has labels up to 10; expected values in 0..9"),
    "unbalanced labels": (_LABELS, _header(2049, 10) + bytes([0, 0, 2, 3, 4, 5, 6, 7, 8, 9]),
                          r"has \[2, 0, 1, 1, 1, 1, 1, 1, 1, 1\] images per class; Fashion-MNIST has \[1, 1, 1"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_damaged_file_names_it_what_was_expected_and_how_to_get_it(small, case, gz):
    name, content, message = BAD_FILES[case]
    _write(small / "data", _make_set("fashion-mnist", seed=15), gz=gz, raw_bytes={name: content})
    path = small / "data" / (f"{name}.gz" if gz else name)
    with pytest.raises(DatasetError, match=rf"^{path} {message}") as info:
        load_dataset("fashion-mnist", data_dir=small / "data")
    assert (f"delete the Fashion-MNIST files in {small}/data and set data.download = true (download=True) to fetch "
            f"the official ones into {small}/data/fashion-mnist from https://github.com/") in str(info.value)
    assert f"or delete them and use Debian's copy: `{APT}`" in str(info.value)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], r"EOFError: Compressed file ended before the end-of-stream marker"),
        (lambda b: b[:-8] + bytes(8), r"BadGzipFile: CRC check failed"),
        (lambda b: b"raw bytes, not gzip", r"BadGzipFile: Not a gzipped file"),
        (lambda b: b[:20] + bytes(200) + b[220:], r"error: Error -3 while decompressing data"),
    ],
    ids=["truncated", "bad crc", "not gzip", "corrupt stream"],
)
def test_damaged_gzip_is_a_dataset_error(small, damage, message):
    folder = _write(small / "data" / "fashion-mnist", _make_set("fashion-mnist", seed=16), gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    # In the download folder: deleting the one file and downloading fetches it again.
    with pytest.raises(DatasetError, match=rf"could not read {path} \(.*{message}.*\); it is truncated or corrupt: "
                                           rf"delete it and set data.download = true \(download=True\) to fetch the "
                                           rf"official file again from https://.*{APT}"):
        load_dataset("fashion-mnist", data_dir=small / "data")


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_unreadable_file_says_to_fix_its_permissions_not_to_delete_it(small, monkeypatch, gz):
    """A file this user may not read is not damaged: the fix is its permissions. (Opening is refused here by a
    stand-in, since the tests may run as root, whom file permissions do not stop.)"""
    from ormo.data import idx

    folder = _write(small / "data", _make_set("fashion-mnist", seed=17), gz=gz)
    path = folder / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))

    def refusing(real_open):
        def refuse(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)
        return refuse

    monkeypatch.setattr(idx, "open", refusing(open), raising=False)
    monkeypatch.setattr(gzip, "open", refusing(gzip.open))
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist", data_dir=small / "data")
    assert str(info.value) == (f"could not read {path} (PermissionError: Permission denied); give this user read "
                               f"access to it (e.g. chmod a+r {path}), or point data.data_dir at a readable copy")


def _peak_allocation(read) -> int:
    """The peak of Python's allocations (bytes) while ``read`` runs: the buffers a reader fills are counted."""
    tracemalloc.start()
    try:
        read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_gzip_bomb_is_refused_after_a_bounded_read(tmp_path):
    """A valid header and 10 labels, then 64 MiB of zeros (about 65 KB gzipped): only the expected payload and a
    bounded probe past it are decompressed, and the error says how much was seen."""
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(_header(2049, 10) + bytes(range(10)))
        for _ in range(64):
            f.write(bytes(1 << 20))

    def read() -> None:
        with pytest.raises(DatasetError, match=rf"^{path} has at least {11 + (1 << 20)} bytes after its header, but "
                                               r"the header announces 10 labels of one byte each; the file has "
                                               r"trailing bytes: get a good copy$"):
            read_idx(path, magic=2049, count=10, fix="get a good copy")

    assert _peak_allocation(read) < 8 << 20  # the whole file would be 64 MiB


def test_raw_file_longer_than_its_header_is_refused_before_its_payload_is_read(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_header(2051, 30, 28, 28))
    os.truncate(path, 16 + (256 << 20))  # a sparse file: 256 MiB of zeros (the audit's was 40 GB)

    def read() -> None:
        with pytest.raises(DatasetError, match=rf"^{path} has {256 << 20} bytes after its header, but the header "
                                               r"announces 30×28×28 = 23520 bytes; the file has trailing bytes: fix$"):
            read_idx(path, magic=2051, count=30, image_side=28, fix="fix")

    assert _peak_allocation(read) < 1 << 20


def test_damaged_debian_file_says_to_reinstall_the_package(small):
    _write(mnist.DEBIAN_FASHION_MNIST_DIR, _make_set("fashion-mnist", seed=17),
           raw_bytes={_LABELS: _header(2049, 9) + bytes(9)})
    with pytest.raises(DatasetError, match=r"holds 9 labels; expected 10: is it the right file\? reinstall the "
                                           r"package \(`apt-get install --reinstall dataset-fashion-mnist`"):
        load_dataset("fashion-mnist")


def test_mnist_files_read_as_fashion_mnist_are_recognised(small, monkeypatch):
    # Both sets at full size in miniature: equal totals, so only the per-class counts tell them apart.
    monkeypatch.setitem(mnist.LAYOUTS, "mnist", dataclasses.replace(SMALL["mnist"], train_counts=(2, 4) * 5,
                                                                     test_counts=(0, 2) * 5))
    rng = np.random.default_rng(18)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": np.repeat(np.arange(10), (2, 4) * 5).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": np.repeat(np.arange(10), (0, 2) * 5).astype(np.uint8)}
    _write(small / "data", arrays)
    with pytest.raises(DatasetError, match=r"These are MNIST's counts \(the two sets share file names\): keep "
                                           r"each set in its own subfolder, <data_dir>/fashion-mnist/ and "
                                           r"<data_dir>/mnist/"):
        load_dataset("fashion-mnist", data_dir=small / "data")


# ---------------------------------------------------------------------------------------------------------------
# download


def _gz_files(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {f"{name}.gz": gzip.compress(_idx(2051 if "images" in name else 2049, a)) for name, a in arrays.items()}


def test_download_tries_the_mirrors_in_order_into_the_named_subfolder(small, monkeypatch):
    arrays = _make_set("fashion-mnist", seed=19)
    served, calls = _gz_files(arrays), []
    layout = mnist.LAYOUTS["fashion-mnist"]

    def fake_fetch(url: str, dest: Path, *, md5: str) -> Path:
        calls.append(url)
        assert md5 == mnist.FASHION_MNIST.md5[dest.name]  # the published checksum is what the helper verifies
        if url.startswith(layout.mirrors[0]) and dest.name.startswith("t10k-images"):
            raise DatasetError(f"could not download {url}: refused")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(served[dest.name])
        return dest

    monkeypatch.setattr(mnist, "fetch", fake_fetch)
    data = small / "data"
    (data / "fashion-mnist").mkdir(parents=True)
    (data / "fashion-mnist" / "train-labels-idx1-ubyte").write_bytes(
        _idx(2049, arrays["train-labels-idx1-ubyte"]))  # present already: not fetched
    ds = load_dataset("fashion-mnist", data_dir=data, download=True)
    _check_matches(ds, arrays, name="fashion-mnist")
    github, s3 = layout.mirrors
    assert calls == [f"{github}train-images-idx3-ubyte.gz", f"{github}t10k-images-idx3-ubyte.gz",
                     f"{s3}t10k-images-idx3-ubyte.gz", f"{github}t10k-labels-idx1-ubyte.gz"]
    assert sorted(p.name for p in (data / "fashion-mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte"]
    calls.clear()
    load_dataset("fashion-mnist", data_dir=data, download=True)
    assert calls == []  # complete now: nothing fetched


def test_download_is_skipped_when_a_copy_is_found_and_reports_every_mirror_failing(small, monkeypatch):
    def failing_fetch(url: str, dest: Path, *, md5: str) -> Path:
        raise DatasetError(f"could not download {url}: offline")

    monkeypatch.setattr(mnist, "fetch", failing_fetch)
    with pytest.raises(DatasetError, match=r"mnist: every mirror failed for train-images-idx3-ubyte.gz: could not "
                                           r"download https://ossci-datasets.*offline \| could not download "
                                           r"https://storage.googleapis.com/cvdf-datasets/mnist/.*offline"):
        load_dataset("mnist", download=True)
    debian = _make_set("fashion-mnist", seed=20)
    _write(mnist.DEBIAN_FASHION_MNIST_DIR, debian, gz=True)
    _check_matches(load_dataset("fashion-mnist", download=True), debian, name="fashion-mnist")


def test_download_through_the_real_helper_checks_the_md5(small, monkeypatch):
    arrays = _make_set("mnist", seed=21)
    mirror = small / "mirror"
    mirror.mkdir()
    md5 = {}
    for name, content in _gz_files(arrays).items():
        (mirror / name).write_bytes(content)
        md5[name] = hashlib.md5(content).hexdigest()
    layout = dataclasses.replace(SMALL["mnist"], mirrors=(mirror.as_uri() + "/",), md5=md5)
    monkeypatch.setitem(mnist.LAYOUTS, "mnist", layout)
    _check_matches(load_dataset("mnist", data_dir=small / "data", download=True), arrays, name="mnist")
    assert sorted(p.name for p in (small / "data" / "mnist").iterdir()) == sorted(md5)  # no temporary files
    monkeypatch.setitem(mnist.LAYOUTS, "mnist", dataclasses.replace(layout, md5={k: "0" * 32 for k in md5}))
    with pytest.raises(DatasetError, match=r"has md5 [0-9a-f]{32}, expected 0{32}"):
        load_dataset("mnist", data_dir=small / "fresh", download=True)


# ---------------------------------------------------------------------------------------------------------------
# options


def _bilinear_matrix(n: int, size: int) -> np.ndarray:
    """The size×n matrix of half-pixel-centred linear interpolation (align_corners=False), clamped at the edges."""
    a = np.zeros((size, n))
    for i in range(size):
        s = max((i + 0.5) * n / size - 0.5, 0.0)
        lo = min(int(s), n - 1)
        hi, f = min(lo + 1, n - 1), s - lo
        a[i, lo] += 1 - f
        a[i, hi] += f
    return a


def test_upsample_is_bilinear_to_32_and_three_channels_by_default(small):
    arrays = _make_set("fashion-mnist", seed=22)
    _write(small / "data", arrays)
    up = load_dataset("fashion-mnist", data_dir=small / "data", upsample=True)
    assert up.image_shape == (3, 32, 32) and up.test_x.shape == (10, 3, 32, 32)
    assert torch.equal(up.train_x[:, 0], up.train_x[:, 1]) and torch.equal(up.train_x[:, 0], up.train_x[:, 2])
    a = _bilinear_matrix(28, 32)  # separable: rows, then columns
    for k in (0, 7):
        expected = a @ (arrays["train-images-idx3-ubyte"][k] / 255.0) @ a.T
        np.testing.assert_allclose(up.train_x[k, 0].numpy(), expected, atol=1e-6)
    gray = load_dataset("fashion-mnist", data_dir=small / "data", upsample=True, channels=1)
    assert gray.image_shape == (1, 32, 32) and torch.equal(gray.train_x[:, 0], up.train_x[:, 0])
    rgb = load_dataset("fashion-mnist", data_dir=small / "data", channels=3)
    assert rgb.image_shape == (3, 28, 28)
    assert torch.equal(rgb.train_x[:, 2] * 255, torch.from_numpy(arrays["train-images-idx3-ubyte"]).float())


@pytest.mark.parametrize(("option", "value", "message"), [
    ("upsample", "yes", r"invalid upsample: 'yes' \(must be True or False\)"),
    ("channels", 2, r"invalid channels: 2 \(must be 1 or 3"),
    ("channels", True, r"invalid channels: True"),
    ("size", 32, r"dataset 'mnist' has no option 'size' \(data.options.size\); accepted: upsample, channels, "
                 r"test_subset"),
])
def test_bad_options(small, option, value, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset("mnist", data_dir=small, **{option: value})


# ---------------------------------------------------------------------------------------------------------------
# training end to end


@pytest.mark.parametrize("model", ["lenet", "mlp"])
def test_training_on_a_tiny_fashion_mnist(small, model):
    _write(small / "data", _make_set("fashion-mnist", seed=23), gz=True)
    cfg = load_config(None, ["data.name=fashion-mnist", f"data.data_dir={small / 'data'}", "data.batch_size=5",
                             f"model.name={model}", "train.num_workers=2", "train.epochs=2", "train.eval_every=1"])
    result = train(cfg, small / "run", progress=False)
    rows = read_metrics(small / "run")
    assert [r["epoch"] for r in rows] == pytest.approx([0.0, 1.0, 2.0])
    assert all(0.0 <= r["test_acc"] <= 100.0 and np.isfinite(r["test_loss"]) for r in rows)
    assert all(np.isfinite(r["train_loss"]) for r in rows[1:]) and torch.isfinite(result.params).all()
    # Built for 1×28×28 inputs: the parameter counts written out layer by layer.
    expected = {"lenet": (1 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10),
                "mlp": (784 * 256 + 256) + (256 * 128 + 128) + (128 * 10 + 10)}
    assert result.params.numel() == expected[model]


# ---------------------------------------------------------------------------------------------------------------
# the real files


@pytest.mark.skipif(not (mnist.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"the real Fashion-MNIST is not installed in {mnist.DEBIAN_FASHION_MNIST_DIR} "
                           f"(`{APT}` installs it; .ci/run does so when it runs as root)")
def test_real_fashion_mnist_from_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.delenv("ORMO_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no personal copy: found through the default search
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [1000] * 10
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    assert float(ds.test_x.min()) == 0.0 and float(ds.test_x.max()) == 1.0
    # The training-set statistics commonly quoted for Fashion-MNIST: mean 0.2860, std 0.3530.
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-4) and ds.std[0] == pytest.approx(0.3530, abs=1e-4)
