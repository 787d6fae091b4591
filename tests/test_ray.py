"""The Ray runtime: real runs for each scheduler, exact replay in the simulator, a killed worker, a killed run resumed,
every rejected message, and timing emulation. One local Ray instance serves the whole module (a start costs ~4 s)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from ormo.engine.ray_runtime import ParameterServer, start_ray, stop_ray  # noqa: E402
from ormo.experiment import load_config, train  # noqa: E402
from ormo.experiment.metrics import read_metrics  # noqa: E402
from ormo.experiment.replay import replay  # noqa: E402
from ormo.experiment.run import read_run_info  # noqa: E402
from ormo.rules import make_rule  # noqa: E402

pytestmark = pytest.mark.ray

BASE = ["model.name=mlp", "data.batch_size=16", "data.subset=480", "train.eval_every=0.5", "method.lr=0.02",
        "method.momentum=0.9", "ray.time_scale=0.002", "train.checkpoint_every=0.25"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    started = start_ray(None, num_cpus=8)
    yield ray.get_runtime_context().gcs_address
    if started:
        stop_ray()


def _cfg(*overrides):
    return load_config(None, [*BASE, *overrides])


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("ormo", []),
        ("ssgdm", []),
        ("orlomo", ["method.local_steps=2", 'method.options.local_momentum_init="previous"']),
        ("prsgdm", ["method.local_steps=2", "method.local_lr=0.05"]),
    ],
)
def test_real_run_and_its_exact_replay(tmp_path, method, extra):
    cfg = _cfg(f"method.name={method}", "train.num_workers=3", "train.epochs=2", *extra)
    res = train(cfg, tmp_path / "run", engine="ray", progress=False)
    info = read_run_info(tmp_path / "run")
    assert info["status"] == "finished" and info["engine"] == "ray"
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["test_acc"] > rows[0]["test_acc"] and rows[-1]["train_loss"] < 2.3
    events = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    assert len(events) - 1 == res.final["iteration"]
    assert sorted(info["summary"]["messages_per_worker"]) [0] > 0  # every worker took part
    if method in ("ssgdm", "prsgdm"):  # synchronous: the delay is t mod K
        delays = [json.loads(line)["delay"] for line in events[1:]]
        assert delays == [t % 3 for t in range(len(delays))]
    out = replay(tmp_path / "run")
    assert out["bit_identical"], out


def _pids_of(prefix: bytes) -> list[int]:
    """The processes whose command line starts with ``prefix`` (Ray names its actor processes ray::CLASS)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "cmdline").read_bytes().startswith(prefix):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _worker_pids() -> list[int]:
    return _pids_of(b"ray::Worker")


def _kill_a_worker_after_the_first_checkpoint(run_dir: Path) -> threading.Thread:
    """Kill one worker process (SIGKILL) once the run has written its first checkpoint."""

    def go():
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run_dir / "checkpoint.pt").exists():
                pids = _worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("method", ["ormo", "ssgdm"])
def test_a_killed_worker_is_replaced_and_the_run_completes(tmp_path, method):
    # long enough (about 5 s of emulated work) for the replacement process to start while the run goes on
    cfg = _cfg(f"method.name={method}", "train.num_workers=3", "train.epochs=10", "ray.time_scale=0.05")
    killer = _kill_a_worker_after_the_first_checkpoint(tmp_path / "run")
    train(cfg, tmp_path / "run", engine="ray", progress=False)
    killer.join(timeout=5)
    info = read_run_info(tmp_path / "run")
    assert info["status"] == "finished"
    log = json.loads((tmp_path / "run" / "events.jsonl").read_text().splitlines()[0])
    restarts = [r for r in log["meta"]["redispatches"] if r[3] == "restarted"]
    assert len(restarts) == 1, log["meta"]["redispatches"]
    t_restart, worker, index = restarts[0][:3]
    # the lost message is never applied: after the restart the worker's next message carries the new index
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()[1:]]
    later = [e for e in events if e["worker"] == worker and e["t"] >= t_restart]
    assert later and later[0]["index"] == index
    assert replay(tmp_path / "run")["bit_identical"]  # the restart is replayed too


def _cli_run_until(tmp_path: Path, address: str, overrides: list[str], ready) -> subprocess.Popen:
    """``ormo train --engine ray`` in a child process on the module's Ray instance, returned once ``ready(run_dir)``
    holds (the child must still be running then)."""
    run_dir = tmp_path / "run"
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('name = "t"\n')
    cmd = [sys.executable, "-m", "ormo", "train", str(cfg_file), "--engine", "ray", "--address", address,
           "--run-dir", str(run_dir), "--quiet", *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ready(run_dir):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    return proc


def test_resume_after_the_whole_run_is_killed(tmp_path, ray_instance):
    run_dir = tmp_path / "run"
    overrides = [*BASE, "method.name=ormo", "train.num_workers=3", "train.epochs=4", "ray.time_scale=0.01"]
    proc = _cli_run_until(tmp_path, ray_instance, overrides, lambda d: (d / "checkpoint.pt").exists())
    proc.send_signal(signal.SIGKILL)  # the driver dies: its actors die with it
    proc.wait()
    assert read_run_info(run_dir)["status"] == "running"
    res = train(None, run_dir, resume=True, progress=False)
    info = read_run_info(run_dir)
    assert info["status"] == "finished" and res.final["epoch"] >= 4 - 1e-9
    iterations = [r["iteration"] for r in read_metrics(run_dir)]
    assert iterations == sorted(set(iterations))  # no row from the lost timeline survives
    # it continued from the checkpoint (not from scratch): every worker was re-dispatched there, at some t > 0
    meta = json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])["meta"]
    restarts = [r for r in meta["redispatches"] if r[3] == "restarted"]
    assert len(restarts) == 3 and len({r[0] for r in restarts}) == 1 and restarts[0][0] > 0
    assert replay(run_dir)["bit_identical"]


def test_evaluations_the_driver_never_wrote_are_written_when_the_run_resumes(tmp_path, monkeypatch):
    """An adversarial read: the server hands each evaluation snapshot over once, so a driver killed between taking
    one and writing its row lost that row for good (the resume kept only the rows on disk). Checkpoints now hold the
    snapshots the driver has not said it wrote. Here the driver fails right before writing the row of epoch 1."""
    from ormo.experiment.metrics import MetricsWriter
    from ormo.experiment.runloop import iteration_marks

    cfg = _cfg("method.name=ormo", "train.num_workers=3", "train.epochs=2", "ray.time_scale=0.01")
    add, failed = MetricsWriter.add, []

    def add_or_fail(self, row):
        if row["epoch"] >= 1.0 and not failed:
            failed.append(row["iteration"])
            raise RuntimeError("the driver dies before writing this row")
        add(self, row)

    monkeypatch.setattr(MetricsWriter, "add", add_or_fail)
    with pytest.raises(RuntimeError, match="the driver dies"):
        train(cfg, tmp_path / "run", progress=False, engine="ray")
    assert failed and failed[0] not in [r["iteration"] for r in read_metrics(tmp_path / "run")]
    monkeypatch.setattr(MetricsWriter, "add", add)
    res = train(None, tmp_path / "run", resume=True, progress=False)
    iterations = [r["iteration"] for r in read_metrics(tmp_path / "run")]
    total = res.metrics[-1]["iteration"]  # 2 epochs, evaluated every half epoch: no row missing, none twice
    assert iterations == [0, *sorted(iteration_marks(0.5, total / 2, total))] and len(iterations) == 5
    assert failed[0] in iterations and replay(tmp_path / "run")["bit_identical"]


def _server(rule_name="ormo", k=2, total=100):
    rule = make_rule(rule_name)
    return ParameterServer.remote(
        rule, np.ones(4, dtype=np.float32), num_workers=k, scheduler=rule.scheduler, total=total, schedule=None,
        meta={}, eval_marks=[], checkpoint_marks=[], checkpoint_path=None, sync_timeout_s=5.0, buffers_size=2,
        loss_window=4)


def _msg(**over):
    msg = {"update": np.full(4, 0.5, dtype=np.float32), "buffers": np.zeros(2, dtype=np.float32), "loss": 1.0,
           "local_lr_scale": 1.0}
    msg.update(over)
    return msg


def test_every_bad_message_is_rejected_and_never_touches_the_parameters():
    server = _server()
    assert ray.get(server.hello.remote(0, 0))["index"] == 0
    assert ray.get(server.hello.remote(1, 0))["index"] == 0
    good = ray.get(server.push.remote(0, 0, 0, _msg()))  # t = 0 applied; worker 0 now holds index 1
    assert good["index"] == 1
    # Each case is sent with worker 1's current index (a rejection re-dispatches the worker, giving it index t = 1),
    # so that only the flaw under test is wrong. `None` stands for "the index worker 1 holds now".
    bad = [
        ((5, 0, None, _msg()), "unknown worker 5"),
        ((1, 7, None, _msg()), "stale message from incarnation 7"),
        ((1, 0, 9, _msg()), "index 9 is from the future"),
        ((0, 0, 0, _msg()), "index 0 is not the one worker 0 was sent (1)"),
        ((1, 0, "0", _msg()), "malformed index '0'"),
        ((1, 0, None, "not a dict"), "malformed message of type str"),
        ((1, 0, None, {"buffers": np.zeros(2, np.float32), "loss": 1.0}), "malformed update"),
        ((1, 0, None, _msg(update=np.zeros(3, np.float32))), "malformed update: got ndarray (3,) float32"),
        ((1, 0, None, _msg(update=np.zeros(4, np.float64))), "malformed update: got ndarray (4,) float64"),
        ((1, 0, None, _msg(update=np.array([0, math.nan, 0, 0], np.float32))), "NaN/Inf values in the update"),
        ((1, 0, None, _msg(buffers=np.array([math.inf, 0], np.float32))), "NaN/Inf values in the buffers"),
        ((1, 0, None, _msg(loss=math.nan)), "malformed or non-finite loss"),
    ]
    before = ray.get(server.final.remote())["params"]
    held = 0  # worker 1 was sent index 0
    for (worker, incarnation, index, msg), _ in bad:
        reply = ray.get(server.push.remote(worker, incarnation, held if index is None else index, msg))
        if worker == 1 and "index" in reply:
            held = reply["index"]
    final = ray.get(server.final.remote())
    assert torch.equal(final["params"], before)  # nothing was applied
    reasons = [r["reason"] for r in final["rejections"]]
    assert len(reasons) == len(bad)
    for (_, expected), got in zip(bad, reasons, strict=True):
        assert expected in got, (expected, got)
    assert final["t"] == 1
    # a known worker whose message was rejected was sent fresh parameters, and that is logged for the replay
    assert any(r[1] == 1 and r[3].startswith("rejected") for r in final["redispatches"])
    assert ray.get(server.push.remote(1, 0, held, _msg()))["index"] == 2  # and its next good message is applied


def test_a_synchronous_round_never_hangs_on_a_missing_worker():
    server = _server("ssgdm", k=2)
    ray.get(server.hello.remote(0, 0))
    ray.get(server.hello.remote(1, 0))
    t0 = time.time()
    reply = ray.get(server.push.remote(0, 0, 0, _msg()))  # worker 1 never answers
    assert "stop" in reply and "did not complete within ray.sync_timeout_s=5.0 s: no message from worker(s) [1]" \
        in reply["stop"]
    assert time.time() - t0 < 30


def test_timing_emulation_gives_the_expected_delays(tmp_path):
    """One worker 6× slower, sleeping 20 ms per unit: its messages are ~(K − 1)·6 iterations late."""
    k = 4
    cfg = _cfg("method.name=asgd", f"train.num_workers={k}", "train.epochs=3", "timing.model=one_slow",
               "timing.ratio=6.0", "ray.time_scale=0.02")
    res = train(cfg, tmp_path / "run", engine="ray", progress=False)
    summary = res.summary
    counts = summary["messages_per_worker"]
    assert counts[-1] * 2 < min(counts[:-1])  # far fewer messages (6x nominally; a loaded machine's compute blurs it)
    assert (k - 1) * 6 * 0.5 <= summary["delay"]["max"] <= (k - 1) * 6 * 2.5


def test_a_dead_incarnations_message_does_not_disturb_its_replacement():
    server = _server()
    ray.get(server.hello.remote(0, 0))
    ray.get(server.hello.remote(1, 0))
    ray.get(server.push.remote(0, 0, 0, _msg()))  # t = 1
    fresh = ray.get(server.hello.remote(1, 1))  # worker 1 died and was replaced: it gets the current parameters
    assert fresh["index"] == 1
    ray.get(server.push.remote(0, 0, 1, _msg()))  # t = 2
    late = ray.get(server.push.remote(1, 0, 0, _msg()))  # the dead process's message arrives after all
    assert "stop" in late and "stale message from incarnation 0" in late["stop"]
    applied = ray.get(server.push.remote(1, 1, 1, _msg()))  # the replacement's message is still the right one
    assert applied["index"] == 3 and "rejected" not in applied
    final = ray.get(server.final.remote())
    assert final["t"] == 3 and [r[3] for r in final["redispatches"]] == ["restarted"]


def test_a_second_message_of_one_worker_in_a_synchronous_round_is_rejected():
    server = _server("ssgdm", k=3)
    for w in range(3):
        ray.get(server.hello.remote(w, 0))
    first = server.push.remote(0, 0, 0, _msg())  # waits for the round
    time.sleep(0.2)
    again = ray.get(server.push.remote(0, 0, 0, _msg()))
    assert again.get("rejected", "").startswith("worker 0 already sent its message for this round")
    others = [server.push.remote(w, 0, 0, _msg()) for w in (1, 2)]  # a round's pushes wait for each other
    assert [r["index"] for r in ray.get([first, *others])] == [3, 3, 3]  # completed by three different workers
    assert ray.get(server.final.remote())["t"] == 3


def test_a_rejected_live_worker_is_told_so_it_can_reset():
    server = _server()
    ray.get(server.hello.remote(0, 0))
    reply = ray.get(server.push.remote(0, 0, 0, _msg(loss=math.nan)))
    assert reply["rejected"].startswith("malformed or non-finite loss") and reply["index"] == 0


RULE_FILE = """\
from dataclasses import dataclass
from typing import ClassVar

from ormo.rules.asgd import ASGD
from ormo.rules.base import register


@register
@dataclass(frozen=True)
class HalfStepASGD(ASGD):
    name: ClassVar[str] = "half-step-asgd"

    def apply(self, state, message, *, t, worker):
        state.params.add_(message.update, alpha=-0.5 * self.lr * state.lr_scale)
"""


def test_a_task_and_a_rule_from_files_outside_the_package_train_on_ray_and_replay_exactly(tmp_path, monkeypatch):
    """The README's example task (examples/my_task.py) with a rule defined in another file: the workers rebuild the
    task from its file; the rule travels to them by value."""
    import ormo.rules.base as rules_base

    monkeypatch.setattr(rules_base, "_REGISTRY", dict(rules_base._REGISTRY))  # the rule is forgotten afterwards
    rule_file = tmp_path / f"rule_{os.getpid()}_{time.monotonic_ns()}.py"
    rule_file.write_text(RULE_FILE)
    example = Path(__file__).resolve().parent.parent / "examples" / "my_task.py"
    cfg = load_config(None, [f"task.entry={example}:make_task", f'task.imports=["{rule_file}"]',
                             "task.options.train_size=512", "method.name=half-step-asgd", "method.lr=0.02",
                             "train.num_workers=3", "train.epochs=3", "train.eval_every=1", "data.batch_size=32",
                             "ray.time_scale=0.002"])
    train(cfg, tmp_path / "run", engine="ray", progress=False)
    info = read_run_info(tmp_path / "run")
    assert info["status"] == "finished" and info["engine"] == "ray" and info["method"] == "half-step-asgd"
    rows = read_metrics(tmp_path / "run")
    assert list(rows[0])[5:9] == ["test_mse", "test_mae", "val_mse", "val_mae"]
    assert rows[-1]["val_mse"] < rows[0]["val_mse"]
    assert sorted(info["summary"]["messages_per_worker"])[0] > 0  # every worker built the task and took part
    out = replay(tmp_path / "run")
    assert out["bit_identical"], out


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_workers_checkpoints_where_the_server_stopped_and_resumes_exactly(tmp_path, ray_instance,
                                                                                          sig, code):
    """Issue 9: Ctrl-C / SIGTERM halt the server, checkpoint at its last applied iteration, and exit 130 / 143 at
    once; the metrics rows, the event log and the checkpoint agree, and the resumed run replays bit-identically."""
    run_dir = tmp_path / "run"
    overrides = [*BASE, "method.name=ormo", "train.num_workers=3", "train.epochs=6", "ray.time_scale=0.01",
                 "train.checkpoint_every=2"]
    proc = _cli_run_until(tmp_path, ray_instance, overrides,
                          lambda d: (d / "metrics.jsonl").exists() and len(read_metrics(d)) >= 3)
    proc.send_signal(sig)
    sent = time.time()
    assert proc.wait(timeout=60) == code
    assert time.time() - sent < 15  # no run-on: the workers stop at once
    err = proc.stderr.read().decode()
    assert "checkpoint written" in err and "--resume" in err and "Traceback" not in err
    info = read_run_info(run_dir)
    assert info["status"] == "interrupted"
    from ormo.experiment.rundir import CHECKPOINT, safe_load

    t = int(safe_load(run_dir / CHECKPOINT, fix="-")["server"]["t"])
    events = (run_dir / "events.jsonl").read_text().splitlines()
    assert len(events) - 1 == t  # the event log ends where the checkpoint is
    assert read_metrics(run_dir)[-1]["iteration"] <= t
    res = train(None, run_dir, resume=True, progress=False)
    assert read_run_info(run_dir)["status"] == "finished" and res.final["epoch"] >= 6 - 1e-9
    iterations = [r["iteration"] for r in read_metrics(run_dir)]
    assert iterations == sorted(set(iterations))
    assert replay(run_dir)["bit_identical"]


def test_a_sigterm_while_ray_starts_reaches_the_callers_handler():
    """ray.init replaces SIGTERM's handler (one that exits with status 15, then its C++ failure handler, which aborts):
    a SIGTERM while the instance starts ended `ormo train` with 15 or 134, no message and run.json `running`. The
    caller's handler stays in place throughout (checked in a fresh process: this module's instance is up)."""
    script = (
        "import os, signal, time\n"
        "from ormo.engine.ray_runtime import start_ray, stop_ray\n"
        "seen = []\n"
        "def handler(signum, frame): seen.append(signum)\n"
        "signal.signal(signal.SIGTERM, handler)\n"
        "assert start_ray(None, num_cpus=1)\n"
        "try:\n"
        "    assert signal.getsignal(signal.SIGTERM) is handler, signal.getsignal(signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    assert seen == [signal.SIGTERM], seen\n"
        "finally:\n"
        "    stop_ray()\n"
        "print('kept')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "kept" in done.stdout, done.stderr[-2000:]
    assert "SIGTERM received" not in done.stderr  # Ray's C++ failure handler never saw it


def test_a_dead_address_is_one_line_within_the_connect_timeout(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "ormo", "train", "preset:quickstart", "--engine", "ray", "--address",
                           f"127.0.0.1:{port}", "--set", "ray.connect_timeout_s=2", "--set", "train.epochs=0.1",
                           "--run-dir", str(tmp_path / "r"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "nothing answers there within ray.connect_timeout_s = 2 s" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and time.time() - started < 60
    # the cluster moved (here: none, a private local instance): the run continues there, recorded for later resumes
    done = subprocess.run([sys.executable, "-m", "ormo", "train", "--resume", str(tmp_path / "r"), "--address",
                           "local", "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_run_info(tmp_path / "r")["status"] == "finished"
    assert 'address = "local"' in (tmp_path / "r" / "config.toml").read_text()


def test_a_worker_that_dies_while_starting_is_replaced(tmp_path):
    """Issue 9: a worker process killed before its first message is replaced like one dying mid-run."""
    cfg = _cfg("method.name=ormo", "train.num_workers=3", "train.epochs=1")
    killed = []

    def killer():  # kill the first worker process that appears, before the run starts
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            pids = _worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    res = train(cfg, tmp_path / "run", engine="ray", progress=False)
    thread.join(timeout=5)
    assert killed
    assert read_run_info(tmp_path / "run")["status"] == "finished" and res.final["epoch"] >= 1 - 1e-9
    assert replay(tmp_path / "run")["bit_identical"]


@pytest.mark.parametrize(("model", "extra"), [("mlp", []), ("resnet20", ["method.name=ssgdm"])])
def test_several_logical_workers_share_a_process_and_replay_exactly(tmp_path, model, extra):
    """Issue 9: K = 4 workers in 2 processes. Each keeps its own identity, data stream and BatchNorm statistics
    (resnet20), so the simulator's replay of the arrival order is bit-identical."""
    cfg = _cfg("method.name=ormo", f"model.name={model}", "train.num_workers=4", "ray.workers_per_actor=2",
               "train.epochs=1", *extra)
    res = train(cfg, tmp_path / "run", engine="ray", progress=False)
    info = read_run_info(tmp_path / "run")
    assert info["status"] == "finished" and info["summary"]["worker_processes"] == 2
    assert min(info["summary"]["messages_per_worker"]) > 0
    assert 0 < info["summary"]["first_message_s"] < 300
    assert res.final["epoch"] >= 1 - 1e-9
    out = replay(tmp_path / "run")
    assert out["bit_identical"], out


def test_a_killed_process_restarts_every_worker_it_hosted(tmp_path):
    cfg = _cfg("method.name=ormo", "train.num_workers=4", "ray.workers_per_actor=2", "train.epochs=10",
               "ray.time_scale=0.05")
    killer = _kill_a_worker_after_the_first_checkpoint(tmp_path / "run")
    train(cfg, tmp_path / "run", engine="ray", progress=False)
    killer.join(timeout=5)
    assert read_run_info(tmp_path / "run")["status"] == "finished"
    log = json.loads((tmp_path / "run" / "events.jsonl").read_text().splitlines()[0])
    restarts = [r for r in log["meta"]["redispatches"] if r[3] == "restarted"]
    # the two workers of the killed process (dealt round-robin: 0 and 2, or 1 and 3), each restarted once
    assert sorted(r[1] for r in restarts) in ([0, 2], [1, 3]), restarts
    assert replay(tmp_path / "run")["bit_identical"]


def test_workers_are_dealt_round_robin_over_the_processes():
    from types import SimpleNamespace

    from ormo.engine.ray_runtime import processes_for, worker_groups

    assert worker_groups(5, 2) == [[0, 2, 4], [1, 3]]
    assert worker_groups(3, 3) == [[0], [1], [2]]
    auto = SimpleNamespace(workers_per_actor=None, gpus_per_worker=0.0)
    assert processes_for(64, auto, cpus=2, gpus=0) == 2
    assert processes_for(3, auto, cpus=8, gpus=0) == 3
    assert processes_for(64, SimpleNamespace(workers_per_actor=None, gpus_per_worker=0.5), cpus=64, gpus=4) == 8
    assert processes_for(64, SimpleNamespace(workers_per_actor=10, gpus_per_worker=0.0), cpus=2, gpus=0) == 7


def test_a_frozen_server_ends_the_run_within_the_heartbeat_and_it_resumes(tmp_path):
    """Issue 9: a server that stops answering (SIGSTOP) ends the run after ray.server_timeout_s with one line naming
    --resume; the run resumes from its last checkpoint and replays exactly."""
    run_dir = tmp_path / "run"
    cfg = _cfg("method.name=ormo", "train.num_workers=3", "train.epochs=6", "ray.time_scale=0.01",
               "ray.server_timeout_s=3")
    frozen = []

    def freeze():
        deadline = time.time() + 120
        while time.time() < deadline and not frozen:
            if (run_dir / "checkpoint.pt").exists():
                for pid in _pids_of(b"ray::ParameterServer"):
                    os.kill(pid, signal.SIGSTOP)
                    frozen.append(pid)
            time.sleep(0.01)

    thread = threading.Thread(target=freeze, daemon=True)
    thread.start()
    started = time.time()
    try:
        with pytest.raises(RuntimeError, match=r"did not answer for ray.server_timeout_s = 3 s .*--resume"):
            train(cfg, run_dir, engine="ray", progress=False)
    finally:
        for pid in frozen:  # ray.kill has killed it; a stopped process left behind would hold the test's instance
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert frozen and time.time() - started < 100
    assert read_run_info(run_dir)["status"] == "failed"
    assert (run_dir / "events.jsonl").is_file()  # the log up to the last checkpoint
    res = train(None, run_dir, resume=True, progress=False)
    assert read_run_info(run_dir)["status"] == "finished" and res.final["epoch"] >= 6 - 1e-9
    assert replay(run_dir)["bit_identical"]


def _process_tree(root: int) -> list[int]:
    """``root`` and its descendants: the scale benchmark's own walk of /proc (one implementation)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ray_scale.py"
    spec = importlib.util.spec_from_file_location("ray_scale_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench._tree(root)


def _listening_sockets(pids: list[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, program) of every listening TCP socket held by ``pids``, read from /proc."""
    import ipaddress

    owner = {}
    for pid in pids:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            (address, port), state, inode = fields[1].split(":"), fields[3], fields[9]
            if state != "0A" or inode not in owner:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))  # host-order words
            pid = owner[inode]
            try:
                program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            out.append((str(ipaddress.ip_address(raw)), int(port, 16), pid, program))
    return out


def test_the_local_instance_listens_only_where_ray_must_and_its_token_is_private(tmp_path, ray_instance):
    """Issue 9: what a private local instance exposes, pinned down from the listening sockets of its own processes.
    Ray binds its gRPC servers (GCS, raylet, the core worker in every process, the driver's included) to all
    interfaces and its runtime-env agent to the node address, whatever node address is asked for; there is no
    dashboard, no Ray Client server and nothing else. Every one of them demands the instance's token, which is a fresh
    random one kept out of ~/.ray/auth_token: a client without it is refused with one clear line."""
    import ipaddress

    ray.get(ray.remote(lambda: 1).remote())  # at least one worker process is up
    sockets = _listening_sockets(_process_tree(os.getpid()))
    assert sockets
    exposed = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
    for address, port, pid, program in exposed:
        name = Path(program).name
        is_ray_process = name in ("gcs_server", "raylet") or program.startswith("ray::") or pid == os.getpid()
        assert is_ray_process, (address, port, program)
        if program == "ray::RuntimeEnvAgent":  # HTTP on the node address, behind the token middleware
            assert not ipaddress.ip_address(address).is_unspecified
        else:
            assert ipaddress.ip_address(address).is_unspecified, (address, port, program)  # a gRPC server
    assert not {8265, 10001} & {s[1] for s in sockets}  # no dashboard, no Ray Client server
    token = os.environ.get("RAY_AUTH_TOKEN")
    assert os.environ.get("RAY_AUTH_MODE") == "token" and token and len(token) >= 32
    shared = Path.home() / ".ray" / "auth_token"
    assert not shared.exists() or shared.read_text().strip() != token
    # a process with the wrong token (or none) is refused at once, with one line
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN"] = "0" * 64
    done = subprocess.run([sys.executable, "-m", "ormo", "train", "preset:quickstart", "--engine", "ray", "--address",
                           ray_instance, "--set", "train.epochs=0.1", "--run-dir", str(tmp_path / "r"), "--quiet"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert "the cluster refused this process's authentication token" in done.stderr
    assert "Traceback" not in done.stderr
