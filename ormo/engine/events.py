"""The event log: one record per server iteration, shared by every engine, written to disk as JSON Lines.

File format (``.jsonl``, or ``.jsonl.gz`` compressed): the first line is a header
``{"format": "ormo.events", "version": 1, "meta": {...}}``; every further line is one event with the fields of
:data:`EVENT_FIELDS`. Floats are written with Python's shortest round-trip repr, so a log read back replays the
exact same simulated times.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, overload

import numpy as np

FORMAT = "ormo.events"
VERSION = 1
EVENT_FIELDS: tuple[str, ...] = ("t", "worker", "index", "delay", "sim_time", "dispatch_time")


class EventLogError(ValueError):
    """A log file that cannot be read: names the file, the line and what is wrong."""


@dataclass(frozen=True, slots=True)
class Event:
    """Server iteration ``t`` consumed the message of ``worker`` computed from parameter ``index``.

    ``delay = t − index``; ``sim_time`` is when the message arrived (and was consumed; the server is instantaneous
    in the simulator), ``dispatch_time`` when the worker had received that parameter. Times are in seconds of the
    simulated (or, for a real run, measured) clock. Fields are readable as attributes or as ``event["delay"]``.
    """

    t: int
    worker: int
    index: int
    delay: int
    sim_time: float
    dispatch_time: float

    def __getitem__(self, key: str) -> Any:
        if key not in EVENT_FIELDS:
            raise KeyError(f"{key!r}; event fields: {', '.join(EVENT_FIELDS)}")
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class EventLog(Sequence[Event]):
    """Columnar log of :class:`Event` records with run metadata (``meta``: rule, scheduler, num_workers, …)."""

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self.meta: dict[str, Any] = dict(meta or {})
        self._cols: dict[str, list] = {name: [] for name in EVENT_FIELDS}

    def append(self, *, t: int, worker: int, index: int, sim_time: float, dispatch_time: float) -> Event:
        cols = self._cols
        cols["t"].append(t)
        cols["worker"].append(worker)
        cols["index"].append(index)
        cols["delay"].append(t - index)
        cols["sim_time"].append(sim_time)
        cols["dispatch_time"].append(dispatch_time)
        return Event(t, worker, index, t - index, sim_time, dispatch_time)

    def __len__(self) -> int:
        return len(self._cols["t"])

    @overload
    def __getitem__(self, i: int) -> Event: ...
    @overload
    def __getitem__(self, i: slice) -> list[Event]: ...
    def __getitem__(self, i: int | slice) -> Event | list[Event]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Event(*(self._cols[name][i] for name in EVENT_FIELDS))

    def __iter__(self) -> Iterator[Event]:
        return (Event(*row) for row in zip(*(self._cols[n] for n in EVENT_FIELDS), strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EventLog) and self._cols == other._cols

    def __repr__(self) -> str:
        return f"EventLog({len(self)} events, meta={self.meta})"

    def column(self, name: str) -> np.ndarray:
        """One field for every event, as a numpy array (int64 or float64)."""
        if name not in EVENT_FIELDS:
            raise KeyError(f"{name!r}; event fields: {', '.join(EVENT_FIELDS)}")
        dtype = np.float64 if name in ("sim_time", "dispatch_time") else np.int64
        return np.asarray(self._cols[name], dtype=dtype)

    @property
    def workers(self) -> list[int]:
        """The arrival order: the worker consumed at each iteration."""
        return list(self._cols["worker"])

    def state_dict(self) -> dict[str, Any]:
        """The columns as numpy arrays (compact in a checkpoint) and the metadata."""
        return {"meta": dict(self.meta), "columns": {name: self.column(name) for name in EVENT_FIELDS}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.meta = dict(sd["meta"])
        self._cols = {name: np.asarray(sd["columns"][name]).tolist() for name in EVENT_FIELDS}

    def check_workers(self, num_workers: int, *, source: str | Path) -> None:
        """Check that every event and re-dispatch (``meta["redispatches"]``: ``[t, worker, index, ...]``) names a
        worker in ``[0, num_workers)`` and a valid iteration, as read from file ``source`` (line = event t + 2)."""
        for t, worker in enumerate(self._cols["worker"]):
            if not 0 <= worker < num_workers:
                raise EventLogError(f"{source}:{t + 2}: worker={worker} is out of range: the run has train.num_workers"
                                    f" = {num_workers} (workers 0 to {num_workers - 1})")
        redispatches = self.meta.get("redispatches", [])
        if not isinstance(redispatches, list):
            raise EventLogError(f"{source}:1: meta.redispatches = {redispatches!r} must be a list of [t, worker, "
                                f"index, ...] entries")
        for i, entry in enumerate(redispatches):
            where = f"{source}:1: meta.redispatches[{i}] = {entry!r}"
            if not isinstance(entry, list) or len(entry) < 3 or \
                    not all(isinstance(x, int) and not isinstance(x, bool) for x in entry[:3]):
                raise EventLogError(f"{where} must be a list starting with three integers [t, worker, index]")
            t, worker, index = entry[:3]
            if not 0 <= worker < num_workers:
                raise EventLogError(f"{where}: worker={worker} must be in [0, {num_workers - 1}] "
                                    f"(train.num_workers = {num_workers})")
            if not 0 <= index <= t <= len(self):
                raise EventLogError(f"{where}: needs 0 <= index <= t <= {len(self)} (the number of events)")

    # -- disk ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the log (gzip-compressed when the name ends in ``.gz``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(tmp, "wt", encoding="utf-8") as f:  # type: ignore[operator]
                f.write(json.dumps({"format": FORMAT, "version": VERSION, "meta": _jsonable(self.meta)}) + "\n")
                for row in zip(*(self._cols[n] for n in EVENT_FIELDS), strict=True):
                    f.write(json.dumps(dict(zip(EVENT_FIELDS, row, strict=True))) + "\n")
            tmp.replace(path)  # atomic: a crash mid-write never leaves a truncated log under the real name
        except BaseException:
            with contextlib.suppress(OSError):  # a failed write (a full disk) leaves nothing behind
                tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> EventLog:
        """Read a log written by :meth:`save`, checking every line."""
        path = Path(path)
        if not path.is_file():
            raise EventLogError(f"event log {str(path)!r} does not exist")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
                lines = f.read().splitlines()
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:  # binary garbage, a gzip file cut short
            raise EventLogError(f"{path}: not a readable event log ({type(e).__name__}: {e}); restore the log the run "
                                f"wrote") from None
        if not lines:
            raise EventLogError(f"{path}: empty file, expected a header line {{'format': {FORMAT!r}, ...}}")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting too deep to parse
            raise EventLogError(f"{path}:1: header is not JSON ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise EventLogError(f"{path}:1: not an ormo event log (header format must be {FORMAT!r})")
        if header.get("version") != VERSION:
            raise EventLogError(f"{path}:1: unsupported version {header.get('version')!r} (expected {VERSION})")
        meta = header.get("meta") or {}
        if not isinstance(meta, dict):
            raise EventLogError(f"{path}:1: header meta = {json.dumps(meta)[:200]} must be an object of run metadata "
                                f"(rule, num_workers, ...); restore the log the run wrote")
        log = cls(meta)
        for lineno, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
                t, worker, index = (_exact_int(rec[k], k) for k in ("t", "worker", "index"))
                sim_time, dispatch_time = (_time(rec[k], k) for k in ("sim_time", "dispatch_time"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
                raise EventLogError(f"{path}:{lineno}: bad event record ({e!r}): {line[:200]}") from None
            if worker < 0:
                raise EventLogError(f"{path}:{lineno}: worker={worker} must be >= 0")
            if len(log) and sim_time < log._cols["sim_time"][-1]:
                raise EventLogError(f"{path}:{lineno}: sim_time={sim_time} goes back in time (events are in order)")
            if dispatch_time > sim_time:
                raise EventLogError(f"{path}:{lineno}: dispatch_time={dispatch_time} is after sim_time={sim_time}")
            if t != len(log):
                raise EventLogError(f"{path}:{lineno}: event t={t}, expected t={len(log)} (events must be consecutive)")
            if not 0 <= index <= t:
                raise EventLogError(f"{path}:{lineno}: index={index} must be in [0, t={t}]")
            if "delay" in rec and rec["delay"] != t - index:
                raise EventLogError(f"{path}:{lineno}: delay={rec['delay']} but t - index = {t - index}")
            log.append(t=t, worker=worker, index=index, sim_time=sim_time, dispatch_time=dispatch_time)
        return log


def _exact_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")
    return value


def _time(value: Any, name: str) -> float:
    """A recorded time: a finite number of seconds >= 0 (a NaN would pass every ordering check unnoticed)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number of seconds >= 0")
    return float(value)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)
