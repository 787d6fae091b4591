"""Run-directory I/O in one place: atomic writes, run.json, checkpoints (safe to load, fingerprinted) and the run lock.

Every file a run writes goes through :func:`write_bytes`: written to ``NAME.tmp`` and renamed over ``NAME``, so a kill
or a full disk never leaves a torn file under the real name, and the ``.tmp`` is removed when the write fails.

Checkpoints are plain data (tensors, numbers, strings, lists, dicts) so that they load with
``torch.load(weights_only=True)``: a checkpoint is data, never code, even when it was copied from elsewhere. Each one
records the config it was made with (its TOML text and sha256) and :data:`CODE_VERSION`, and resuming checks both.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
FINAL = "final.pt"
LOCK = ".lock"
#: 2: plain data only (loads with weights_only=True), with the config fingerprint and CODE_VERSION
CHECKPOINT_VERSION = 2
#: Bump "rules" when a rule's update arithmetic changes, "engine" when the simulator's or the training problem's
#: does (data order, timing draws, BatchNorm handling): a checkpoint of older numerics cannot continue bit-identically.
CODE_VERSION: dict[str, int] = {"rules": 1, "engine": 1}


class RunDirError(RuntimeError):
    """A run directory or one of its files cannot be used. The message names the file, what is wrong and the fix."""


class CheckpointRefused(RunDirError):
    """A checkpoint that cannot continue this run (damaged, of another config, code or engine). Nothing was run, so
    the run's recorded status stays as it was."""


# -- file-system errors ---------------------------------------------------------------------------------------------
_FIXES = {
    errno.ENOSPC: "free some space on that disk (or choose another folder)",
    errno.EDQUOT: "free some space within your quota (or choose another folder)",
    errno.EFBIG: "raise the file-size limit (`ulimit -f`) or choose a folder on a file system that allows larger files",
    errno.EACCES: "choose a folder you can write to (or fix its permissions)",
    errno.EPERM: "choose a folder you can write to (or fix its permissions)",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another folder",
    errno.EEXIST: "a file of that name is in the way: choose another folder",
    errno.EISDIR: "a folder of that name is in the way: remove it or choose another folder",
}


def explain_os_error(e: OSError, path: str | Path | None = None) -> str:
    """One line for a failed file operation: the file, what went wrong and what to do."""
    where = path if path is not None else (e.filename if e.filename is not None else "?")
    what = e.strerror or str(e)
    fix = _FIXES.get(e.errno or 0)
    return f"{where}: {what}" + (f"; {fix}" if fix else "")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``path.tmp`` renamed over it); the ``.tmp`` never outlives a failure."""
    write_with(path, lambda f: f.write(data))


def write_with(path: str | Path, writer: Callable[[Any], Any]) -> None:
    """``writer(f)`` writes ``path`` through the binary file ``f``, atomically as :func:`write_bytes` (streamed:
    nothing is held in memory on the way)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer(f)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        # what is in the way may be the temporary file's name (a folder left there), not the file's own
        blocked = e.errno in (errno.EISDIR, errno.EEXIST) and e.filename2 is None and e.filename == str(tmp)
        raise RunDirError(explain_os_error(e, tmp if blocked else path)) from e
    except BaseException as e:
        _remove(tmp)
        # torch's zip writer reports a failed write as its own RuntimeError (a signal stays a signal)
        cause = _os_error_behind(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise RunDirError(explain_os_error(cause, path)) from e
        raise


def _os_error_behind(e: BaseException) -> OSError | None:
    """The OSError an exception was raised while handling (or was caused by), if any."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        if isinstance(x, OSError):
            return x
        seen.add(id(x))
        x = x.__cause__ or x.__context__
    return None


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Atomic ``json.dumps(data, indent=2)``; objects JSON cannot hold are written as their ``str``."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # best effort: the write failed already, report that error
        pass


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``run_dir/run.json`` as a dict."""
    path = Path(run_dir) / "run.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunDirError(explain_os_error(e, path)) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{path}: not valid JSON ({e}); restore it, or delete the run directory to start over"
        raise RunDirError(msg) from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents), with one-line errors for a file in the way, no permission, no space."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file, not a folder: choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {run_dir}: {explain_os_error(e)}") from e


# -- the run lock ---------------------------------------------------------------------------------------------------
class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``, held for the whole run.

    The kernel releases the lock when the holder's process dies, however it dies, so a lock is never stale: a run
    directory whose run.json says ``running`` while its lock is free was killed (``--resume`` continues it). The file
    holds the holder's pid and command line, for the error a second process gets. It is never deleted (deleting a
    lock file races with a process that has just opened it)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot lock the run directory: {explain_os_error(e, self.path)}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"cannot lock the run directory: {explain_os_error(e, self.path)}") from e
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another ormo process ({holder}); wait for it to "
                f"finish, or stop it first"
            ) from None
        try:  # who holds it: read by the next process that tries (best effort: a full disk must not stop the run)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "command": sys.argv}).encode())
        except OSError:
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
        return f"pid {holder['pid']}: {' '.join(map(str, holder.get('command') or []))}".strip().rstrip(":")
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process holds ``run_dir``'s run lock (i.e. the run is being written right now)."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# -- checkpoints ----------------------------------------------------------------------------------------------------
def plain(obj: Any) -> Any:
    """``obj`` as data ``torch.load(weights_only=True)`` accepts: numpy arrays become tensors (the consumers read
    them back with ``np.asarray``, exactly), numpy scalars Python numbers; anything else unknown its ``repr``."""
    if isinstance(obj, torch.Tensor | str | int | float | bool) or obj is None:
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))  # a copy: later writes to the array must not change the checkpoint
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return repr(obj)


def config_stamp(config_toml: str) -> dict[str, Any]:
    """What a checkpoint records about the config and code that made it."""
    return {"config_sha256": hashlib.sha256(config_toml.encode("utf-8")).hexdigest(), "config": config_toml,
            "code_version": dict(CODE_VERSION)}


def save_checkpoint(path: str | Path, state: dict[str, Any], *, config_toml: str) -> None:
    """Write ``state`` (made plain) with the version, the config stamp and the code version, atomically."""
    ckpt = {"version": CHECKPOINT_VERSION, **config_stamp(config_toml), **plain(state)}
    # streamed to the file: no serialized copy in memory (the checkpoint costs no more than its state); a disk
    # error comes out of torch.save as the OSError of the write
    write_with(path, lambda f: torch.save(ckpt, f))


def safe_load(path: str | Path, *, fix: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, so a crafted file cannot run code. Any
    failure (missing, empty, truncated, corrupt, not plain data) is one line naming the file and ``fix``."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RunDirError(f"{explain_os_error(e, path)}; {fix}") from e
    if size == 0:
        raise RunDirError(f"{path} is empty (a write was cut short); {fix}")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as e:
        raise RunDirError(f"{explain_os_error(e, path)}; {fix}") from e
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types; all mean "not a usable file"
        # torch names the refused class ("Unsupported global: GLOBAL posix.system") only for a well-formed file
        # holding objects; garbage, a truncated file or a bare pickle fail earlier, on the format itself
        reason = "it holds objects other than tensors and plain data (refused: loading it could run code)" \
            if "global" in str(e).lower() else "corrupt, truncated, or not a checkpoint written by ormo"
        raise RunDirError(f"{path} cannot be loaded: {reason}; {fix}") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path} holds a {type(obj).__name__}, not an ormo checkpoint dict; {fix}")
    return obj


def load_checkpoint(run_dir: str | Path, *, config_toml: str, engine: str) -> dict[str, Any]:
    """The checkpoint of ``run_dir``, after checking that it was made by this config, this code and ``engine``."""
    try:
        return _load_checkpoint(run_dir, config_toml=config_toml, engine=engine)
    except CheckpointRefused:
        raise
    except RunDirError as e:
        raise CheckpointRefused(str(e)) from None


def _load_checkpoint(run_dir: str | Path, *, config_toml: str, engine: str) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    fix = f"delete {CHECKPOINT} to restart the run from scratch"
    ckpt = safe_load(path, fix=fix)
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise RunDirError(f"{path} has checkpoint version {ckpt.get('version')!r}, this ormo reads version "
                          f"{CHECKPOINT_VERSION}; {fix}")
    if ckpt.get("engine", "simulator") != engine:
        raise RunDirError(f"{path} is a checkpoint of a {ckpt.get('engine', 'simulator')} run, but this run uses the "
                          f"{engine} engine; {fix}")
    if ckpt.get("code_version") != CODE_VERSION:
        raise RunDirError(f"{path} was made by ormo code version {_kv(ckpt.get('code_version'))}, this ormo is "
                          f"{_kv(CODE_VERSION)} (its numerics changed, so the run cannot continue bit-identically); "
                          f"{fix}, or continue it with the ormo version that made it")
    if ckpt.get("config_sha256") != config_stamp(config_toml)["config_sha256"]:
        made_by, says = config_diff(str(ckpt.get("config", "")), config_toml, ignore=WHERE_IT_RUNS)
        if made_by or says:
            raise RunDirError(f"{path} was made by {made_by} but config.toml says {says}: restore config.toml, or "
                              f"{fix}")
    return ckpt


def _kv(d: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) if isinstance(d, dict) else repr(d)


#: settings that say where a run runs, not what it computes: a checkpoint continues under other values of them
WHERE_IT_RUNS = frozenset({"ray.address"})


def config_diff(old_toml: str, new_toml: str, *, ignore: frozenset[str] = frozenset()) -> tuple[str, str]:
    """The settings that differ between two config TOMLs, e.g. ``("method.lr = 0.1", "method.lr = 0.2")``; empty
    strings when they hold the same values (written differently), or differ only in ``ignore``."""
    old, new = _flat_toml(old_toml), _flat_toml(new_toml)
    if "(config)" in old or "(config)" in new:  # not TOML (or not text): no setting-by-setting list
        return ("a config that is not valid TOML" if "(config)" in old else "a valid config",
                "a config that is not valid TOML" if "(config)" in new else "a valid config")
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, _UNSET) != new.get(k, _UNSET)
                  and k not in ignore)
    more = f" and {len(keys) - _DIFF_SHOWN} more settings" if len(keys) > _DIFF_SHOWN else ""
    keys = keys[:_DIFF_SHOWN]
    return (", ".join(f"{k} = {_show(old.get(k, _UNSET))}" for k in keys) + more,
            ", ".join(f"{k} = {_show(new.get(k, _UNSET))}" for k in keys) + more)


#: the differing settings a refusal names (the rest are counted)
_DIFF_SHOWN = 6


_UNSET = object()


def _flat_toml(text: str) -> dict[str, Any]:
    """The settings of a config TOML, with every default filled in when it reads as a config: a run written before a
    setting existed (absent from its TOML) holds that setting's default, which is what it ran with."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, TypeError, AttributeError):  # not TOML, or not even text
        return {"(config)": "unreadable"}
    from .config import from_dict, to_toml  # here: the config module does not import this one's callers

    try:
        data = tomllib.loads(to_toml(from_dict(data)))
    except Exception:  # noqa: BLE001 - not a valid config (edited by hand): compared as written
        pass
    return flatten(data)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}`` (tables recursively, e.g. ``method.options.delay_rule``)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _show(v: Any) -> str:
    if v is _UNSET:
        return "(unset)"
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v) if isinstance(v, str) else str(v)
