"""Checksums and downloads of dataset archives.

A download streams into a temporary file beside its destination while hashing it, checks the MD5, and only then
renames it into place (atomic on one file system), so an interrupted or corrupt download never leaves a file that
looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .base import DatasetError

_CHUNK_BYTES = 1 << 20


def md5_of(path: Path) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def verify_md5(path: Path, expected: str, *, url: str) -> None:
    """Raise :class:`~ormo.data.DatasetError` unless ``path`` has MD5 ``expected``."""
    try:
        actual = md5_of(path)
    except OSError as e:  # e.g. no read permission: the file may be whole, so not "download it again"
        raise DatasetError(f"could not read {path} ({type(e).__name__}: {e.strerror or e}); give this user read "
                           f"access to it (e.g. chmod a+r {path}), or point data.data_dir at a readable copy") from e
    if actual != expected:
        raise DatasetError(
            f"checksum mismatch for {path}: md5 {actual}, expected {expected} (a truncated or corrupt download?); "
            f"delete it and download {url} again into {path.parent}, or pass download=True"
        )


def download(url: str, dest: Path, *, md5: str, timeout_s: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` (parent folders created), verifying ``md5`` before the final rename.

    Network errors and a checksum mismatch raise :class:`~ormo.data.DatasetError`; the partial file is removed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:
                    while chunk := response.read(_CHUNK_BYTES):
                        h.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                raise DatasetError(
                    f"could not download {url}: {reason}; check the network, or fetch the file by hand and put it "
                    f"at {dest}"
                ) from e
        if h.hexdigest() != md5:
            raise DatasetError(
                f"downloaded {url} has md5 {h.hexdigest()}, expected {md5} (an incomplete transfer or a changed "
                f"file); try again, or fetch it by hand and put it at {dest}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
