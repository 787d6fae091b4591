"""The Ray runtime: real worker processes feed one rule through a parameter-server actor.

* The **server actor** owns the rule state and applies messages one at a time. It is an asyncio actor: an update runs
  without an ``await`` from validation to scheduling, so updates are serialized and ordered exactly as they arrive,
  while synchronous rounds can wait (``await``) for their last message. No task is retried.
* Each **worker actor** runs a loop: compute its message on the parameters it was sent (``rule.work``, one gradient or
  H local steps on its own data stream), sleep for the timing model's duration (emulating a slower machine), and
  call the server *directly* with the message and the parameter index it used; the reply is its next payload. Arrays
  travel as numpy (zero-copy and read-only on the receiving side); nothing passes through the driver.
* The **driver** starts the actors, restarts a worker whose process dies (its in-flight message is simply never
  applied; the restarted worker is sent fresh parameters), evaluates the server's snapshots, and stops the run.

Everything the server does is recorded in the simulator's event-log format, plus the re-dispatches (restarts and
rejected messages), so ``ormo replay`` can rerun the same arrival order in the simulator. A message that is malformed,
from an unknown or dead worker, carries an index from the future or another index than the one its worker was sent, or
holds NaN/Inf values is rejected with a logged reason and never touches the parameters.

Only this module imports Ray; the rules and the simulator never do.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import ConfigError
from ..rules.base import Message, Payload, Rule, set_rate_factor
from .events import EventLog
from .simulator import all_finite

# Arrays that arrive through the object store are read-only; the rules only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

#: a rejected synchronous-round message is re-sent the same round; after this many rejections the run stops.
MAX_ROUND_REJECTIONS = 3
#: A local instance passes arrays up to this size inline in the call (Ray's default is 100 KB): measured here, a 200 KB
#: round trip takes 1.4 ms inline and 2.8 ms through the object store, and from 1 MB the two cost the same. Larger
#: arrays still move through the object store, zero-copy on arrival. A cluster keeps its own setting.
INLINE_MAX_BYTES = 512 * 1024

_WAIT = object()  # _apply's answer for a synchronous round that is not complete yet

#: a worker whose messages are rejected this many times in a row stops the run (it cannot contribute)
MAX_REJECTION_STREAK = 25


def _tensor(a: Any) -> torch.Tensor:
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


@ray.remote
class ParameterServer:
    """The single-threaded parameter server (see the module docstring)."""

    def __init__(
        self,
        rule: Rule,
        params0: np.ndarray,
        *,
        num_workers: int,
        scheduler: str,
        total: int,
        schedule: Callable[[int], float] | None,
        meta: dict[str, Any],
        eval_marks: list[int],
        checkpoint_marks: list[int],
        checkpoint_path: str | None,
        sync_timeout_s: float,
        checkpoint_config: str = "",
        buffers_size: int,
        loss_window: int,
        resume: dict[str, Any] | None = None,
    ) -> None:
        self.rule, self.K, self.scheduler, self.total = rule, num_workers, scheduler, total
        self.schedule, self.sync_timeout_s = schedule, sync_timeout_s
        self.state = rule.init(torch.from_numpy(np.array(params0)), num_workers=num_workers)
        self.dtype = self.state.params.dtype
        self.events = EventLog(meta)
        self.eval_marks, self.checkpoint_marks = set(eval_marks), set(checkpoint_marks)
        self.checkpoint_path, self.checkpoint_config = checkpoint_path, checkpoint_config
        self.t = 0
        self.time_offset, self.clock0 = 0.0, time.monotonic()
        self.sent: list[int | None] = [None] * num_workers  # index each worker was last sent (None: never)
        self.incarnation = [0] * num_workers
        self.dispatch_time = [0.0] * num_workers
        self.waiting: list[tuple[int, float]] = []  # sync: C, with arrival times
        self.idle = [0.0] * num_workers
        self.round_event = asyncio.Event()
        self.round_reply: dict[str, Any] | None = None
        self.round_rejections: dict[int, int] = {}
        self.buffers = np.zeros(buffers_size, dtype=np.float32)
        self.losses = np.full(loss_window, np.nan)
        self.redispatches: list[list[Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.snapshots: list[dict[str, Any]] = []
        # the snapshots the driver has not yet said it wrote as metrics rows: checkpoints hold them, so a driver
        # killed before writing them (they are handed over once) finds them there when the run resumes
        self.unwritten: list[dict[str, Any]] = []
        self.last_eval = 0
        self.failed: str | None = None
        self.halted = False  # a stop was requested: no message is applied any more
        self.checkpoint_due = False
        self.rejection_streak = [0] * num_workers
        self.busy_s = 0.0  # time spent handling messages (validation, update, reply), for benchmarks
        self.work_s = 0.0  # the workers' reported compute + emulated sleep of the applied messages
        self.first_applied_s: float | None = None
        if schedule is not None:
            set_rate_factor(rule, self.state, schedule(0))
        if resume is not None:
            self._load(resume)
        self.round_reply = self._reply(self.t)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.time_offset + time.monotonic() - self.clock0

    def _reply(self, index: int) -> dict[str, Any]:
        """The payload for ``index`` (a copy of the state: it must not change while it travels)."""
        p = self.rule.payload(self.state, index=index)
        return {
            "index": index,
            "params": p.params.numpy().copy(),
            "momentum": None if p.momentum is None else p.momentum.numpy().copy(),
            "lr_scale": p.lr_scale,
        }

    def _stop(self, why: str) -> dict[str, Any]:
        return {"stop": why}

    def _redispatch(self, worker: int, index: int, reason: str) -> None:
        self.redispatches.append([self.t, worker, index, reason])
        self.sent[worker] = index
        self.dispatch_time[worker] = self._now()

    def _reject(self, worker: Any, index: Any, reason: str, *, live: bool = True) -> dict[str, Any]:
        """Log the rejection. A live worker is sent fresh work (and told, so that it resets its own state, as the
        replay does); an unknown worker or a dead incarnation is told to stop and changes nothing."""
        self.rejections.append({"t": self.t, "worker": worker, "index": index, "reason": reason,
                                "time": self._now()})
        if not live or self.t >= self.total:
            return self._stop(f"rejected: {reason}")
        self.rejection_streak[worker] += 1
        if self.rejection_streak[worker] > MAX_REJECTION_STREAK:
            self.failed = (f"worker {worker}'s last {self.rejection_streak[worker]} messages were all rejected "
                           f"(last: {reason}); stopping the run")
            self.round_event.set()
            return self._stop(self.failed)
        if self.scheduler == "async":
            self._redispatch(worker, self.t, f"rejected: {reason}")
            return {**self._reply(self.t), "rejected": reason}
        # sync: the worker redoes its message for the current round
        n = self.round_rejections[worker] = self.round_rejections.get(worker, 0) + 1
        if n > MAX_ROUND_REJECTIONS:
            self.failed = (f"worker {worker}'s message for the round at index {self.round_reply['index']} was rejected "
                           f"{n} times (last: {reason}); a synchronous round cannot complete without it")
            self.round_event.set()
            return self._stop(self.failed)
        self._redispatch(worker, self.round_reply["index"], f"rejected: {reason}")
        return {**self.round_reply, "rejected": reason}

    def _identify(self, worker: Any, incarnation: Any) -> str | None:
        """Who sent it: an unknown worker, or a dead incarnation of a known one, is not answered with work."""
        if not isinstance(worker, int) or isinstance(worker, bool) or not 0 <= worker < self.K:
            return f"unknown worker {worker!r} (workers are 0..{self.K - 1})"
        if incarnation != self.incarnation[worker]:
            return f"stale message from incarnation {incarnation!r} of worker {worker} (now {self.incarnation[worker]})"
        return None

    def _validate(self, worker: int, index: Any, msg: Any) -> str | None:
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            return f"malformed index {index!r}"
        if index > self.t:
            return f"index {index} is from the future (the server is at iteration {self.t})"
        if index != self.sent[worker]:
            return f"index {index} is not the one worker {worker} was sent ({self.sent[worker]})"
        if self.scheduler == "sync" and any(w == worker for w, _ in self.waiting):
            return f"worker {worker} already sent its message for this round"
        if not isinstance(msg, dict):
            return f"malformed message of type {type(msg).__name__}"
        n = self.state.params.numel()
        wanted = ["update", "buffers"] + (["momentum"] if self.rule.message_has_momentum else [])
        for key in wanted:
            a = msg.get(key)
            size = self.buffers.size if key == "buffers" else n
            if not isinstance(a, np.ndarray) or a.shape != (size,) or a.dtype != np.dtype(str(self.dtype)[6:]):
                got = f"{type(a).__name__} {getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}".strip()
                return f"malformed {key}: got {got}, expected a {str(self.dtype)[6:]} array of shape ({size},)"
            if not all_finite(torch.from_numpy(a)):
                return f"NaN/Inf values in the {key}"
        loss = msg.get("loss")
        if not isinstance(loss, float) or not math.isfinite(loss):
            return f"malformed or non-finite loss {loss!r}"
        scale = msg.get("local_lr_scale", 1.0)
        if not isinstance(scale, float) or not (0.0 <= scale < math.inf):
            return f"malformed local_lr_scale {scale!r}"
        return None

    # -- the protocol -------------------------------------------------------------------------------------------
    async def hello(self, worker: int, incarnation: int) -> dict[str, Any]:
        """A worker (re)starts: it is sent its work. A worker that had been sent something before has lost it."""
        if not isinstance(worker, int) or not 0 <= worker < self.K:
            return self._stop(f"unknown worker {worker!r}")
        if incarnation < self.incarnation[worker]:
            return self._stop("stale incarnation")
        self.incarnation[worker] = incarnation
        if self.failed or self.t >= self.total:
            return self._stop(self.failed or "done")
        if self.scheduler == "async":
            if self.sent[worker] is None and self.t == 0:
                self.sent[worker] = 0  # the initial broadcast of w_0
                return self.round_reply
            # a restarted worker, or one that joins after the run started: the current parameters
            self._redispatch(worker, self.t, "restarted" if self.sent[worker] is not None else "joined late")
            return self._reply(self.t)
        if any(w == worker for w, _ in self.waiting):  # its message is in: it waits for the round like the others
            self._redispatch(worker, self.round_reply["index"], "restarted")  # a new process: fresh worker state
            return await self._await_round()
        if self.sent[worker] is None and self.round_reply["index"] == 0:
            self.sent[worker] = 0
        else:
            self._redispatch(worker, self.round_reply["index"],
                             "restarted" if self.sent[worker] is not None else "joined late")
        return self.round_reply

    async def _await_round(self) -> dict[str, Any]:
        event = self.round_event
        try:
            await asyncio.wait_for(event.wait(), timeout=self.sync_timeout_s)
        except TimeoutError:
            if event.is_set():  # completed on the same tick
                return self.round_reply if self.t < self.total else self._stop("done")
            missing = sorted(set(range(self.K)) - {w for w, _ in self.waiting})
            self.failed = self.failed or (
                f"the synchronous round at index {self.round_reply['index']} did not complete within "
                f"ray.sync_timeout_s={self.sync_timeout_s} s: no message from worker(s) {missing}"
            )
            event.set()  # the other waiting workers stop now rather than each after its own timeout
            return self._stop(self.failed)
        if self.failed:
            return self._stop(self.failed)
        return self.round_reply if self.t < self.total else self._stop("done")

    async def push(self, worker: int, incarnation: int, index: int, msg: dict[str, Any]) -> dict[str, Any]:
        """Consume one message (server iteration t) and reply with the worker's next payload (or stop)."""
        if self.failed:
            return self._stop(self.failed)
        if self.halted:
            return self._stop("halted")
        if self.t >= self.total:
            return self._stop("done")
        busy0 = time.perf_counter()
        reply = self._apply(worker, incarnation, index, msg)  # no await inside: updates are serialized
        self.busy_s += time.perf_counter() - busy0
        return await self._await_round() if reply is _WAIT else reply

    def _apply(self, worker: int, incarnation: int, index: int, msg: dict[str, Any]) -> dict[str, Any] | object:
        reason = self._identify(worker, incarnation)
        if reason is not None:
            return self._reject(worker, index, reason, live=False)
        reason = self._validate(worker, index, msg)
        if reason is not None:
            return self._reject(worker, index, reason)
        now, t, rule, state = self._now(), self.t, self.rule, self.state
        message = Message(index=index, update=_tensor(msg["update"]), momentum=_tensor(msg.get("momentum")),
                          local_lr_scale=msg.get("local_lr_scale", 1.0))
        if self.schedule is not None:
            set_rate_factor(rule, state, self.schedule(t))
        rule.begin_iteration(state, t=t, waiting_empty=not self.waiting)
        rule.apply(state, message, t=t, worker=worker)
        self.rejection_streak[worker] = 0
        if not all_finite(state.params):
            self.failed = (f"diverged: the server parameters became NaN/Inf at iteration t={t}, after applying the "
                           f"message of worker {worker} (index {index}, delay {t - index})")
            self.round_event.set()
            return self._stop(self.failed)
        self.events.append(t=t, worker=worker, index=index, sim_time=now, dispatch_time=self.dispatch_time[worker])
        if self.first_applied_s is None:  # since start(): how long the first message of this process took
            self.first_applied_s = time.monotonic() - self.clock0
        self.buffers = msg["buffers"]  # the server keeps the latest BatchNorm statistics it consumed (A14)
        for key in ("compute_s", "sleep_s"):  # diagnostics only
            v = msg.get(key)
            if isinstance(v, float) and math.isfinite(v) and v >= 0:
                self.work_s += v
        self.losses[t % self.losses.size] = msg["loss"]
        self.t = t + 1
        self.waiting.append((worker, now))
        if self.t in self.eval_marks:
            self._snapshot()
        if self.t in self.checkpoint_marks:
            self.checkpoint_due = True

        if self.scheduler == "async":
            self.waiting.clear()
            self._maybe_checkpoint()
            if self.t >= self.total:
                return self._stop("done")
            self.sent[worker] = self.t
            self.dispatch_time[worker] = now
            return self._reply(self.t)
        if len(self.waiting) == self.K or self.t >= self.total:
            for w, arrived in self.waiting:
                self.idle[w] += now - arrived
            self.waiting.clear()
            self.round_rejections.clear()
            self.round_reply = self._reply(self.t)
            for w in range(self.K):
                self.sent[w] = self.t
                self.dispatch_time[w] = now
            self._maybe_checkpoint()  # only at round boundaries: a resumed round starts clean
            event, self.round_event = self.round_event, asyncio.Event()
            event.set()
            return self.round_reply if self.t < self.total else self._stop("done")
        return _WAIT

    # -- driver side ----------------------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        delays = self.events.column("delay")[self.last_eval : self.t]
        filled = self.losses[~np.isnan(self.losses)]
        self.snapshots.append(snap := {
            "t": self.t,
            "params": self.state.params.clone(),
            "buffers": torch.from_numpy(np.array(self.buffers)),
            "sim_time_s": self._now(),
            "train_loss": float(filled.mean()) if filled.size else math.nan,
            "delay_mean": float(delays.mean()) if delays.size else math.nan,
            "delay_max": int(delays.max()) if delays.size else None,
            "lr_scale": float(self.state.lr_scale if self.rule.scheduled_rate == "lr" else self.state.local_lr_scale),
        })
        self.unwritten.append(snap)
        self.last_eval = self.t

    def status(self, written: int = -1) -> dict[str, Any]:
        """Progress, pending evaluation snapshots (handed over once), failure. ``written``: the last iteration whose
        metrics row the driver has written; the snapshots up to it leave the checkpoints."""
        self.unwritten = [s for s in self.unwritten if s["t"] > written]
        snaps, self.snapshots = self.snapshots, []
        return {"t": self.t, "total": self.total, "snapshots": snaps, "failed": self.failed,
                "rejections": len(self.rejections), "redispatches": len(self.redispatches)}

    def _state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "time": self._now(),
            "rule_state": self.state.state_dict(),
            "events": self.events.state_dict(),
            "sent": list(self.sent),
            "idle": list(self.idle),
            "buffers": np.array(self.buffers),
            "losses": self.losses.copy(),
            "last_eval": self.last_eval,
            "redispatches": [list(r) for r in self.redispatches],
            "rejections": list(self.rejections),
        }

    def _checkpoint(self) -> dict[str, Any]:
        return {"engine": "ray", "server": {**self._state_dict(), "snapshots": list(self.unwritten)}}

    def _maybe_checkpoint(self) -> None:
        if self.checkpoint_due and self.checkpoint_path:
            # plain data, stamped with the run's config (imported here: only the server actor writes checkpoints)
            from ..experiment.rundir import save_checkpoint

            save_checkpoint(self.checkpoint_path, self._checkpoint(),
                            config_toml=self.checkpoint_config)
        self.checkpoint_due = False

    def halt(self) -> dict[str, Any]:
        """Stop applying messages (every later push is answered "stop"), write a checkpoint at the last applied
        iteration when the state is clean there (always for asynchronous rules; for synchronous ones between rounds
        only, as their state is mid-round otherwise), and return the state as :meth:`final` does, with
        ``checkpointed``."""
        self.halted = True
        written = bool(self.checkpoint_path) and not self.waiting and not self.failed
        if written:
            from ..experiment.rundir import save_checkpoint

            save_checkpoint(self.checkpoint_path, self._checkpoint(),
                            config_toml=self.checkpoint_config)
        out = self.final()
        out["checkpointed"] = written
        return out

    def _load(self, sd: dict[str, Any]) -> None:
        self.t = int(sd["t"])
        self.time_offset = float(sd["time"])
        self.state.load_state_dict(sd["rule_state"])
        self.events.load_state_dict(sd["events"])
        self.sent = list(sd["sent"])
        self.idle = list(sd["idle"])
        self.buffers = np.array(sd["buffers"])
        self.losses = np.array(sd["losses"])
        self.last_eval = int(sd["last_eval"])
        self.redispatches = [list(r) for r in sd["redispatches"]]
        self.rejections = list(sd["rejections"])

    def final(self) -> dict[str, Any]:
        out = self._state_dict()
        out["params"] = self.state.params.clone()
        out["failed"] = self.failed
        out["busy_s"] = self.busy_s
        out["work_s"] = self.work_s
        out["first_applied_s"] = self.first_applied_s
        return out

    def start(self) -> None:
        """Every worker is ready: the clock starts now (its time 0 is the initial broadcast)."""
        self.clock0 = time.monotonic()


@ray.remote
class Worker:
    """One worker process hosting one or more logical workers (``ray.workers_per_actor``). It builds its problem
    (model, data) once; each logical worker runs its own loop compute → sleep → push in a thread of its own, with its
    own identity, data stream, timing and worker state, so the server sees exactly K workers whatever the packing.
    The computations of a process take turns (one lock): the problem's staged state is the process's, and on a CPU
    or a GPU the computations would compete anyway; the emulated sleeps and the waits for the server overlap."""

    def __init__(self, workers: list[int], problem_factory: Callable[[], Any], rule: Rule, server: Any, *,
                 timing: Any, seed: int, num_workers: int, emulate_timing: bool, time_scale: float,
                 threads: int) -> None:
        torch.set_num_threads(threads)
        self.workers, self.rule, self.server = list(workers), rule, server
        self.problem = problem_factory()
        self.clock = timing.bind(num_workers, seed) if emulate_timing and time_scale > 0 else None
        self.time_scale = time_scale
        self.lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def run(self, k: int, incarnation: int) -> str:
        """Logical worker ``k`` works until the server says stop; returns its reason."""
        if k not in self.workers:
            raise ValueError(f"worker {k} is not hosted by this process (it hosts {self.workers})")
        rule, problem, lock = self.rule, self.problem, self.lock
        device = problem.params0.device

        def on_device(a: Any) -> Any:
            return None if a is None else _tensor(a).to(device)

        with lock:
            worker_state = rule.init_worker(problem.params0)
            problem.reset_worker(k)
        reply = ray.get(self.server.hello.remote(k, incarnation))
        while "stop" not in reply:
            index = reply["index"]
            payload = Payload(index=index, params=on_device(reply["params"]), momentum=on_device(reply["momentum"]),
                              lr_scale=reply["lr_scale"])
            with lock:
                t0 = time.perf_counter()
                message = rule.work(payload, lambda x, step, i=index: problem.grad_fn(x, k, i, step), worker_state)
                compute_s = time.perf_counter() - t0
                out = {
                    "update": message.update.cpu().numpy().copy(),
                    "momentum": None if message.momentum is None else message.momentum.cpu().numpy().copy(),
                    "local_lr_scale": float(message.local_lr_scale),
                    "loss": float(problem.message_loss()),
                    "buffers": problem.message_state().cpu().numpy().copy(),  # the message's model state (staged)
                    "compute_s": compute_s,
                }
                del message  # the arrays above are copies: its gradient's memory may be reused by the next one
                # Committed now, before the server's answer, so that the next logical worker of this process may
                # compute: a rejection resets this worker's state below, which is what a discard followed by the
                # same reset leaves (the simulator's replay of a rejection).
                problem.commit_message()
                sleep = self.clock.duration(k, rule.local_steps) * self.time_scale if self.clock is not None else None
            out["sleep_s"] = 0.0
            if sleep is not None:  # the emulated rest of the computation (measured: sleeps overshoot)
                t1 = time.perf_counter()
                time.sleep(sleep)
                out["sleep_s"] = time.perf_counter() - t1
            reply = ray.get(self.server.push.remote(k, incarnation, index, out))
            if "rejected" in reply:  # the message never happened: reset as the simulator's replay does
                with lock:
                    problem.reset_worker(k)
                    worker_state = rule.init_worker(problem.params0)
        return reply["stop"]


class ServerDied(RuntimeError):
    """The parameter server's process died: nothing after the last checkpoint can be recovered."""


class ServerUnresponsive(ServerDied):
    """The parameter server stopped answering (``ray.server_timeout_s``): treated as dead, it is killed."""


class Halted(Exception):  # noqa: N818 - a stop, not an error
    """The driver was asked to stop (a signal): ``state`` is the server's at the stop (None when it came before the
    workers had started), with ``checkpointed`` telling whether a checkpoint was written at its iteration."""

    def __init__(self, signum: int, state: dict[str, Any] | None) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum, self.state = signum, state


_PROBE = """
import sys
import ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, configure_logging=False)
print("connected", flush=True)
"""


def _check_token(address: str, timeout_s: float) -> None:
    """A cluster that refuses this process's token is one line at once (Ray itself retries for ~25 s, logging each
    refusal): a throw-away driver connects first and is stopped at the first refusal it logs."""
    import subprocess
    import sys

    if address in ("auto", "local") or address.startswith("ray://"):
        return
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, address], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    refused: list[str] = []

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "InvalidAuthToken" in line or "Authentication token is missing" in line:
                refused.append(line)
                proc.kill()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # slow, not refused: the real connection reports whatever it is
        proc.kill()
        proc.wait()
    watcher.join(timeout=1)
    if refused:
        raise ConfigError(
            f"ray.address = {address!r}: the cluster refused this process's authentication token; give it the "
            f"cluster's token (RAY_AUTH_TOKEN=..., or the file ~/.ray/auth_token; `ray get-auth-token` on the head "
            f"node prints it) and set RAY_AUTH_MODE=token")


def _check_reachable(address: str, timeout_s: float) -> None:
    """A HOST:PORT that nothing answers on is one line within ``timeout_s`` (Ray itself retries for minutes)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address in ("auto", "local") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"ray.address = {address!r}: nothing answers there within ray.connect_timeout_s = "
                              f"{timeout_s:g} s ({e.strerror or e}); start the cluster there (`ray start --head`) "
                              f"or fix the address") from None


_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_saved_auth: dict[str, str | None] | None = None  # the user's RAY_AUTH_* while a private instance of ours runs


def _reset_token_cache() -> None:
    try:  # Ray caches the token it loaded first; forget it (private API: without it, one token per process)
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:  # noqa: S110 - an older or newer Ray without these: the environment is read at start-up
        pass


def _use_private_token() -> None:
    """A fresh random token for the local instance about to start, in this process's environment (its processes
    inherit it); the user's RAY_AUTH_* are kept aside for :func:`stop_ray` to put back."""
    import secrets

    global _saved_auth
    if _saved_auth is None:
        _saved_auth = {k: os.environ.get(k) for k in _AUTH_VARS}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    _reset_token_cache()


def stop_ray() -> None:
    """Shut Ray down and give the process back the user's RAY_AUTH_* (a later cluster connection uses them)."""
    global _saved_auth
    ray.shutdown()
    if _saved_auth is not None:
        for key, value in _saved_auth.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _saved_auth = None
        _reset_token_cache()


@contextlib.contextmanager
def _caller_keeps_sigterm() -> Any:
    """While ``ray.init`` runs (seconds on a busy machine), leave SIGTERM to the caller's handler: Ray would replace it
    with one that exits with status 15, and then with its C++ failure handler, which aborts; a SIGTERM while Ray
    starts would then end the driver without its orderly stop (no message, 15 or 134 instead of 143, run.json left
    ``running``). Ray's own processes are unaffected: each reads its setting from its environment."""
    if threading.current_thread() is not threading.main_thread():  # Ray installs nothing there either
        yield
        return
    try:  # private names of the pinned Ray: another version keeps its own handlers while it starts
        from ray._private import ray_constants
        from ray._private import utils as ray_utils

        saved = ray_utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    except (ImportError, AttributeError):
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = saved


def start_ray(address: str | None, num_cpus: int | None, runtime_env: dict[str, Any] | None = None, *,
              connect_timeout_s: float = 15.0) -> bool:
    """Connect to ``address``, or start a private local instance, with ``runtime_env`` for the job's processes.
    Returns True if this call started it (then the caller stops it with :func:`stop_ray`).

    A local instance asks for the node address 127.0.0.1, but Ray's gRPC servers (GCS, raylet, every process's core
    worker) listen on all interfaces and its runtime-env agent on the machine's address, so token authentication is
    what guards it: the instance gets a fresh random token of its own, held in this process's environment (inherited
    by the instance's processes, readable by the same user only), never Ray's shared ``~/.ray/auth_token``. Joining
    a cluster (``address``) uses the user's token sources as Ray does. ``RAY_AUTH_MODE=disabled`` is respected."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if runtime_env:
        kw["runtime_env"] = dict(runtime_env)
    if address and address != "local":
        _check_reachable(address, connect_timeout_s)
        _check_token(address, connect_timeout_s)
        try:
            with _caller_keeps_sigterm():
                ray.init(address=address, **kw)
        except ConnectionError as e:  # "auto" with no cluster here: Ray's own text starts with a stray "?:"
            raise ConfigError(f"ray.address = {address!r}: no running Ray cluster was found "
                              f"({str(e).removeprefix('?:').strip().splitlines()[0]}); start one with `ray start "
                              f"--head`, give its HOST:PORT, or leave ray.address unset for a private local "
                              f"instance") from None
    else:  # "local": a private instance, never a cluster that happens to run on this machine
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
            _use_private_token()
        with _caller_keeps_sigterm():
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kw,
                     _system_config={"max_direct_call_object_size": INLINE_MAX_BYTES})
    return True


def processes_for(num_workers: int, options: Any, *, cpus: int, gpus: float) -> int:
    """How many worker processes host the ``num_workers`` logical workers: ``ray.workers_per_actor`` when set, else
    one per GPU share (``ray.gpus_per_worker``) or one per CPU, never more than the workers."""
    per = getattr(options, "workers_per_actor", None)
    if per:
        return math.ceil(num_workers / per)
    if options.gpus_per_worker:
        return max(1, min(num_workers, int(gpus // options.gpus_per_worker)))
    return max(1, min(num_workers, int(cpus)))


def worker_groups(num_workers: int, processes: int) -> list[list[int]]:
    """The logical workers of each process, dealt round-robin (a slow fraction of workers spreads over them)."""
    return [list(range(g, num_workers, processes)) for g in range(processes)]


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's cpuset sets), else the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_ray(
    *,
    rule: Rule,
    problem_factory: Callable[[], Any],
    params0: torch.Tensor,
    num_workers: int,
    total: int,
    schedule: Callable[[int], float] | None,
    timing: Any,
    seed: int,
    scheduler: str,
    meta: dict[str, Any],
    options: Any,
    eval_marks: list[int],
    checkpoint_marks: list[int],
    checkpoint_path: str | None,
    buffers_size: int,
    loss_window: int,
    resume: dict[str, Any] | None,
    checkpoint_config: str = "",
    on_snapshot: Callable[[dict[str, Any]], None],
    on_progress: Callable[[int], None] | None = None,
    kill_hook: Callable[[list[Any]], None] | None = None,
    should_stop: Callable[[], int | None] | None = None,
    on_started: Callable[[], None] | None = None,
    on_starting: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run to ``total`` server iterations; returns the server's final state (params, events, re-dispatches, …)."""
    called = time.monotonic()
    started = start_ray(options.address, options.num_cpus or _usable_cpus(),
                        getattr(options, "runtime_env", None),
                        connect_timeout_s=getattr(options, "connect_timeout_s", 15.0))
    if on_started is not None:  # e.g. take back the signal handlers that ray.init replaced
        on_started()
    actors: list[Any] = []
    runs: dict[Any, tuple[int, int]] = {}  # each logical worker's running loop -> (its id, its process generation)
    server = None
    halted = False
    try:
        # the instance's own resources: a local one was started with ray.num_cpus (or the usable CPUs) above
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1.0))
        groups = worker_groups(num_workers, processes_for(num_workers, options, cpus=int(cpus),
                                                          gpus=float(resources.get("GPU", 0.0))))
        group_of = {k: g for g, members in enumerate(groups) for k in members}
        cpus_per_process = min(1.0, cpus / len(groups)) if not options.gpus_per_worker else 0.0
        if on_starting is not None:
            on_starting(num_workers, len(groups))
        # The server runs on the driver's node: it writes the checkpoint there.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        server = ParameterServer.options(num_cpus=0, max_restarts=0, max_task_retries=0, scheduling_strategy=here,
                                         max_concurrency=4 * num_workers + 16).remote(
            rule, params0.detach().cpu().numpy(), num_workers=num_workers, scheduler=scheduler, total=total,
            schedule=schedule, meta=meta, eval_marks=eval_marks, checkpoint_marks=checkpoint_marks,
            checkpoint_path=checkpoint_path, checkpoint_config=checkpoint_config,
            sync_timeout_s=options.sync_timeout_s, buffers_size=buffers_size,
            loss_window=loss_window, resume=resume)

        def new_process(g: int) -> Any:
            # A dead process is replaced by a fresh actor (a new process), not restarted by Ray: its constructor
            # rebuilds the problem from the factory, and nothing of the dead process is reused.
            actor = Worker.options(num_cpus=cpus_per_process, num_gpus=options.gpus_per_worker, max_restarts=0,
                                   max_task_retries=0, max_concurrency=len(groups[g]) + 2).remote(
                groups[g], problem_factory, rule, server, timing=timing, seed=seed, num_workers=num_workers,
                emulate_timing=options.emulate_timing, time_scale=options.time_scale, threads=options.worker_threads)
            actors.append(actor)
            return actor

        def died(g: int, while_: str) -> None:
            """Process ``g`` died: each of its workers is counted as restarted once, and a new process replaces it."""
            for k in groups[g]:
                incarnation[k] += 1
                if incarnation[k] > options.max_restarts:
                    raise RuntimeError(f"worker {k} died {incarnation[k]} times{while_} (ray.max_restarts="
                                       f"{options.max_restarts}); stopping the run") from None
            generation[g] += 1
            try:  # one of its workers failed: make sure none of the others goes on under the old incarnation
                ray.kill(processes[g])
            except Exception:  # noqa: S110 - already gone
                pass
            processes[g] = new_process(g)

        actors.append(server)
        processes = [new_process(g) for g in range(len(groups))]
        generation = [0] * len(groups)
        incarnation = [0] * num_workers
        # every process builds its problem, then all workers start together; one that dies meanwhile is replaced
        starting = {p.pid.remote(): g for g, p in enumerate(processes)}
        deadline = time.monotonic() + options.startup_timeout_s
        while starting:
            ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0.25)
            for ref in ready:
                g = starting.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError:
                    died(g, " while starting")
                    starting[processes[g].pid.remote()] = g
            if should_stop is not None and (signum := should_stop()):
                halted = True
                raise Halted(signum, None)  # nothing was applied: the last checkpoint (if any) is where to resume
            if starting and time.monotonic() > deadline:
                gpus_needed = (f" and {len(groups) * options.gpus_per_worker:g} GPUs" if options.gpus_per_worker
                               else "")
                raise RuntimeError(
                    f"the {num_workers} workers ({len(groups)} processes) did not start within "
                    f"ray.startup_timeout_s={options.startup_timeout_s} s (does the cluster have "
                    f"{len(groups) * cpus_per_process:g} free CPUs{gpus_needed}?)"
                )

        def ask(call: Any, timeout_s: float | None = None) -> Any:
            """The server's answer, or ServerUnresponsive after ray.server_timeout_s (the heartbeat)."""
            try:
                return ray.get(call, timeout=timeout_s or options.server_timeout_s)
            except GetTimeoutError:
                raise ServerUnresponsive(
                    f"the parameter server did not answer for ray.server_timeout_s = {options.server_timeout_s:g} s "
                    f"(stopped, or too loaded to answer); the run stopped at its last checkpoint") from None

        ask(server.start.remote(), max(options.server_timeout_s, deadline - time.monotonic()))  # built by now
        written = -1  # the last iteration whose snapshot on_snapshot has written (told to the server)
        startup_s = time.monotonic() - called  # Ray (when started here), the processes, their problems
        runs.update({processes[group_of[k]].run.remote(k, incarnation[k]): (k, generation[group_of[k]])
                     for k in range(num_workers)})
        if kill_hook is not None:
            kill_hook(processes)
        while runs:
            if should_stop is not None and (signum := should_stop()):
                # stop the server first (nothing more is applied), checkpoint there, hand over its evaluations
                halted = True
                try:  # the halt writes a checkpoint: more time than a heartbeat
                    state = ask(server.halt.remote(), max(options.server_timeout_s, 120.0))
                    snapshots = ask(server.status.remote(written))["snapshots"]
                except ServerUnresponsive:  # still a stop: the last periodic checkpoint is where to resume
                    raise Halted(signum, None) from None
                for snap in snapshots:
                    on_snapshot(snap)
                raise Halted(signum, state)
            ready, _ = ray.wait(list(runs), num_returns=1, timeout=0.2)
            for ref in ready:
                k, gen = runs.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError:  # the process died: a new one asks the server for fresh work
                    g = group_of[k]
                    if gen == generation[g]:  # the first of its workers to report it: replace the process
                        died(g, "")
                    runs[processes[g].run.remote(k, incarnation[k])] = (k, generation[g])
            status = ask(server.status.remote(written))
            for snap in status["snapshots"]:
                on_snapshot(snap)
                written = snap["t"]
            if on_progress is not None:
                on_progress(status["t"])
            if status["failed"]:
                raise RuntimeError(f"the Ray run stopped: {status['failed']}")
            if status["t"] >= total:  # done: a replacement still starting up is not waited for
                break
        for snap in ask(server.status.remote(written))["snapshots"]:
            on_snapshot(snap)
        final = ask(server.final.remote())
        if final["failed"]:
            raise RuntimeError(f"the Ray run stopped: {final['failed']}")
        final["startup_s"], final["processes"] = startup_s, len(groups)
        return final
    except (Halted, ServerUnresponsive):
        raise
    except Exception as e:
        if server is not None:  # what the server had, for the failed run's logs
            try:
                e.partial = ray.get(server.final.remote(), timeout=30)  # type: ignore[attr-defined]
            except Exception:  # the server itself is gone: say so in one line (the caller names --resume)
                if isinstance(e, RayActorError):
                    raise ServerDied(f"the parameter server process died ({type(e).__name__}); the run stopped "
                                     f"at its last checkpoint") from None
        raise
    finally:
        pending = list(runs)
        if pending and not halted:  # workers finishing (or a replacement starting): collect quietly
            ray.wait(pending, num_returns=len(pending), timeout=10)
        for actor in actors:
            ray.kill(actor)
        for ref in pending:  # read every result so that Ray does not report it as an unhandled error
            try:
                ray.get(ref, timeout=10)
            except Exception:  # noqa: S110 - a killed worker's call fails, as it should
                pass
        if started:
            stop_ray()
