"""Runs that never lie: one writer per run directory, checkpoints that say which config and code made them and load
as data only, one-line file-system errors that lose nothing, replay input checks, honest stops and divergence."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Quadratic
from hypothesis import given, settings
from hypothesis import strategies as st

import ormo
from ormo.cli import main
from ormo.engine import Simulator
from ormo.engine.events import EventLog, EventLogError
from ormo.engine.timing import SlowFraction
from ormo.experiment import RunDirError, RunStopped, is_locked, load_config, train
from ormo.experiment import rundir as rundir_mod
from ormo.experiment.replay import replay
from ormo.experiment.rundir import CHECKPOINT, RunLock, plain, read_run_info, save_checkpoint, write_json
from ormo.experiment.runloop import iteration_marks
from ormo.report.runs import read_run

TINY = ["model.name=mlp", "data.batch_size=16", "train.num_workers=4", "train.epochs=0.5", "train.eval_every=0.25",
        "train.checkpoint_every=0.25", "method.lr=0.02", "method.momentum=0.9", "data.subset=160"]


def _run(tmp_path, name="run", extra=()):
    """A finished tiny run (5 messages, 10 an epoch), returned with its directory."""
    d = tmp_path / name
    return train(load_config(None, [*TINY, *extra]), d, progress=False), d


def _unfinish(d: Path) -> None:
    """Make a finished run look interrupted, so that `--resume` loads its checkpoint."""
    info = read_run_info(d)
    info["status"] = "interrupted"
    write_json(d / "run.json", info)


def _cfg_file(tmp_path) -> str:
    f = tmp_path / "empty.toml"
    f.write_text('name = "t"\n')
    return str(f)


def _sets(overrides):
    return sum((["--set", o] for o in overrides), [])


# -- one writer per run directory -------------------------------------------------------------------------------------
def test_the_run_lock_names_its_holder_and_is_free_after_release(tmp_path):
    assert not is_locked(tmp_path)  # no lock file yet
    with RunLock(tmp_path):
        assert is_locked(tmp_path)
        with pytest.raises(RunDirError, match=rf"in use by another ormo process \(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not is_locked(tmp_path)
    RunLock(tmp_path).acquire().release()  # free again


def test_a_second_train_on_a_held_directory_is_a_one_line_error(tmp_path, capsys):
    _, d = _run(tmp_path)
    _unfinish(d)
    with RunLock(d):  # stands for another process running this directory (flock conflicts across open files)
        assert main(["train", "--resume", str(d), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"(pid {os.getpid()}" in err and err.startswith("ormo train: error: run dir")
        assert main(["train", _cfg_file(tmp_path), "--run-dir", str(d), "--quiet", *_sets(TINY)]) == 1
        assert f"in use by another ormo process (pid {os.getpid()}" in capsys.readouterr().err
    assert read_run_info(d)["status"] == "interrupted"  # untouched by the refused commands


def test_a_running_run_whose_lock_is_free_is_reported_stopped(tmp_path):
    _, d = _run(tmp_path)
    info = read_run_info(d)
    info["status"] = "running"
    write_json(d / "run.json", info)
    assert read_run(d).status == "stopped"  # killed: nobody holds the lock
    with RunLock(d):
        assert read_run(d).status == "running"


def test_sigterm_exits_143_with_a_checkpoint_and_a_second_writer_is_refused_while_it_runs(tmp_path, capsys):
    d = tmp_path / "run"
    overrides = [*TINY, "data.subset=1400", "train.epochs=200", "train.checkpoint_every=0.5"]
    cmd = [sys.executable, "-m", "ormo", "train", _cfg_file(tmp_path), "--run-dir", str(d), "--quiet",
           *_sets(overrides)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (d / CHECKPOINT).exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    assert is_locked(d) and read_run(d).status == "running"
    assert main(["train", "--resume", str(d), "--quiet"]) == 1
    assert f"(pid {proc.pid}: " in capsys.readouterr().err
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("ormo train: stopped at iteration ") and "by SIGTERM; checkpoint written; " \
        f"`ormo train --resume {d}` continues" in lines[-1]
    t = int(lines[-1].split("iteration ")[1].split()[0])
    ckpt = torch.load(d / CHECKPOINT, weights_only=True)
    assert ckpt["t"] == t and read_run_info(d)["status"] == "interrupted" and not is_locked(d)
    assert out == b""  # no result JSON for a stopped run


def test_run_stopped_carries_the_signal_and_the_shell_exit_code():
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        e = RunStopped(signum, t=7, run_dir="runs/x")
        assert isinstance(e, KeyboardInterrupt) and e.exit_code == code and e.signum == signum
        assert str(e) == (f"stopped at iteration 7 by {signal.Signals(signum).name}; checkpoint written; "
                          "`ormo train --resume runs/x` continues")


# -- checkpoints say which config and code made them ------------------------------------------------------------------
def test_resume_with_an_edited_config_names_the_differing_lines(tmp_path):
    _, d = _run(tmp_path)
    _unfinish(d)
    text = (d / "config.toml").read_text()
    (d / "config.toml").write_text(text.replace("lr = 0.02", "lr = 0.05").replace("seed = 0", "seed = 1"))
    with pytest.raises(RunDirError) as e:
        train(None, d, resume=True, progress=False)
    assert str(e.value) == (f"{d / CHECKPOINT} was made by method.lr = 0.02, train.seed = 0 but config.toml says "
                            "method.lr = 0.05, train.seed = 1: restore config.toml, or delete checkpoint.pt to restart "
                            "the run from scratch")
    (d / "config.toml").write_text(text)  # restored: it continues
    assert train(None, d, resume=True, progress=False).final["iteration"] == 5


@pytest.mark.parametrize(("other", "differs"), [("method.name=asgd", "method.name"),
                                                ("train.num_workers=2", "train.num_workers")])
def test_a_checkpoint_copied_from_another_run_is_refused(tmp_path, other, differs):
    _, d = _run(tmp_path)
    _, elsewhere = _run(tmp_path, "other", [other])
    _unfinish(d)
    (d / CHECKPOINT).write_bytes((elsewhere / CHECKPOINT).read_bytes())
    with pytest.raises(RunDirError, match=rf"was made by .*{differs} = .* but config.toml says .*{differs} = "):
        train(None, d, resume=True, progress=False)


def test_a_checkpoint_of_other_numerics_is_refused(tmp_path, monkeypatch):
    _, d = _run(tmp_path)
    _unfinish(d)
    monkeypatch.setattr(rundir_mod, "CODE_VERSION", {"rules": 2, "engine": 1})
    with pytest.raises(RunDirError, match="made by ormo code version rules=1, engine=1, this ormo is rules=2, "
                                          "engine=1"):
        train(None, d, resume=True, progress=False)


def test_a_checkpoint_that_does_not_fit_the_model_is_a_one_line_error(tmp_path):
    _, d = _run(tmp_path)
    _unfinish(d)
    ckpt = torch.load(d / CHECKPOINT, weights_only=True)
    ckpt["sim"]["worker_states"] = ckpt["sim"]["worker_states"][:1]  # edited by hand: the stamp still matches
    torch.save(ckpt, d / CHECKPOINT)
    with pytest.raises(RunDirError, match=r"checkpoint.pt does not fit this run \(ConfigError: the state has "
                                          r"worker_states of other than num_workers = 4 entries.*delete "
                                          r"checkpoint.pt to restart"):
        train(None, d, resume=True, progress=False)


def _set(path):
    def edit(ckpt, value):
        *parents, last = path
        for k in parents:
            ckpt = ckpt[k]
        ckpt[last] = value(ckpt[last]) if callable(value) else value
    return edit


@pytest.mark.parametrize(("path", "value", "says"), [
    # an adversarial read: these were loaded (a dtype cast silently by copy_) or failed in the loop with a traceback
    (["sim", "rule_state", "params"], lambda p: p.double(), r"params is a float64 tensor of shape \(\d+,\), this "
                                                            r"rule's is a float32 tensor"),
    (["sim", "rule_state", "params"], lambda p: p.long(), "params is a int64 tensor"),
    (["sim", "rule_state", "momentum"], lambda p: p[:-1], r"momentum is a float32 tensor of shape \(\d+,\)"),
    (["sim", "rule_state", "params"], lambda p: p.tolist(), "params is a list, this rule's is a float32 tensor"),
    (["sim", "rule_state", "group"], "x", "group is 'x', this rule's is a number"),
    (["sim", "dispatch_time"], [0.0], "dispatch_time of other than num_workers = 4 entries"),
    (["sim", "source", "heap"], lambda h: [(a, b, 99) for a, b, _ in h], r"pending arrivals naming workers outside "
                                                                         r"\[0, 4\)"),
    (["sim", "source", "heap"], [], r"pending arrivals \(0\) and waiting workers \(0\) do not name each of the "
                                    r"num_workers = 4 workers once"),
    (["sim", "source", "heap"], lambda h: [*h, h[0]], r"pending arrivals \(5\) and waiting workers \(0\)"),
    (["sim", "waiting"], [[0, 0.5]], r"pending arrivals \(4\) and waiting workers \(1\)"),
    (["sim", "t"], "5", "the state has t = '5'"),
    (["sim", "now"], float("nan"), "now = nan"),
])
def test_a_checkpoint_edited_by_hand_is_a_one_line_error_not_a_cast_or_a_traceback(tmp_path, path, value, says):
    _, d = _run(tmp_path)
    _unfinish(d)
    ckpt = torch.load(d / CHECKPOINT, weights_only=True)
    _set(path)(ckpt, value)
    torch.save(ckpt, d / CHECKPOINT)
    with pytest.raises(RunDirError, match=rf"checkpoint.pt does not fit this run \(ConfigError: .*{says}.*delete "
                                          r"checkpoint.pt to restart") as e:
        train(None, d, resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_a_checkpoint_is_plain_data_and_resumes_bit_identically_for_every_rule():
    problem = Quadratic(seed=3, dtype=torch.float32)

    def build(name):
        return Simulator(ormo.make_rule(name), problem.w0, problem.grad_fn, num_workers=3, num_iterations=30, seed=1,
                         timing=SlowFraction(fraction=0.5, slowdown=3.0))

    for name in ormo.rule_names():
        full = build(name).run(30).result()
        buf = io.BytesIO()
        torch.save(plain(build(name).run(11).state_dict()), buf)
        buf.seek(0)
        second = build(name)
        second.load_state_dict(torch.load(buf, weights_only=True))
        res = second.run(30).result()
        assert torch.equal(res.params, full.params) and res.events == full.events, name


# -- files from disk are data ----------------------------------------------------------------------------------------
class _Planted:
    """Unpickling this creates a file: the stand-in for code a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the bare pickle below
def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"version": 2, "payload": _Planted(marker)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # the probe works: an unsafe load runs it
    assert marker.exists()
    marker.unlink()

    _, d = _run(tmp_path)
    _unfinish(d)
    (d / CHECKPOINT).write_bytes((tmp_path / "probe.pt").read_bytes())
    with pytest.raises(RunDirError) as e:
        train(None, d, resume=True, progress=False)
    assert not marker.exists()
    assert str(e.value) == (f"{d / CHECKPOINT} cannot be loaded: it holds objects other than tensors and plain data "
                            "(refused: loading it could run code); delete checkpoint.pt to restart the run from "
                            "scratch")
    with open(d / "final.pt", "wb") as f:  # a bare pickle, not torch's zip format, is refused too
        pickle.dump({"params": _Planted(marker)}, f)
    with pytest.raises(RunDirError, match="final.pt cannot be loaded: corrupt, truncated, or not a checkpoint"):
        replay(d)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "text"])
def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, capsys, damage):
    _, d = _run(tmp_path)
    _unfinish(d)
    data = (d / CHECKPOINT).read_bytes()
    (d / CHECKPOINT).write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                                  "garbage": b"\x00not a checkpoint" * 10, "text": b"garbage\n"}[damage])
    assert main(["train", "--resume", str(d), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ormo train: error: {d / CHECKPOINT} ")
    assert err.rstrip().endswith("delete checkpoint.pt to restart the run from scratch")
    assert ("is empty" in err) == (damage == "empty")
    assert ("corrupt, truncated, or not a checkpoint" in err) == (damage != "empty") and "run code" not in err
    assert read_run_info(d)["status"] == "interrupted"  # a refused resume changes nothing in the run


# -- file-system failures are one line and lose nothing ---------------------------------------------------------------
def test_a_full_disk_while_checkpointing_is_one_line_and_resume_then_finishes_cleanly(tmp_path, capsys, monkeypatch):
    real_replace = os.replace

    def full_disk(src, dst, *a, **kw):
        if str(dst).endswith("checkpoint.pt") and read_run_info(d).get("status") == "running":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *a, **kw)

    d = tmp_path / "run"
    monkeypatch.setattr(os, "replace", full_disk)
    assert main(["train", _cfg_file(tmp_path), "--run-dir", str(d), "--quiet", *_sets(TINY)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"ormo train: error: {d / CHECKPOINT}: No space left on device; free some space on that disk " \
                      "(or choose another folder)"
    assert "Traceback" not in "\n".join(err) and not list(d.glob("*.tmp")) and not is_locked(d)
    info = read_run_info(d)
    assert info["status"] == "failed" and "No space left on device" in info["error"]
    monkeypatch.setattr(os, "replace", real_replace)  # space freed
    assert main(["train", "--resume", str(d), "--quiet"]) == 0
    info = read_run_info(d)
    assert info["status"] == "finished" and "error" not in info


def test_a_write_cut_short_leaves_no_tmp_file(tmp_path, monkeypatch):
    real_open = open

    def half_then_full(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)

        class Writer:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

        return Writer()

    monkeypatch.setattr(rundir_mod, "open", half_then_full, raising=False)
    with pytest.raises(RunDirError, match=r"x.json: No space left on device; free some space"):
        write_json(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        EventLog({"rule": "x"}).save(tmp_path / "events.jsonl")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["run-dir is a file", "parent is a file", "permission denied"])
def test_unusable_run_directories_are_one_line_errors(tmp_path, capsys, monkeypatch, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    run_dir = {"run-dir is a file": blocker, "parent is a file": blocker / "run",
               "permission denied": tmp_path / "ro" / "run"}[case]
    if case == "permission denied":  # simulated: the tests may run as root, who may write anywhere
        def denied(self, *a, **kw):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        monkeypatch.setattr(Path, "mkdir", denied)
    assert main(["train", _cfg_file(tmp_path), "--run-dir", str(run_dir), "--quiet", *_sets(TINY)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == {
        "run-dir is a file": f"ormo train: error: run directory {blocker} is a file, not a folder: choose another "
                             "--run-dir",
        "parent is a file": f"ormo train: error: cannot create run directory {run_dir}: {run_dir}: Not a directory; "
                            "a part of that path is a file, not a folder: choose another folder",
        "permission denied": f"ormo train: error: cannot create run directory {run_dir}: {run_dir}: Permission "
                             "denied; choose a folder you can write to (or fix its permissions)",
    }[case]
    assert blocker.read_text() == "x"


# -- replay checks its inputs -----------------------------------------------------------------------------------------
def _edit_events(d: Path, edit) -> Path:
    path = d / "events.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def test_replay_refuses_an_out_of_range_worker_a_malformed_field_and_a_truncated_log(tmp_path, capsys):
    _, d = _run(tmp_path)
    good = (d / "events.jsonl").read_text()

    def worker_99(lines):
        rec = json.loads(lines[4])
        rec["worker"] = 99
        return [*lines[:4], json.dumps(rec), *lines[5:]]

    path = _edit_events(d, worker_99)
    with pytest.raises(EventLogError, match=rf"^{path}:5: worker=99 is out of range: the run has train.num_workers = 4 "
                                            r"\(workers 0 to 3\)$"):
        replay(d)
    path.write_text(good.replace('"sim_time": ', '"sim_time": "soon", "x": ', 1))
    with pytest.raises(EventLogError, match=rf"^{path}:2: bad event record"):
        replay(d)
    path.write_text(good)
    _edit_events(d, lambda lines: lines[:-3])
    assert main(["replay", str(d)]) == 1
    err = capsys.readouterr().err
    assert f"{path} is truncated: it holds 2 events, but the run made 5 iterations (run.json's summary)" in err
    extra = json.loads(good.splitlines()[-1])
    extra.update(t=extra["t"] + 1, delay=extra["delay"] + 1)
    path.write_text(good + json.dumps(extra) + "\n")  # one event more than the run made
    assert main(["replay", str(d)]) == 1
    err = capsys.readouterr().err
    assert f"{path} holds 6 events, but the run made 5 iterations (run.json's summary): the lines after line 6" in err
    for key, value, shown in (("rule", "asgd", '"asgd"'), ("seed", 7, "7")):  # a log copied from another run
        header = json.loads(good.splitlines()[0])
        header["meta"][key] = value
        path.write_text("\n".join([json.dumps(header), *good.splitlines()[1:]]) + "\n")
        with pytest.raises(EventLogError, match=rf"^{path}:1: its header says {key} = {shown}, but config.toml says "):
            replay(d)
    for batch in ("x", -3, 1.5, True):  # a hand-edited header: was a ValueError naming no file
        header = json.loads(good.splitlines()[0])
        header["meta"]["batch"] = batch
        path.write_text("\n".join([json.dumps(header), *good.splitlines()[1:]]) + "\n")
        with pytest.raises(EventLogError, match=rf"^{path}:1: its header says batch = {re.escape(json.dumps(batch))}, "
                                                r"not a number of messages \(an integer >= 0\)"):
            replay(d)
    path.write_text(good)
    assert replay(d)["bit_identical"]  # the untouched log replays exactly


@pytest.mark.parametrize("threads", [[2], "abc", -3, 1.5, 10**9])
def test_replay_refuses_a_hand_edited_thread_count_in_one_line(tmp_path, capsys, threads):
    # an adversarial read: a list was a TypeError traceback, 10**9 aborted the process inside libgomp
    _, d = _run(tmp_path)
    write_json(d / "run.json", {**read_run_info(d), "threads": threads})
    assert main(["replay", str(d)]) == 1
    err = capsys.readouterr().err
    assert f"{d / 'run.json'} has threads = {json.dumps(threads)}, not a torch thread count" in err
    assert "restore the value the run recorded" in err and len(err.strip().splitlines()) == 1


# -- honest divergence ------------------------------------------------------------------------------------------------
def test_a_diverged_run_prints_valid_json_and_one_stderr_line(tmp_path, capsys):
    d = tmp_path / "run"
    args = ["train", _cfg_file(tmp_path), "--run-dir", str(d), "--quiet",
            *_sets([*TINY, "method.name=naive-asgdm", "method.lr=1e20"])]
    assert main(args) == 0
    out, err = capsys.readouterr()

    def no_nan(token):
        raise AssertionError(f"{token} in stdout")

    result = json.loads(out, parse_constant=no_nan)
    assert result["status"] == "diverged" and result["train_loss"] is None and result["run_dir"] == str(d)
    line = err.strip().splitlines()[-1]
    assert line.startswith("ormo train: run diverged at iteration ") and " (worker " in line
    assert line.endswith("; the run directory records it") and "NaN/Inf" in line
    assert main(["train", _cfg_file(tmp_path), "--run-dir", str(tmp_path / "ok"), "--quiet", *_sets(TINY)]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "finished"


# -- warnings for legal nonsense --------------------------------------------------------------------------------------
def test_warnings_for_a_batch_larger_than_the_data_and_more_workers_than_messages(tmp_path):
    with pytest.warns(UserWarning, match=r"data.batch_size = 64 is larger than the training set \(40 examples\): "
                                         r"one message is 1.6 epochs"):
        train(load_config(None, [*TINY, "data.subset=40", "data.batch_size=64", "train.num_workers=1"]),
              tmp_path / "a", progress=False)
    with pytest.warns(UserWarning, match=r"train.num_workers = 4 is larger than the number of messages in the run "
                                         r"\(1\): at least 3 workers never report"):
        train(load_config(None, [*TINY, "train.epochs=0.1"]), tmp_path / "b", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(load_config(None, TINY), tmp_path / "c", progress=False)  # a sensible size: silent


def test_epochs_whose_message_count_overflows_are_one_line_before_any_file(tmp_path, capsys):
    # an adversarial read: train.epochs = 1e308 passed the config's check, then OverflowError (a traceback) after
    # run.json was written as running
    d = tmp_path / "run"
    assert main(["train", _cfg_file(tmp_path), *_sets([*TINY, "train.epochs=1e308"]), "--run-dir", str(d),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "invalid train.epochs: 1e+308" in err and "choose fewer epochs" in err and "Traceback" not in err
    assert not d.exists()


# -- the last evaluation is taken once ---------------------------------------------------------------------------------
def _marks_as_before(every, per_epoch, total):
    """The marks as a loop over every interval computed them (slow for tiny intervals: the reference)."""
    interval = every * per_epoch
    marks, k = {total}, 1
    while (t := round(k * interval)) < total:
        if t > 0 and total - t >= interval / 2:
            marks.add(t)
        k += 1
    return marks


@settings(max_examples=300)
@given(every=st.floats(0.001, 20.0), per_epoch=st.floats(0.5, 1000.0), total=st.integers(1, 3000))
def test_marks_are_those_of_the_loop_and_answer_at_once(every, per_epoch, total):
    marks = iteration_marks(every, per_epoch, total)
    expected = _marks_as_before(every, per_epoch, total)
    assert list(marks) == sorted(expected)
    assert {t for t in range(-1, total + 3) if t in marks} == expected


def test_tiny_intervals_and_huge_runs_cost_nothing_to_plan():
    # an adversarial read: eval_every = 1e-9 looped ~2e8 times before the first message, deaf to SIGTERM
    marks = iteration_marks(1e-9, 45.0, 10**18)
    assert 1 in marks and 10**18 - 1 in marks and 10**18 in marks and 0 not in marks
    assert 10**6 + 3 in iteration_marks(1.0, 1.0, 10**18) and 2.5 not in marks


def test_an_interval_past_the_end_marks_only_the_end_even_when_it_overflows():
    # an adversarial read: train.eval_every = 1e307 at 45 messages an epoch is an interval of inf, and listing the
    # marks (as a Ray run does) raised OverflowError
    for every in (1e307, 1e300, 3.0):
        marks = iteration_marks(every, 45.0, 90)
        assert list(marks) == [90] and 90 in marks and 45 not in marks


def test_no_periodic_mark_within_half_an_interval_of_the_end():
    # 10.3 messages an epoch, every 0.5 epochs, one epoch: round(10.3) = 10 is one message before the end (11)
    assert iteration_marks(0.5, 10.3, 11) == {5, 11}
    assert iteration_marks(0.5, 20.0, 40) == {10, 20, 30, 40}  # marks that divide the run are all kept
    assert iteration_marks(0.25, 10.0, 10) == {2, 5, 8, 10}  # 8 is 2 messages (>= half of 2.5) before the end
    assert iteration_marks(1.0, 4.0, 1) == {1}


def test_a_curve_ends_with_one_evaluation(tmp_path):
    # 165 examples / 16 = 10.3125 messages an epoch: the run ends at 11, the 1-epoch mark would be 10
    res, _ = _run(tmp_path, extra=["data.subset=165", "train.epochs=1", "train.eval_every=0.5"])
    assert [r["iteration"] for r in res.metrics] == [0, 5, 11]


# -- --print-config ---------------------------------------------------------------------------------------------------
def test_print_config_prints_the_resolved_toml_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", _cfg_file(tmp_path), "--set", "method.lr=0.3", "--set", "model.name=mlp",
                 "--print-config"]) == 0
    text = capsys.readouterr().out
    assert tomllib.loads(text)["method"]["lr"] == 0.3
    (tmp_path / "printed.toml").write_text(text)
    assert load_config(tmp_path / "printed.toml") == load_config(None, ["name=t", "method.lr=0.3", "model.name=mlp"])
    assert not (tmp_path / "runs").exists()


def test_numpy_state_is_saved_as_tensors_and_read_back_exactly():
    state = {"a": np.array([1.5, np.nan]), "b": [np.int64(3), (np.float64(0.25), None)], "c": torch.ones(2)}
    out = plain(state)
    assert isinstance(out["a"], torch.Tensor) and out["b"] == [3, (0.25, None)] and type(out["b"][0]) is int
    np.testing.assert_array_equal(np.asarray(out["a"]), state["a"])
    state["a"][0] = 9.0  # a copy: later writes to the array do not reach the checkpoint
    assert out["a"][0] == 1.5


_CHECKPOINT_MEMORY = r"""
import sys, torch
from ormo import make_rule
from ormo.engine import Simulator
from ormo.experiment.rundir import save_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

K, P = 32, 2_000_000  # 256 MB of worker snapshots: the part that grows with K
g = torch.full((P,), 1e-3)
sim = Simulator(make_rule("ormo", lr=0.1, momentum=0.9), torch.zeros(P), lambda x, w, i, s: g, num_workers=K,
                num_iterations=10 * K, seed=0)
for _ in range(3 * K):  # every worker now owns its snapshot buffer
    sim.step()
steady = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
save_checkpoint(sys.argv[1], {"engine": "simulator", "sim": sim.state_dict(copy=False)}, config_toml="x")
print(steady, status("VmHWM:"))
"""


def test_a_checkpoint_costs_no_second_copy_of_the_state(tmp_path):
    """Issue 10: a checkpoint streams the live state to disk (no clone of the K snapshots, no serialized copy in
    memory): the peak memory while writing it stays within 1.1x the steady state."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    out = subprocess.run([sys.executable, "-c", _CHECKPOINT_MEMORY, str(tmp_path / "c.pt")], capture_output=True,
                         text=True, check=True).stdout.split()
    steady, peak = int(out[0]), int(out[1])
    assert steady > 256e6 and peak <= 1.1 * steady, (steady / 1e6, peak / 1e6)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ckpt["sim"]["t"] == 96 and len(ckpt["sim"]["snapshots"]) == 32


def test_a_file_size_limit_is_one_line_with_what_to_do(tmp_path):
    # an adversarial read: under `ulimit -f` the error said "File too large" and nothing more
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    d = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "ormo", "train", _cfg_file(tmp_path), *_sets(TINY), "--run-dir", str(d),
                          "--quiet"], capture_output=True, text=True, preexec_fn=small_files)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"ormo train: error: {d / CHECKPOINT}: File too large; raise the file-size limit (`ulimit -f`)" \
        in out.stderr
    assert read_run_info(d)["status"] == "failed" and not list(d.glob("*.tmp"))


@pytest.mark.parametrize("limit", [100, 5000, 1_000_000])
def test_a_disk_that_fills_while_a_checkpoint_streams_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch, limit):
    """The review's case: torch's zip writer turns a failed write into its own RuntimeError at the end of the file;
    it is still the disk's one-line error, the .tmp is gone and the previous checkpoint is intact."""
    import io

    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"x": torch.ones(3)}, config_toml="c")
    before = path.read_bytes()

    class Full(io.FileIO):
        written = 0

        def write(self, b):
            if Full.written + len(b) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            Full.written += len(b)
            return super().write(b)

    monkeypatch.setattr(rundir_mod, "open", lambda p, m: io.BufferedWriter(Full(p, "wb")), raising=False)
    with pytest.raises(RunDirError, match=r"checkpoint.pt: No space left on device; free some space"):
        save_checkpoint(path, {"x": torch.zeros(2_000_000), "y": torch.ones(1000)}, config_toml="c")
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_config_differences_are_named_briefly():
    from ormo.experiment import load_config
    from ormo.experiment.config import to_toml
    from ormo.experiment.rundir import config_diff

    base = to_toml(load_config(None, ["method.lr=0.1"]))
    assert config_diff("this is [not toml", base) == ("a config that is not valid TOML", "a valid config")
    many = to_toml(load_config(None, ["method.lr=0.2", "train.epochs=3", "train.seed=4", "train.num_workers=5",
                                      "data.batch_size=7", "train.eval_every=2", "train.checkpoint_every=3",
                                      "train.channels_last=true"]))
    made_by, says = config_diff(base, many)
    assert made_by.endswith("and 2 more settings") and made_by.count(" = ") == 6 and len(made_by) < 300
    assert config_diff(base, base.replace("channels_last = false\n", "")) == ("", "")  # absent = the default


def test_resuming_a_run_whose_run_json_is_gone_says_what_to_do(tmp_path):
    cfg = load_config(None, ["data.name=synthetic", "data.options.train_size=64", "data.options.test_size=16",
                             "data.options.image_shape=[1, 4, 4]", "data.batch_size=8", "train.num_workers=2",
                             "model.name=mlp", "train.epochs=0.25"])
    train(cfg, tmp_path / "r", progress=False)
    (tmp_path / "r" / "run.json").unlink()
    with pytest.raises(ormo.ConfigError, match=r"its run.json is missing \(config.toml is there\); restore run.json, "
                                               r"or delete the directory"):
        train(None, tmp_path / "r", resume=True, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_a_cuda_device_without_cuda_is_one_line_naming_the_fix(tmp_path):
    cfg = load_config(None, ["data.name=synthetic", "data.options.train_size=64", "data.options.test_size=16",
                             "data.options.image_shape=[1, 4, 4]", "model.name=mlp", "train.device='cuda'"])
    with pytest.raises(ormo.ConfigError, match=r"invalid train.device: 'cuda' \(CUDA is not available on this "
                                               r"machine\); set train.device = \"cpu\""):
        train(cfg, tmp_path / "r", progress=False)


def test_a_checkpoint_continues_at_another_ray_address_but_not_under_another_setting(tmp_path):
    from ormo.experiment import load_config, to_toml
    from ormo.experiment.rundir import CheckpointRefused, load_checkpoint, save_checkpoint

    made = to_toml(load_config(None, ['ray.address="10.0.0.5:6379"']))
    save_checkpoint(tmp_path / "checkpoint.pt", {"t": 3}, config_toml=made)
    moved = to_toml(load_config(None, ['ray.address="10.0.0.9:6379"']))
    assert load_checkpoint(tmp_path, config_toml=moved, engine="simulator")["t"] == 3
    other = to_toml(load_config(None, ['ray.address="10.0.0.9:6379"', "method.lr=0.5"]))
    with pytest.raises(CheckpointRefused, match=r"method.lr = 0.5") as info:
        load_checkpoint(tmp_path, config_toml=other, engine="simulator")
    assert "ray.address" not in str(info.value)


def test_a_stop_before_any_checkpoint_says_the_resume_starts_over(tmp_path):
    from ormo.experiment.runloop import RunStopped

    assert str(RunStopped(2, run_dir=tmp_path)) == (f"stopped by SIGINT before the first checkpoint; `ormo train "
                                                    f"--resume {tmp_path}` starts the run over")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert "the last checkpoint is kept" in str(RunStopped(15, run_dir=tmp_path))
    assert str(RunStopped(2, t=7, run_dir=tmp_path)).startswith("stopped at iteration 7 by SIGINT; checkpoint written")


def test_a_folder_in_the_way_of_a_file_or_of_its_temporary_name_is_named(tmp_path):
    from ormo.experiment.rundir import RunDirError

    (tmp_path / "a.json").mkdir()
    (tmp_path / "b.json.tmp").mkdir()
    with pytest.raises(RunDirError, match=r"a\.json: Is a directory; a folder of that name is in the way"):
        write_json(tmp_path / "a.json", {})
    with pytest.raises(RunDirError, match=r"b\.json\.tmp: Is a directory; a folder of that name is in the way"):
        write_json(tmp_path / "b.json", {})
    assert (tmp_path / "a.json").is_dir() and (tmp_path / "b.json.tmp").is_dir()  # nothing of the user's removed
