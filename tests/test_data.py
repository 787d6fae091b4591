"""The datasets layer: loaders on small archives and folders built here in the real formats, subsets, augmentation
and the minibatch sampler. Expected values are computed independently (numpy, Pillow, loops over images)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import struct
import tarfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ormo.data import (
    AUGMENT_STREAM,
    INDICES_STREAM,
    Augment,
    Dataset,
    DatasetError,
    cifar,
    dataset_names,
    load_dataset,
    minibatch_generator,
    minibatch_indices,
    normalize,
    register_dataset,
    tinyimagenet,
)
from ormo.data import base as data_base
from ormo.rules.base import ConfigError


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


# ---------------------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_ranges_and_stratified_split(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    counts = np.bincount(raw.target)
    expected_test = [round(0.2 * c) for c in counts]  # the documented split: round(20 %) of each class
    assert digits.image_shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.train_x.shape == (1797 - sum(expected_test), 1, 8, 8) == (1438, 1, 8, 8)
    assert digits.test_x.shape == (359, 1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert float(digits.train_x.min()) == 0.0 and float(digits.train_x.max()) == 1.0
    assert torch.bincount(digits.test_y, minlength=10).tolist() == expected_test
    # Train and test together are exactly the bundled images (as a multiset of (pixels, label) rows).
    ours = torch.cat([torch.cat([digits.train_x, digits.test_x]).reshape(-1, 64) * 16,
                      torch.cat([digits.train_y, digits.test_y])[:, None].float()], dim=1)
    theirs = np.concatenate([raw.data, raw.target[:, None]], axis=1)
    assert sorted(map(tuple, ours.numpy().round().astype(int))) == sorted(map(tuple, theirs.astype(int)))


def test_digits_statistics_are_those_of_the_training_set(digits):
    x = digits.train_x.numpy().astype(np.float64)
    assert digits.mean == pytest.approx((x.mean(),), abs=1e-7)
    assert digits.std == pytest.approx((x.std(),), abs=1e-7)


def test_channel_stats_merges_chunks_exactly_enough():
    x = torch.rand(10, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    mean, std = data_base.channel_stats(x, chunk=3)  # chunks of 3, 3, 3 and 1 images
    ref = x.numpy().astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), atol=1e-7)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), atol=1e-7)


def test_digits_split_is_fixed_whatever_the_seed(digits):
    again = load_dataset("digits", seed=7)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)


def _bilinear_reference(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centred bilinear upsampling (align_corners=False), written out per output pixel."""
    n = img.shape[0]
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            sy, sx = max((i + 0.5) * n / size - 0.5, 0.0), max((j + 0.5) * n / size - 0.5, 0.0)
            y0, x0 = min(int(sy), n - 1), min(int(sx), n - 1)
            y1, x1 = min(y0 + 1, n - 1), min(x0 + 1, n - 1)
            fy, fx = sy - y0, sx - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                         + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
    return out


def test_digits_upsampled_is_bilinear_and_three_channel(digits):
    up = load_dataset("digits", upsample=True)
    assert up.image_shape == (3, 32, 32) and up.train_x.shape == (1438, 3, 32, 32)
    assert torch.equal(up.train_y, digits.train_y)
    assert torch.equal(up.train_x[:, 0], up.train_x[:, 1]) and torch.equal(up.train_x[:, 0], up.train_x[:, 2])
    for k in (0, 500):
        expected = _bilinear_reference(digits.train_x[k, 0].numpy().astype(np.float64), 32)
        np.testing.assert_allclose(up.train_x[k, 0].numpy(), expected, atol=1e-6)
    assert float(up.train_x.min()) >= 0.0 and float(up.train_x.max()) <= 1.0
    with pytest.raises(ConfigError, match=r"invalid upsample: 'yes'"):
        load_dataset("digits", upsample="yes")


# ---------------------------------------------------------------------------------------------------------------
# subsets


def test_subset_is_class_balanced_seeded_and_drawn_from_the_training_set(digits):
    sub = load_dataset("digits", subset=50, seed=3)
    assert torch.bincount(sub.train_y).tolist() == [5] * 10
    assert torch.equal(sub.test_x, digits.test_x)  # the test set is never subset by `subset`
    rows = {tuple(r) for r in digits.train_x.reshape(len(digits.train_x), -1).tolist()}
    assert all(tuple(r) in rows for r in sub.train_x.reshape(50, -1).tolist())
    assert torch.equal(load_dataset("digits", subset=50, seed=3).train_x, sub.train_x)
    assert not torch.equal(load_dataset("digits", subset=50, seed=4).train_x, sub.train_x)
    x = sub.train_x.numpy().astype(np.float64)
    assert sub.mean == pytest.approx((x.mean(),)) and sub.std == pytest.approx((x.std(),))

    odd = load_dataset("digits", subset=13, seed=0)
    counts = torch.bincount(odd.train_y, minlength=10)
    assert int(counts.sum()) == 13 and int(counts.max() - counts.min()) == 1


def test_test_subset_option(digits):
    sub = load_dataset("digits", test_subset=20)
    assert sub.test_size == 20 and torch.bincount(sub.test_y).tolist() == [2] * 10
    assert torch.equal(sub.train_x, digits.train_x)


def _blobs(counts: list[int], *, test: int = 4) -> Dataset:
    y = torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in enumerate(counts)])
    x = (torch.arange(len(y), dtype=torch.float32) / len(y)).reshape(-1, 1, 1, 1)
    return Dataset(name="blobs", train_x=x, train_y=y, test_x=torch.zeros(test, 1, 1, 1),
                   test_y=torch.zeros(test, dtype=torch.int64), num_classes=len(counts))


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry, so that the datasets a test registers vanish with it."""
    monkeypatch.setattr(data_base, "_REGISTRY", dict(data_base._REGISTRY))


def test_subset_gives_a_small_class_all_it_has_and_shares_the_rest(registry):
    @register_dataset("uneven")
    def uneven() -> Dataset:
        return _blobs([2, 10, 10])

    assert torch.bincount(load_dataset("uneven", subset=12).train_y).tolist() == [2, 5, 5]
    assert sorted(torch.bincount(load_dataset("uneven", subset=21).train_y).tolist()) == [2, 9, 10]
    assert load_dataset("uneven", subset=22).train_size == 22


@pytest.mark.parametrize("bad", [0, -1, 1439, 2.5, True, "10"])
def test_bad_subset_is_rejected(bad):
    with pytest.raises(ConfigError, match=r"invalid subset: .*\(must be None or an integer in \[1, 1438\]\)"):
        load_dataset("digits", subset=bad)


# ---------------------------------------------------------------------------------------------------------------
# registry


def test_builtin_names_and_unknown_name_lists_them():
    assert {"digits", "cifar10", "cifar100", "tinyimagenet", "synthetic"} <= set(dataset_names())
    with pytest.raises(ConfigError,
                       match=r"unknown dataset 'cifar11' \(data.name\); valid names: .*cifar10.*digits"):
        load_dataset("cifar11")


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match=r"dataset 'digits' has no option 'upsampel' \(data.options.upsampel\); "
                                          r"accepted: upsample, test_sub"):
        load_dataset("digits", upsampel=True)
    # and when the config is read, before anything runs (a sweep's --dry-run plans nothing with it)
    from ormo.experiment import load_config

    with pytest.raises(ConfigError, match=r"^dataset 'digits' has no option 'upsampel' \(data.options.upsampel\)"):
        load_config("preset:quickstart", ["data.options.upsampel=true"])
    with pytest.raises(ConfigError, match=r"^unknown model 'mlpp' \(model.name\)"):
        load_config("preset:quickstart", ['model.name="mlpp"'])
    with pytest.raises(ConfigError, match=r"dataset 'cifar10' has no option 'seed_offset'"):
        load_dataset("cifar10", seed_offset=1)


def test_user_registered_dataset_gets_seed_options_and_subsetting(registry):
    @register_dataset("blobs")
    def blobs(*, seed: int, per_class: int = 4) -> Dataset:
        assert seed == 11
        return _blobs([per_class] * 3)

    assert "blobs" in dataset_names()
    ds = load_dataset("blobs", seed=11, per_class=6, subset=9)
    assert ds.train_size == 9 and torch.bincount(ds.train_y).tolist() == [3, 3, 3]
    assert ds.image_shape == (1, 1, 1) and ds.num_classes == 3
    with pytest.raises(ConfigError, match="registered twice"):
        register_dataset("blobs")(blobs)
    with pytest.raises(ConfigError, match=r"'blobs' has no option 'size' \(data.options.size\); accepted: per_class, "
                                          r"test_subset"):
        load_dataset("blobs", seed=11, size=3)

    @register_dataset("broken")
    def broken() -> Dataset:
        return (torch.zeros(1), torch.zeros(1))  # type: ignore[return-value]

    with pytest.raises(ConfigError, match="returned tuple, not a Dataset"):
        load_dataset("broken")


def test_dataset_checks_its_tensors():
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"invalid train_x: .*float64.*float32 tensor of shape N×C×H×W"):
        Dataset("d", torch.zeros(2, 1, 2, 2, dtype=torch.float64), y, torch.zeros(1, 1, 2, 2), y[:1], 2)
    with pytest.raises(ConfigError, match=r"invalid train_x range: \(0.0, 255.0\)"):
        Dataset("d", torch.full((2, 1, 2, 2), 255.0).index_fill_(0, torch.tensor([0]), 0.0), y,
                torch.zeros(1, 1, 2, 2), y[:1], 2)
    with pytest.raises(ConfigError, match=r"invalid test_y range: \(5, 5\)"):
        Dataset("d", torch.zeros(2, 1, 2, 2), y, torch.zeros(1, 1, 2, 2), torch.tensor([5]), 2)
    with pytest.raises(ConfigError, match=r"invalid test_x: .*images of shape \(1, 2, 2\)"):
        Dataset("d", torch.zeros(2, 1, 2, 2), y, torch.zeros(1, 3, 2, 2), y[:1], 2)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 on small archives in the real format

_LAYOUTS = {"cifar10": cifar.CIFAR10, "cifar100": cifar.CIFAR100}


@pytest.fixture
def small_cifar(monkeypatch):
    """Both CIFAR layouts with the small files of :func:`_write_cifar`: 2 images per training file, 3 per test file
    (the published 10,000 or 50,000 would take hundreds of MB)."""
    for name, layout in _LAYOUTS.items():
        small = dataclasses.replace(layout, train_images_per_file=2, test_images_per_file=3)
        monkeypatch.setitem(cifar.LAYOUTS, name, small)


def _cifar_batch(rng: np.random.Generator, n: int, layout: cifar.CifarLayout) -> dict:
    batch = {b"batch_label": b"small test batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             layout.label_key: rng.integers(0, layout.num_classes, n).tolist(),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if layout.label_key == b"fine_labels":
        batch[b"coarse_labels"] = [k // 5 for k in batch[b"fine_labels"]]
    return batch


def _write_cifar(root: Path, name: str, *, omit: str | None = None, replace: dict | None = None,
                 protocol: int = 2, train_images: int = 2, test_images: int = 3) -> dict:
    """Write the extracted folder of ``name`` under ``root`` (by default 2 images per training file, 3 per test file:
    the numbers of :func:`small_cifar`)."""
    layout = _LAYOUTS[name]
    rng = np.random.default_rng(0)
    folder = root / layout.folder
    folder.mkdir(parents=True)
    batches = {}
    for file in layout.train_files + layout.test_files:
        batch = _cifar_batch(rng, test_images if file in layout.test_files else train_images, layout)
        batch.update((replace or {}).get(file, {}))
        batches[file] = batch
        if file != omit:
            (folder / file).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


def _tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


def _cifar_archive(tmp_path: Path, name: str, monkeypatch, **kwargs) -> tuple[Path, dict]:
    """``data/<archive>.tar.gz`` alone in ``data/`` (built from a folder elsewhere), its MD5 put in the table."""
    layout = _LAYOUTS[name]
    batches = _write_cifar(tmp_path / "src", name, **kwargs)
    data = tmp_path / "data"
    data.mkdir()
    archive = _tar_gz(tmp_path / "src" / layout.folder, data / layout.archive)
    monkeypatch.setitem(cifar.MD5, layout.archive, _md5(archive))
    return data, batches


def _expected(batches: dict, files: tuple[str, ...], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([batches[f][b"data"] for f in files]).reshape(-1, 3, 32, 32) / 255.0
    y = np.concatenate([batches[f][label_key] for f in files])
    return x, y


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("route", ["archive", "folder"])
def test_cifar_reads_archive_and_folder(small_cifar, tmp_path, monkeypatch, name, route):
    layout = _LAYOUTS[name]
    if route == "archive":
        data, batches = _cifar_archive(tmp_path, name, monkeypatch)
    else:
        data = tmp_path / "data"
        batches = _write_cifar(data, name)  # no archive, no checksum needed
    ds = load_dataset(name, data_dir=data)
    train_x, train_y = _expected(batches, layout.train_files, layout.label_key)
    test_x, test_y = _expected(batches, layout.test_files, layout.label_key)
    assert ds.num_classes == layout.num_classes and ds.image_shape == (3, 32, 32)
    assert ds.train_x.shape == (2 * len(layout.train_files), 3, 32, 32) and ds.test_size == 3
    np.testing.assert_allclose(ds.train_x.numpy(), train_x, atol=1e-7)
    np.testing.assert_allclose(ds.test_x.numpy(), test_x, atol=1e-7)
    assert ds.train_y.tolist() == train_y.tolist() and ds.test_y.tolist() == test_y.tolist()
    # Row-major 3×32×32: pixel (c, h, w) of image 0 is byte c·1024 + h·32 + w of its row.
    row = batches[layout.train_files[0]][b"data"][0]
    assert float(ds.train_x[0, 2, 5, 7]) == pytest.approx(row[2 * 1024 + 5 * 32 + 7] / 255.0)


def test_cifar_default_data_dir_comes_from_the_environment(small_cifar, tmp_path, monkeypatch):
    data, _ = _cifar_archive(tmp_path, "cifar10", monkeypatch)
    monkeypatch.setenv("ORMO_DATA", str(data))
    assert load_dataset("cifar10").train_size == 10


def test_cifar_wrong_checksum_says_to_download_again(small_cifar, tmp_path, monkeypatch):
    data, _ = _cifar_archive(tmp_path, "cifar10", monkeypatch)
    monkeypatch.setitem(cifar.MD5, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")  # the real one
    with pytest.raises(DatasetError, match=r"checksum mismatch for .*cifar-10-python.tar.gz: md5 [0-9a-f]{32}, "
                                           r"expected c58f30108f718f92721af3b95e74349a.*download=True"):
        load_dataset("cifar10", data_dir=data)


def test_cifar_unreadable_archive_says_to_fix_its_permissions(small_cifar, tmp_path, monkeypatch):
    """(Refused by a stand-in: the tests may run as root, whom file permissions do not stop.)"""
    from ormo.data import download

    data, _ = _cifar_archive(tmp_path, "cifar10", monkeypatch)
    archive = data / "cifar-10-python.tar.gz"

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(download, "md5_of", refuse)
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", data_dir=data)
    assert str(info.value) == (f"could not read {archive} (PermissionError: Permission denied); give this user read "
                               f"access to it (e.g. chmod a+r {archive}), or point data.data_dir at a readable copy")


def test_cifar_truncated_archive(small_cifar, tmp_path, monkeypatch):
    data, _ = _cifar_archive(tmp_path, "cifar10", monkeypatch)
    archive = data / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_dataset("cifar10", data_dir=data)
    monkeypatch.setitem(cifar.MD5, "cifar-10-python.tar.gz", _md5(archive))  # past the checksum: the reader's error
    with pytest.raises(DatasetError, match=r"could not read the archive .*truncated or corrupt.*download"):
        load_dataset("cifar10", data_dir=data)


def test_cifar_missing_member(small_cifar, tmp_path, monkeypatch):
    data, _ = _cifar_archive(tmp_path, "cifar10", monkeypatch, omit="test_batch")
    with pytest.raises(DatasetError, match=r"has no member 'cifar-10-batches-py/test_batch'"):
        load_dataset("cifar10", data_dir=data)


@pytest.mark.parametrize(("kind", "target"),
                         [(tarfile.SYMTYPE, "../../../etc/passwd"), (tarfile.LNKTYPE, "/etc/passwd"),
                          (tarfile.SYMTYPE, "data_batch_2"), (tarfile.DIRTYPE, "")],
                         ids=["symlink out", "hardlink absolute", "symlink to a member", "directory"])
def test_cifar_archive_member_that_is_not_a_regular_file(small_cifar, tmp_path, monkeypatch, kind, target):
    data, _ = _cifar_archive(tmp_path, "cifar10", monkeypatch, omit="data_batch_1")
    archive = data / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "r:gz") as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()]
    link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    link.type, link.linkname = kind, target
    with tarfile.open(archive, "w:gz") as tf:
        for m, content in [*members, (link, None)]:
            tf.addfile(m, None if content is None else io.BytesIO(content))
    monkeypatch.setitem(cifar.MD5, "cifar-10-python.tar.gz", _md5(archive))
    with pytest.raises(DatasetError, match=r"^cifar10: member 'cifar-10-batches-py/data_batch_1' of .* is not a "
                                           r"regular file; it is not the CIFAR python archive: delete it and download "
                                           r"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz again$"):
        load_dataset("cifar10", data_dir=data)


def test_cifar_missing_files_say_where_to_put_the_archive(small_cifar, tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar100", data_dir=tmp_path)
    msg = str(info.value)
    assert f"{tmp_path}/cifar-100-python/" in msg and f"{tmp_path}/cifar-100-python.tar.gz" in msg
    assert f"https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and put it in {tmp_path}" in msg
    assert "download=True" in msg


def test_cifar_incomplete_folder_names_the_missing_file(small_cifar, tmp_path):
    _write_cifar(tmp_path, "cifar10", omit="data_batch_3")
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py/ has no file 'data_batch_3'"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({b"data": np.zeros((2, 100), dtype=np.uint8)}, r"uint8 array of shape \(2, 100\); expected an N×3072 uint8"),
        ({b"data": np.zeros((2, 3072), dtype=np.float32)}, r"float32 array .*expected an N×3072 uint8"),
        ({b"labels": [0, 1, 2]}, r"has shape \(3,\) .*expected 2 integer labels"),
        ({b"labels": [0, 10]}, r"labels in .* span \[0, 10\]; expected values in \[0, 10\)"),
        ({b"labels": np.array([0, 1], dtype="m8[s]")}, r"dtype timedelta64\[s\]; expected 2 integer labels"),
        ({b"labels": np.array([True, False])}, r"dtype bool; expected 2 integer labels"),
        ({b"labels": [0, 1.0]}, r"b'labels' in .*data_batch_2 is a list holding a float; expected 2 integer labels"),
        ({b"labels": [[0] * 1000] * 2}, r"is a list holding a list; expected 2 integer labels"),
        ({b"labels": "01"}, r"b'labels' in .* is a str; expected a list or array of 2 integer labels"),
        ({b"data": np.zeros((3, 3072), dtype=np.uint8)}, r"data_batch_2 holds 3 images; expected 2, as in the "
                                                         r"published cifar-10-python.tar.gz"),
    ],
)
def test_cifar_malformed_batch(small_cifar, tmp_path, replace, message):
    _write_cifar(tmp_path, "cifar10", replace={"data_batch_2": replace})
    with pytest.raises(DatasetError, match=message):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_must_hold_the_published_number_of_images(tmp_path, name):
    """Without small_cifar: the real counts, which a folder of 20 images per file does not reach."""
    layout = _LAYOUTS[name]
    _write_cifar(tmp_path, name, train_images=20, test_images=20)
    first = layout.train_files[0]
    with pytest.raises(DatasetError, match=rf"^{name}: {tmp_path}/{layout.folder}/{first} holds 20 images; expected "
                                           rf"{layout.train_images_per_file}, as in the published {layout.archive}: "
                                           rf"the file is incomplete or from another dataset; delete it and extract "
                                           rf"{layout.archive} again"):
        load_dataset(name, data_dir=tmp_path)


def test_cifar_member_that_is_not_a_pickle(small_cifar, tmp_path):
    _write_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"cifar-100-python/test is not a readable pickle"):
        load_dataset("cifar100", data_dir=tmp_path)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_cifar_restricted_unpickler_reads_numpy_arrays_under_every_protocol(small_cifar, tmp_path, protocol):
    batches = _write_cifar(tmp_path, "cifar10", protocol=protocol,
                           replace={"test_batch": {b"labels": np.array([1, 2, 3], dtype=np.int32)}})
    ds = load_dataset("cifar10", data_dir=tmp_path)
    train_x, train_y = _expected(batches, cifar.CIFAR10.train_files, b"labels")
    np.testing.assert_allclose(ds.train_x.numpy(), train_x, atol=1e-7)
    assert ds.train_y.tolist() == train_y.tolist() and ds.test_y.tolist() == [1, 2, 3]


def _py2_string(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING: how Python 2 wrote a str (read back as bytes)


def test_cifar_reads_a_python2_pickle_as_in_the_official_archive(small_cifar, tmp_path):
    """The official batches were written by Python 2's cPickle: str as SHORT_BINSTRING, numpy 1's module names."""
    _write_cifar(tmp_path, "cifar10")
    pixels = bytes(range(256)) * 36  # three images of 3072 bytes
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_string(b"b") + b"\x87R"
             b"(K\x01K\x03M\x00\x0c\x86cnumpy\ndtype\n" + _py2_string(b"u1") + b"K\x00K\x01\x87R(K\x03"
             + _py2_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tbI00\nT"
             + len(pixels).to_bytes(4, "little") + pixels + b"tb")
    batch = (b"\x80\x02}(" + _py2_string(b"data") + array + _py2_string(b"labels") + b"](K\x07K\x08K\x09e"
             + _py2_string(b"batch_label") + _py2_string(b"testing batch 1 of 1") + b"u.")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(batch)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.test_y.tolist() == [7, 8, 9]
    np.testing.assert_allclose(ds.test_x.flatten().numpy(), np.frombuffer(pixels, np.uint8) / 255.0, atol=1e-7)


class _RunsCode:
    """Unpickling this runs a shell command (the stand-in for a crafted batch in an extracted folder)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_cifar_refuses_a_pickle_that_would_run_code(small_cifar, tmp_path):
    marker = tmp_path / "ran"
    _write_cifar(tmp_path, "cifar10", replace={"data_batch_4": {b"batch_label": _RunsCode(marker)}})
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and f"{tmp_path}/cifar-10-batches-py/data_batch_4 is not a CIFAR batch" in message
    assert "names 'posix.system'" in message and "extract cifar-10-python.tar.gz again" in message


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x80\x02cnumpy\ndtype\n)R.", r"TypeError: .*missing 1 required positional argument"),  # dtype()
        (b"\x80\x04\x8e" + (2**45).to_bytes(8, "little") + b"x.", r"MemoryError"),  # BINBYTES8 of 32 TiB
        (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x40\x85U\x01b\x87R.",
         r"UnpicklingError: numpy's _reconstruct called with .*1073741824"),  # a 1 GiB array, not numpy's (0,)
        (b"\x80\x02cnumpy\ndtype\nU\x01O\x85R.", r"UnpicklingError: numpy dtype object holds Python objects"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xU\x04zlib\x86R.",
         r"UnpicklingError: _codecs.encode called with a str and b'zlib'"),
    ],
    ids=["type error", "huge bytes", "huge array", "object dtype", "other codec"],
)
def test_cifar_unreadable_pickle_is_one_line_naming_the_file(small_cifar, tmp_path, content, reason):
    _write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(content)
    with pytest.raises(DatasetError, match=rf"^cifar10: {tmp_path}/cifar-10-batches-py/data_batch_1 is not a "
                                           rf"readable pickle \({reason}.*\); it is truncated, corrupt or not a "
                                           rf"CIFAR batch: delete it and extract cifar-10-python.tar.gz again") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_cifar_dict_with_mixed_key_types_is_described(small_cifar, tmp_path):
    _write_cifar(tmp_path, "cifar10")
    batch = {b"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], 3: "x"}
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_5 should hold a dict with keys b'data' and b'labels'; found "
                                           r"\['labels', 3, b'data'\]$"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_dict_with_keys_that_have_no_short_repr_is_described(small_cifar, tmp_path):
    """An int of 5,001 digits (repr refuses it) and a 1 MB bytes key are each described in a few characters."""
    _write_cifar(tmp_path, "cifar10")
    entries = (b"\x80\x02}(" + pickle.dumps(10**5000, protocol=2)[2:-1] + b"K\x02"
               + pickle.dumps(b"k" * 2**20, protocol=3)[2:-1] + b"K\x03u.")
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").write_bytes(entries)
    with pytest.raises(DatasetError, match=r"data_batch_5 should hold a dict with keys b'data' and b'labels'; found "
                                           r"\[<int>, b'k{40}'…\]$") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert len(str(info.value)) < 400


_DEEP = b")" + b"\x85" * 200_000  # EMPTY_TUPLE, then TUPLE1 200,000 times: a tuple nested 200,000 deep


def test_cifar_deeply_nested_key_is_refused_before_it_is_hashed(tmp_path):
    """Hashing a tuple nested 200,000 deep recurses in C past the stack: the process dies (SIGSEGV) unless the key is
    refused first. Read in one child process, so that a crash fails this test instead of ending the test session."""
    import subprocess
    import sys

    cases = {
        "setitem": (b"\x80\x02}" + _DEEP + b"K\x01s.", "a dict key is a tuple; a CIFAR batch's keys are strings"),
        "setitems": (b"\x80\x02}(" + _DEEP + b"K\x01u.", "a dict key is a tuple"),
        "dict": (b"(" + _DEEP + b"K\x01d.", "a dict key is a tuple"),  # protocol 0
        "set": (b"\x80\x04\x8f(" + _DEEP + b"\x90.", "the pickle builds a set; a CIFAR batch holds none"),
        "frozenset": (b"\x80\x04(" + _DEEP + b"\x91.", "the pickle builds a set"),
    }
    for case, (content, _) in cases.items():
        (tmp_path / case / "cifar-10-batches-py").mkdir(parents=True)
        (tmp_path / case / "cifar-10-batches-py" / "data_batch_1").write_bytes(content)
    code = ("import sys\n"
            "from ormo.data import DatasetError, load_dataset\n"
            "for folder in sys.argv[1:]:\n"
            "    try:\n"
            "        load_dataset('cifar10', data_dir=folder)\n"
            "    except DatasetError as e:\n"
            "        print(e, flush=True)\n")
    root = Path(__file__).resolve().parent.parent  # this checkout's ormo, whatever the installed one
    done = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / case) for case in cases)], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the child died with {done.returncode} after: {done.stdout}"
    lines = done.stdout.splitlines()
    assert len(lines) == len(cases)
    for line, (case, (_, reason)) in zip(lines, cases.items(), strict=True):
        assert line.startswith(f"cifar10: {tmp_path / case}/cifar-10-batches-py/data_batch_1 is not a readable "
                               f"pickle (UnpicklingError: {reason}"), line


def test_cifar_download_verifies_and_renames_into_place(small_cifar, tmp_path, monkeypatch):
    mirror, batches = _cifar_archive(tmp_path, "cifar10", monkeypatch)
    monkeypatch.setitem(cifar.URLS, "cifar-10-python.tar.gz", (mirror / "cifar-10-python.tar.gz").as_uri())
    data = tmp_path / "cache" / "ormo"  # created by the download
    ds = load_dataset("cifar10", data_dir=data, download=True)
    assert _md5(data / "cifar-10-python.tar.gz") == cifar.MD5["cifar-10-python.tar.gz"]
    assert [p.name for p in data.iterdir()] == ["cifar-10-python.tar.gz"]  # no temporary file left
    assert ds.test_y.tolist() == batches["test_batch"][b"labels"]
    # A corrupt copy is replaced when download=True.
    (data / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    assert load_dataset("cifar10", data_dir=data, download=True).train_size == 10


def test_cifar_download_errors_leave_no_file(small_cifar, tmp_path, monkeypatch):
    mirror, _ = _cifar_archive(tmp_path, "cifar10", monkeypatch)
    data = tmp_path / "cache"
    monkeypatch.setitem(cifar.URLS, "cifar-10-python.tar.gz", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DatasetError, match=r"could not download http://127.0.0.1:9/.*put it at .*cache"):
        load_dataset("cifar10", data_dir=data, download=True)
    monkeypatch.setitem(cifar.URLS, "cifar-10-python.tar.gz", (mirror / "cifar-10-python.tar.gz").as_uri())
    monkeypatch.setitem(cifar.MD5, "cifar-10-python.tar.gz", "0" * 32)
    with pytest.raises(DatasetError, match=r"downloaded .* has md5 [0-9a-f]{32}, expected 0{32}"):
        load_dataset("cifar10", data_dir=data, download=True)
    assert list(data.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Tiny ImageNet on a tiny folder

_WNIDS = ["n0000002", "n0000001"]  # not sorted: class order must follow wnids.txt
_VAL = [("val_0.JPEG", "n0000001"), ("val_1.JPEG", "n0000002")]


def _color(k: int) -> tuple[int, int, int]:
    return (40 * k + 10, 200 - 30 * k, 90 + 20 * k)


@pytest.fixture(autouse=True)
def _tiny_sizes(monkeypatch):
    """The tiny folder's sizes stand for the real Tiny ImageNet's (200 classes × 500, 10,000 validation images)."""
    monkeypatch.setattr(tinyimagenet, "SIZES", {"classes": 2, "train_per_class": 3, "val": 2})


def _write_tiny(root: Path) -> Path:
    """2 classes × 3 training images (solid colours, one grayscale), 2 validation images, in the real layout."""
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(_WNIDS) + "\n")
    for c, wnid in enumerate(_WNIDS):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(3):
            img = Image.new("RGB", (64, 64), _color(3 * c + i))
            (img.convert("L") if (c, i) == (1, 2) else img).save(images / f"{wnid}_{i}.JPEG", quality=95)
    lines = []
    for k, (file, wnid) in enumerate(_VAL):
        Image.new("RGB", (64, 64), _color(6 + k)).save(folder / "val" / "images" / file, quality=95)
        lines.append(f"{file}\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def _pil_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1) / 255.0


def test_tinyimagenet_reads_the_standard_layout(tmp_path):
    folder = _write_tiny(tmp_path)
    ds = load_dataset("tinyimagenet", data_dir=tmp_path)
    assert ds.num_classes == 2 and ds.image_shape == (3, 64, 64)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_y.tolist() == [1, 0]
    for k, (c, i) in enumerate([(c, i) for c in range(2) for i in range(3)]):
        path = folder / "train" / _WNIDS[c] / "images" / f"{_WNIDS[c]}_{i}.JPEG"
        np.testing.assert_allclose(ds.train_x[k].numpy(), _pil_pixels(path), atol=1e-7)
        if (c, i) != (1, 2):  # solid colours survive JPEG to within a few levels
            mean_rgb = ds.train_x[k].mean(dim=(1, 2)).numpy() * 255
            np.testing.assert_allclose(mean_rgb, _color(3 * c + i), atol=3)
    gray = ds.train_x[5]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    np.testing.assert_allclose(ds.test_x[1].numpy(), _pil_pixels(folder / "val" / "images" / "val_1.JPEG"))


def test_tinyimagenet_missing_folder_says_where_to_unzip(tmp_path):
    with pytest.raises(DatasetError, match=rf"no folder {tmp_path}/tiny-imagenet-200/; download "
                                           r"http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it in .*"
                                           r"download=True"):
        load_dataset("tinyimagenet", data_dir=tmp_path)


def _break_annotations(folder: Path) -> None:
    (folder / "val" / "val_annotations.txt").unlink()


def _break_listed_image(folder: Path) -> None:
    (folder / "val" / "images" / "val_1.JPEG").unlink()


def _break_image_bytes(folder: Path) -> None:
    (folder / "train" / "n0000001" / "images" / "n0000001_1.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")


def _break_image_size(folder: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 64)).save(folder / "val" / "images" / "val_0.JPEG")


def _break_wnid(folder: Path) -> None:
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn9999999\t0\t0\t1\t1\n")


def _break_class_folder(folder: Path) -> None:
    (folder / "wnids.txt").write_text("\n".join([*_WNIDS, "n0000003"]))


def _break_val_name_outside(folder: Path) -> None:
    from PIL import Image

    (folder.parent / "outside").mkdir()
    Image.new("RGB", (64, 64)).save(folder.parent / "outside" / "secret.JPEG")  # a good image, outside the dataset
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn0000001\t0\t0\t1\t1\n"
                                                        "../../../outside/secret.JPEG\tn0000002\t0\t0\t1\t1\n")


def _break_wnid_outside(folder: Path) -> None:
    (folder.parent / "outside" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("n0000002\n../../outside\n")


def _break_wnids_encoding(folder: Path) -> None:
    (folder / "wnids.txt").write_bytes(b"n0000002\nn000\xff0001\n")


def _break_annotations_encoding(folder: Path) -> None:
    (folder / "val" / "val_annotations.txt").write_bytes(b"val_0.JPEG\tn0000001\t0\t0\t1\t1 \xe9t\xe9\n")


def _break_annotations_empty(folder: Path) -> None:
    (folder / "val" / "val_annotations.txt").write_text("\n")


def _break_empty_class(folder: Path) -> None:
    for image in (folder / "train" / "n0000001" / "images").iterdir():
        image.unlink()


def _break_missing_class(folder: Path) -> None:  # an interrupted or edited unzip: part of the data, silently
    (folder / "wnids.txt").write_text("n0000002\n")


def _break_missing_image(folder: Path) -> None:
    (folder / "train" / "n0000001" / "images" / "n0000001_2.JPEG").unlink()


def _break_missing_val_line(folder: Path) -> None:
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn0000001\t0\t0\t63\t63\n")


def _break_repeated_val_line(folder: Path) -> None:
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn0000001\t0\t0\t63\t63\n" * 2)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_break_annotations, r"no validation labels .*val/val_annotations.txt"),
        (_break_listed_image, r"line 2 lists val_1.JPEG, but .*val/images/val_1.JPEG does not exist"),
        (_break_image_bytes, r"cannot decode .*n0000001_1.JPEG .*corrupt"),
        (_break_image_size, r"val_0.JPEG is 32×64 pixels; expected 64×64"),
        (_break_wnid, r"line 1 of .*val_annotations.txt should be .* a wnid from wnids.txt"),
        (_break_class_folder, r"class n0000003 .* has no folder .*train/n0000003/images/"),
        (_break_val_name_outside, r"line 2 of .*val/val_annotations.txt names the image "
                                  r"'../../../outside/secret.JPEG'; expected a plain file name in .*val/images/ "
                                  r"\(no '/', '\\' or '..'\)"),
        (_break_wnid_outside, r"wnids.txt lists '../../outside'; expected WordNet ids such as 'n01443537', plain "
                              r"folder names"),
        (_break_wnids_encoding, r"wnids.txt is not UTF-8 text \(byte 0xff at offset 13\); the folder .* is damaged"),
        (_break_annotations_encoding, r"val_annotations.txt is not UTF-8 text \(byte 0xe9 at offset 28\)"),
        (_break_annotations_empty, r"val_annotations.txt lists no validation image; expected one line per image of "
                                   r".*val/images/ \(10,000 in Tiny ImageNet\)"),
        (_break_missing_class, r"wnids.txt lists 1 classes; Tiny ImageNet has 2: the folder .* is incomplete or "
                               r"edited: unzip tiny-imagenet-200.zip again"),
        (_break_missing_image, r"train/n0000001/images/ holds 2 \*.JPEG images; every class of Tiny ImageNet has 3: "
                               r"the folder .* is incomplete or edited"),
        (_break_missing_val_line, r"val_annotations.txt lists 1 validation images \(1 distinct\); Tiny ImageNet "
                                  r"has 2: the folder .* is incomplete or edited"),
        (_break_repeated_val_line, r"val_annotations.txt lists 2 validation images \(1 distinct\)"),
        (_break_empty_class, r"train/n0000001/images/ holds no \*.JPEG image \(every class of Tiny ImageNet has 500\)"),
    ],
)
def test_tinyimagenet_damaged_folder(tmp_path, damage, message):
    damage(_write_tiny(tmp_path))
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset("tinyimagenet", data_dir=tmp_path)
    assert str(info.value).startswith("tinyimagenet: ") and "\n" not in str(info.value)


def _png_header(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG declaring ``width``×``height`` pixels whose pixel data (one empty IDAT chunk) is missing:
    decoding it fails, so only a reader that checks the size from the header reports the size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("side", "message"),
    [
        (9000, r"n0000001_1.JPEG is 9000×9000 pixels; expected 64×64: it is not a Tiny ImageNet image"),  # not decoded
        (20000, r"n0000001_1.JPEG declares far more than 64×64 pixels \(DecompressionBombError: .*\); it is not a "
                r"Tiny ImageNet image: unzip tiny-imagenet-200.zip again$"),
        pytest.param(10000, r"n0000001_1.JPEG declares far more than 64×64 pixels \(DecompressionBombWarning: ",
                     marks=pytest.mark.filterwarnings("error")),
    ],
    ids=["large", "bomb", "bomb warning as error"],
)
def test_tinyimagenet_image_size_is_checked_from_the_header_before_decoding(tmp_path, side, message):
    folder = _write_tiny(tmp_path)
    (folder / "train" / "n0000001" / "images" / "n0000001_1.JPEG").write_bytes(_png_header(side, side))
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset("tinyimagenet", data_dir=tmp_path)
    assert str(info.value).startswith(f"tinyimagenet: {folder}/train/") and "\n" not in str(info.value)


def test_tinyimagenet_first_bad_image_stops_the_decoding(tmp_path, monkeypatch):
    """Two threads: the first image is slow, the second is bad. The error must not wait for the first image while
    the other thread decodes all the rest: the images not yet started are cancelled."""
    from PIL import Image

    folder = _write_tiny(tmp_path)
    for wnid in _WNIDS:
        for i in range(3, 33):
            Image.new("RGB", (64, 64), _color(i % 7)).save(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG",
                                                            quality=95)
    monkeypatch.setitem(tinyimagenet.SIZES, "train_per_class", 33)
    images = folder / "train" / "n0000002" / "images"
    (images / "n0000002_1.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")  # file 1 of the training set
    opened: list[str] = []
    real_open, never = Image.open, threading.Event()

    def slow_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        if Path(path).name == "n0000002_0.JPEG":
            never.wait(1.0)  # file 0 holds its thread for a second
        else:
            time.sleep(0.005)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", slow_open)
    monkeypatch.setattr(tinyimagenet, "_DECODE_THREADS", 2)
    with pytest.raises(DatasetError, match=r"cannot decode .*n0000002_1.JPEG"):
        load_dataset("tinyimagenet", data_dir=tmp_path)
    assert len(opened) < 10, f"{len(opened)} of the 68 images were opened before the error"


@pytest.mark.parametrize("kind", ["fifo", "broken link"])
def test_tinyimagenet_image_that_is_not_a_regular_file_is_refused_without_opening_it(tmp_path, kind):
    """A FIFO named like an image would block the reader forever: it is refused before it is opened. (Should the
    reader open it anyway, a writer closes it after 5 s, so this test fails instead of hanging.)"""
    import os

    folder = _write_tiny(tmp_path)
    odd = folder / "train" / "n0000001" / "images" / "n0000001_2.JPEG"
    odd.unlink()  # in place of an image: the folder keeps its size
    if kind == "fifo":
        os.mkfifo(odd)
        release = threading.Timer(5.0, lambda: os.close(os.open(odd, os.O_WRONLY)))
        release.start()
    else:
        odd.symlink_to(tmp_path / "nowhere.JPEG")
    start = time.monotonic()
    try:
        with pytest.raises(DatasetError, match=rf"^tinyimagenet: {odd} is not a regular file \(a pipe, a device, a "
                                               r"broken link\?\); it is not a Tiny ImageNet image: unzip "
                                               r"tiny-imagenet-200.zip again$"):
            load_dataset("tinyimagenet", data_dir=tmp_path)
        assert time.monotonic() - start < 4.0
    finally:
        if kind == "fifo" and not release.finished.is_set():
            release.cancel()


def test_tinyimagenet_download_extracts_the_zip(tmp_path, monkeypatch):
    folder = _write_tiny(tmp_path / "src")
    zip_path = tmp_path / "mirror" / "tiny-imagenet-200.zip"
    zip_path.parent.mkdir()
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder.parent).as_posix())
    monkeypatch.setitem(tinyimagenet.URLS, "tiny-imagenet-200.zip", zip_path.as_uri())
    monkeypatch.setitem(tinyimagenet.MD5, "tiny-imagenet-200.zip", _md5(zip_path))
    data = tmp_path / "data"
    ds = load_dataset("tinyimagenet", data_dir=data, download=True)
    assert ds.train_size == 6 and ds.test_y.tolist() == [1, 0]
    assert sorted(p.name for p in data.iterdir()) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]


# ---------------------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_determined_by_the_seed():
    opts = dict(num_classes=3, image_shape=(2, 5, 4), train_size=30, test_size=9, noise=0.1)
    a, b = load_dataset("synthetic", seed=1, **opts), load_dataset("synthetic", seed=1, **opts)
    c = load_dataset("synthetic", seed=2, **opts)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.image_shape == (2, 5, 4) and a.train_x.shape == (30, 2, 5, 4) and a.test_size == 9
    assert torch.bincount(a.train_y).tolist() == [10, 10, 10]
    # The test set does not depend on the training set's size.
    assert torch.equal(load_dataset("synthetic", seed=1, **{**opts, "train_size": 7}).test_x, a.test_x)


def test_synthetic_without_noise_gives_the_class_prototypes():
    ds = load_dataset("synthetic", num_classes=2, image_shape=(1, 3, 3), train_size=10, test_size=4, noise=0.0)
    for c in range(2):
        members = ds.train_x[ds.train_y == c]
        assert torch.equal(members, members[:1].expand_as(members))
        assert float(members.min()) >= 0.25 and float(members.max()) <= 0.75
        assert torch.equal(ds.test_x[ds.test_y == c][0], members[0])


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("image_shape", (3, 32), r"invalid image_shape: \(3, 32\) \(must be three positive integers"),
        ("image_shape", (3, 0, 4), "three positive integers"),
        ("noise", -0.1, r"invalid noise: -0.1 \(must be a finite number >= 0\)"),
        ("num_classes", 0, r"invalid num_classes: 0 \(must be an integer >= 1\)"),
        ("train_size", 1.5, "invalid train_size"),
    ],
)
def test_synthetic_bad_options(option, value, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset("synthetic", **{option: value})


# ---------------------------------------------------------------------------------------------------------------
# augmentation


def _batch(n: int = 64, c: int = 3, h: int = 8, w: int = 10) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(123)) + 0.1  # no zeros: padding shows


def test_crop_is_a_window_of_the_zero_padded_image():
    x, p = _batch(), 3
    out = Augment(crop_padding=p, flip=False)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.zeros(64, 3, 8 + 2 * p, 10 + 2 * p)
    padded[:, :, p:-p, p:-p] = x
    offsets = []
    for n in range(64):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(out[n], padded[n, :, dy:dy + 8, dx:dx + 10])]
        assert hits, f"image {n} is no window of its padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 10  # offsets vary per image


def test_flip_mirrors_about_half_the_images():
    x = _batch()
    out = Augment(crop_padding=0, flip=True)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[n], x[n].flip(-1)) for n in range(64)]
    kept = [torch.equal(out[n], x[n]) for n in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 <= sum(flipped) <= 48


def test_crop_and_flip_follow_the_documented_draw_order():
    x, p = _batch(n=16), 2
    out = Augment(crop_padding=p, flip=True)(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay: row offsets, column offsets, then coins
    oy, ox = torch.randint(0, 2 * p + 1, (16,), generator=g), torch.randint(0, 2 * p + 1, (16,), generator=g)
    coins = torch.rand(16, generator=g)
    padded = F.pad(x, (p, p, p, p))
    for n in range(16):
        window = padded[n, :, oy[n]:oy[n] + 8, ox[n]:ox[n] + 10]
        assert torch.equal(out[n], window.flip(-1) if coins[n] < 0.5 else window)


def test_fixed_generator_seed_gives_identical_output():
    x, aug = _batch(), Augment(crop_padding=4, flip=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    a = aug(x, torch.Generator().manual_seed(9))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(9)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(10)))


def test_normalization_standardizes_the_training_set():
    ds = load_dataset("synthetic", image_shape=(3, 6, 6), train_size=200, test_size=10)
    z = normalize(ds.train_x, ds.mean, ds.std).double()
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (z.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-5
    only_normalize = Augment(crop_padding=0, flip=False, mean=ds.mean, std=ds.std)
    assert torch.equal(only_normalize(ds.train_x, None), normalize(ds.train_x, ds.mean, ds.std))


def test_augment_bad_inputs():
    with pytest.raises(ConfigError, match=r"invalid crop_padding: -1"):
        Augment(crop_padding=-1)
    with pytest.raises(ConfigError, match="both given or both None"):
        Augment(mean=(0.5,))
    with pytest.raises(ConfigError, match=r"invalid std: \(0.0,\) \(must be values > 0\)"):
        Augment(mean=(0.5,), std=(0.0,))
    with pytest.raises(ConfigError, match="invalid generator: None"):
        Augment()(_batch(), None)
    with pytest.raises(ConfigError, match="one value per channel"):
        normalize(_batch(c=3), (0.5,), (0.2,))


# ---------------------------------------------------------------------------------------------------------------
# sampler


def test_minibatch_indices_are_a_pure_function_of_the_key():
    idx = minibatch_indices(1000, 64, seed=1, worker=2, index=3, step=4)
    assert idx.dtype == torch.int64 and idx.shape == (64,)
    assert int(idx.min()) >= 0 and int(idx.max()) < 1000
    assert torch.equal(idx, minibatch_indices(1000, 64, seed=1, worker=2, index=3, step=4))
    g = minibatch_generator(1, 2, 3, 4, INDICES_STREAM)  # the documented construction
    assert torch.equal(idx, torch.randint(0, 1000, (64,), generator=g))


def test_different_keys_and_streams_draw_differently():
    key = dict(seed=1, worker=2, index=3, step=4)
    base = minibatch_indices(10**6, 32, **key)
    for field in key:
        other = minibatch_indices(10**6, 32, **{**key, field: key[field] + 1})
        assert not torch.equal(base, other), field
    aug = torch.randint(0, 10**6, (32,), generator=minibatch_generator(1, 2, 3, 4, AUGMENT_STREAM))
    assert not torch.equal(base, aug)
    # Over many keys the draws look uniform: each tenth of [0, 1000) gets about a tenth of 12,800 draws.
    draws = torch.cat([minibatch_indices(1000, 64, seed=0, worker=w, index=t, step=0)
                       for w in range(4) for t in range(50)])
    counts = torch.bincount(draws // 100, minlength=10)
    assert int(counts.min()) > 1130 and int(counts.max()) < 1430  # ±4.5 binomial standard deviations


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_examples=0, batch_size=4), r"invalid num_examples: 0 \(must be an integer >= 1\)"),
        (dict(num_examples=10, batch_size=0), r"invalid batch_size: 0"),
        (dict(num_examples=10, batch_size=4, worker=-1), r"invalid worker: -1"),
    ],
)
def test_sampler_bad_inputs(kwargs, message):
    key = {"seed": 0, "worker": 0, "index": 0, "step": 0}
    with pytest.raises(ConfigError, match=message):
        minibatch_indices(**{**key, **kwargs})



def test_digits_are_read_without_importing_scikit_learn_and_equal_its_loader():
    """Issue 10: scikit-learn's import costs ~0.8 s a run; its table is read directly, with the same values."""
    import subprocess
    import sys

    code = ("import sys; from ormo.data import load_dataset; ds = load_dataset('digits'); "
            "print(int(ds.train_y.numel() + ds.test_y.numel()), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1797", "False"]
    from sklearn.datasets import load_digits

    from ormo.data.digits import _read_digits

    images, target = _read_digits()
    raw = load_digits()
    assert np.array_equal(images, raw.images.astype(np.float32)) and np.array_equal(target, raw.target)
