"""Deferred checks (``defer_checks`` / ``train.deferred_checks``): no host read per message, the same results.

* The NaN/Inf checks fold into a device-side record and the message losses stay on the device; both are read at an
  evaluation or a checkpoint. Nothing else changes: every rule gives bit-identical events and parameters.
* The hot path reads nothing from the device: here every way a tensor's value reaches Python is made to fail while
  the iterations run (on a CPU; the CUDA test below checks the same with CUDA's own sync detector).
* A NaN/Inf found at a read-out names the first iteration that met it; ``ormo train`` then runs the iterations since
  the last checkpoint again, checking each message, and ends exactly as a run checking each message ends.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import SYNTH, Quadratic, roundtrip, rule_with_local_steps, stopping_interrupt

import ormo
from ormo.engine import Simulator
from ormo.engine.simulator import NonFiniteError
from ormo.engine.timing import SlowFraction
from ormo.experiment import load_config, train
from ormo.experiment.problem import TrainProblem
from ormo.experiment.run import _PendingLosses, resolve_deferred

pytestmark = pytest.mark.filterwarnings("ignore::ormo.GrowthWarning")  # the diverging runs warn first, as they should

RULES = ormo.rule_names()
_rule = rule_with_local_steps


# ----------------------------------------------------------------------------------------------------------------
# the engine


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("batch", [0, 3])
def test_deferred_checks_change_nothing(name, batch):
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    kw = {"num_workers": 5, "num_iterations": 60, "timing": SlowFraction(fraction=0.4, slowdown=3.0), "seed": 4,
          "batch": batch}
    one = ormo.simulate(_rule(name), problem.w0, problem.grad_fn, **kw)
    deferred = ormo.simulate(_rule(name), problem.w0, problem.grad_fn, defer_checks=True, **kw)
    assert deferred.events == one.events
    assert torch.equal(deferred.params, one.params)


def _nan_at(problem, worker, index, step=0, value=float("nan")):
    def grad_fn(x, w, i, s):
        g = problem.grad_fn(x, w, i, s)
        if w == worker and i >= index and s == step:  # from that index on (a sync round's index is a multiple of K)
            g = g.clone()
            g[1] = value
        return g
    return grad_fn


@pytest.mark.parametrize("name", ["ormo", "orlomo", "asgd", "prsgdm"])
@pytest.mark.parametrize("batch", [0, 3])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_gradient_is_named_at_the_read_out_as_a_check_per_message_names_it(name, batch, value):
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    rule = _rule(name)
    step = 1 if rule.local_steps > 1 else 0
    grad_fn = _nan_at(problem, 2, 17, step, value)
    kw = {"num_workers": 4, "num_iterations": 60, "seed": 1, "batch": batch}
    with pytest.raises(NonFiniteError) as strict:
        ormo.simulate(_rule(name), problem.w0, grad_fn, **kw)
    with pytest.raises(NonFiniteError) as deferred:
        ormo.simulate(_rule(name), problem.w0, grad_fn, defer_checks=True, **kw)
    assert (deferred.value.t, deferred.value.worker, deferred.value.index) == (
        strict.value.t, strict.value.worker, strict.value.index)
    if not batch:  # read at the end: the parameters went on past it
        assert f"t={strict.value.t}" in str(deferred.value) and "after iteration 59" in str(deferred.value)
        assert not torch.isfinite(deferred.value.partial.params).all()


def test_overflowing_parameters_are_named_at_the_iteration_that_made_them():
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)

    def grad_fn(x, w, i, s):
        g = problem.grad_fn(x, w, i, s)
        return torch.full_like(g, 3e38) if i == 9 else g  # finite, but the step overflows the parameters

    kw = {"num_workers": 3, "num_iterations": 40, "seed": 0}
    with pytest.raises(NonFiniteError, match="server parameters became NaN/Inf") as strict:
        ormo.simulate(ormo.make_rule("asgd", lr=2.0), problem.w0, grad_fn, **kw)
    with pytest.raises(NonFiniteError, match="server parameters .* after applying it") as deferred:
        ormo.simulate(ormo.make_rule("asgd", lr=2.0), problem.w0, grad_fn, defer_checks=True, **kw)
    assert (deferred.value.t, deferred.value.worker) == (strict.value.t, strict.value.worker)


def test_a_local_message_that_overflows_is_named_too():
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)

    def grad_fn(x, w, i, s):  # each local gradient finite; their sum overflows the local parameters
        return torch.full_like(x, -3e38) if i == 5 else problem.grad_fn(x, w, i, s)

    rule = lambda: ormo.make_rule("orlomo", local_steps=3, local_lr=1.0)  # noqa: E731
    kw = {"num_workers": 3, "num_iterations": 30, "seed": 0}
    with pytest.raises(NonFiniteError) as strict:
        ormo.simulate(rule(), problem.w0, grad_fn, **kw)
    assert "message" in str(strict.value)
    with pytest.raises(NonFiniteError, match="its message was not finite") as deferred:
        ormo.simulate(rule(), problem.w0, grad_fn, defer_checks=True, **kw)
    assert (deferred.value.t, deferred.value.worker) == (strict.value.t, strict.value.worker)


def test_a_state_saved_with_a_failure_noted_keeps_it():
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    grad_fn = _nan_at(problem, 1, 4)
    make = lambda: Simulator(ormo.make_rule("ormo"), problem.w0, grad_fn, num_workers=3, num_iterations=30,  # noqa: E731
                             seed=0, defer_checks=True)
    sim = make()
    for _ in range(20):
        sim.step()
    saved = sim.state_dict()
    other = make()
    other.load_state_dict(saved)
    with pytest.raises(NonFiniteError) as err:
        other.flush_checks()
    assert err.value.worker == 1 and err.value.index == 4
    strict = Simulator(ormo.make_rule("ormo"), problem.w0, grad_fn, num_workers=3, num_iterations=30, seed=0)
    with pytest.raises(ormo.ConfigError, match=f"NaN/Inf at server iteration t={err.value.t} .*Load a state saved "
                                               f"before"):
        strict.load_state_dict(saved)  # it would go on from parameters past the NaN and name a later iteration
    assert strict.t == 0  # refused before anything was loaded
    with pytest.raises(ormo.ConfigError, match="defer_checks"):
        Simulator(ormo.make_rule("ormo"), problem.w0, grad_fn, num_workers=3, defer_checks="yes")


@pytest.mark.parametrize("name", ["ormo", "asgd", "orlomo"])
def test_a_batched_state_with_a_bad_message_computed_ahead_resumes_to_the_same_error(name):
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    step = 1 if _rule(name).local_steps > 1 else 0
    bad: list[tuple[int, int]] = []

    def grad_fn(x, w, i, s):
        g = problem.grad_fn(x, w, i, s)
        return torch.full_like(g, float("nan")) if (w, i, s) == (*bad[0], step) else g

    make = lambda defer: Simulator(_rule(name), problem.w0, grad_fn, num_workers=4, num_iterations=60,  # noqa: E731
                                   seed=1, batch=4, defer_checks=defer)
    probe, stop = make(True), None
    bad.append((-1, -1))
    while stop is None:  # a message computed ahead and not consumed at the end of an iteration (t >= 5)
        probe.step()
        ahead = [w for w in probe.computed if probe.t >= 5]
        if ahead:
            bad[0], stop = (ahead[0], probe.snapshots[ahead[0]].index), probe.t
    with pytest.raises(NonFiniteError) as strict:
        make(False).run()
    deferred = make(True)
    while deferred.t < stop:
        deferred.step()
    assert deferred.t <= strict.value.t and strict.value.worker == bad[0][0]
    saved = roundtrip(deferred.state_dict())
    if step == 0:  # a one-step message carries its flag, unread
        assert saved["computed"][bad[0][0]]["bad_step"] == 0
    else:  # a local method reads its flags per lock-step round: the error is held, as checking each gradient does
        assert saved["computed"][bad[0][0]]["error"] == "NonFiniteError"
    again = make(False)  # as `ormo train` goes back to a checkpoint to check each message
    again.load_state_dict(saved)
    with pytest.raises(NonFiniteError) as resumed:
        again.run()
    assert str(resumed.value) == str(strict.value) and resumed.value.t == strict.value.t
    assert torch.equal(resumed.value.partial.params, strict.value.partial.params)
    still = make(True)
    still.load_state_dict(saved)
    with pytest.raises(NonFiniteError) as late:
        still.run()
    assert (late.value.t, late.value.worker) == (strict.value.t, strict.value.worker)


class _NoReads:
    """Every way a tensor's value reaches Python fails while this is active (a host read on a CUDA device)."""

    NAMES = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "__array__")

    def __init__(self, mp):
        self.mp, self.on = mp, False
        for attr in self.NAMES:
            original = getattr(torch.Tensor, attr)
            mp.setattr(torch.Tensor, attr, self._guard(attr, original))

    def _guard(self, attr, original):
        guard = self

        def read(tensor, *args, **kwargs):
            if guard.on:
                raise AssertionError(f"Tensor.{attr} read a value on the hot path")
            return original(tensor, *args, **kwargs)
        return read


@pytest.mark.parametrize("model,method,batch", [("resnet20", "ormo", 0), ("mlp", "orlomo", 0),
                                                ("resnet20", "ormo", 3), ("mlp", "asgd", 4)])
def test_the_hot_path_reads_nothing_from_the_device(model, method, batch):
    cfg = load_config(None, [*SYNTH, f"model.name={model}", f"method.name={method}", "method.local_steps=2",
                             "train.weight_decay=1e-4", "data.augment=true"])
    problem = TrainProblem(cfg)
    problem.defer_sync = True
    sim = Simulator(cfg.method.build(), problem.params0, problem.grad_fn, num_workers=4, num_iterations=40, seed=0,
                    defer_checks=True, batch=batch, grad_batch=problem.grad_batch if batch else None,
                    on_consume=problem.select_message if batch else None)
    losses = []
    with pytest.MonkeyPatch.context() as mp:
        guard = _NoReads(mp)
        guard.on = True
        for _ in range(12):
            sim.step()
            losses.append(problem.commit_message())
        guard.on = False
    sim.flush_checks()  # reads here, once
    assert all(isinstance(x, torch.Tensor) for x in losses) and np.isfinite(torch.stack(losses).tolist()).all()
    # the same guard catches the reads of a run that checks each message (so it can fail)
    problem.defer_sync = False
    sim.check_each_message()
    with pytest.MonkeyPatch.context() as mp:
        guard = _NoReads(mp)
        guard.on = True
        with pytest.raises(AssertionError, match="read a value on the hot path"):
            sim.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run it under the device tool)")
def test_on_cuda_the_hot_path_never_synchronizes():
    cfg = load_config(None, [*SYNTH, "model.name=resnet20", "data.augment=true", "train.device=cuda",
                             "train.weight_decay=1e-4"])
    problem = TrainProblem(cfg)
    problem.defer_sync = True
    sim = Simulator(cfg.method.build(), problem.params0, problem.grad_fn, num_workers=4, num_iterations=40, seed=0,
                    defer_checks=True)
    sim.step()  # warm-up (allocator, kernels)
    problem.commit_message()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            sim.step()
            problem.commit_message()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sim.flush_checks()


def test_pending_losses_are_written_in_order_across_compactions(monkeypatch):
    monkeypatch.setattr(_PendingLosses, "COMPACT", 3)
    pending, losses = _PendingLosses(), np.full(4, np.nan)
    for i in range(11):  # slots 0..3 written over and over: the last write of each wins
        pending.add(i % 4, torch.tensor(float(i), dtype=torch.float64))
    pending.write(losses)
    assert losses.tolist() == [8.0, 9.0, 10.0, 7.0]
    pending.write(losses)  # nothing pending: unchanged
    assert losses.tolist() == [8.0, 9.0, 10.0, 7.0]


# ----------------------------------------------------------------------------------------------------------------
# runs: the same files, and a diverged run ends as a run checking each message ends


def _same_runs(a, b):
    for name in ("metrics.jsonl", "events.jsonl"):
        assert (a / name).read_text() == (b / name).read_text(), name
    fa = torch.load(a / "final.pt", weights_only=True)
    fb = torch.load(b / "final.pt", weights_only=True)
    assert torch.equal(fa["params"], fb["params"])
    ja, jb = (json.loads((d / "run.json").read_text()) for d in (a, b))
    assert ja["diverged"] == jb["diverged"] and ja["summary"] == jb["summary"]
    return ja, jb


QUICK = ["train.epochs=4", "train.checkpoint_every=1.0"]


@pytest.mark.parametrize("lr,checkpoint_every,diverges", [(0.05, 1.0, False), (1.0, 1.0, True), (3.0, 10.0, True)])
def test_a_run_with_deferred_checks_is_the_run_checking_each_message(tmp_path, lr, checkpoint_every, diverges):
    args = ["train.epochs=4", f"train.checkpoint_every={checkpoint_every}", f"method.lr={lr}"]
    strict = train(load_config("preset:quickstart", [*args, "train.deferred_checks=false"]), tmp_path / "s",
                   progress=False)
    deferred = train(load_config("preset:quickstart", [*args, "train.deferred_checks=true"]), tmp_path / "d",
                     progress=False)
    assert (strict.diverged is not None) == diverges and deferred.diverged == strict.diverged
    _, jd = _same_runs(tmp_path / "s", tmp_path / "d")
    if diverges:  # found at a read-out, then run again from the last checkpoint (or w_0) checking each message
        assert jd["deferred_checks"]["on"] is False and "run again checking each message" in jd["deferred_checks"][
            "why"]
        assert jd["deferred_checks"]["rerun_from"] == (0 if checkpoint_every > 4 else 90)
    else:
        assert jd["deferred_checks"] == {"on": True, "why": "train.deferred_checks = true"}


@pytest.mark.parametrize("epochs", [0.5625, 2.0])
def test_a_nan_in_the_middle_of_a_batched_lockstep_leaves_the_batchmates_as_checking_each_gradient_does(
        tmp_path, monkeypatch, epochs):
    # A NaN at worker 1's first local step drops it from the lock-step (checking each gradient); its batchmates'
    # second round is then a batch of 2, whose ResNet20 rounding differs from a batch of 3. With 0.5625 epochs
    # that message is never consumed, with 2 it is (a divergence): both must end as the run that checks each one.
    original = TrainProblem.grad_batch

    def grad_batch(self, requests):
        grads = original(self, requests)
        return [torch.full_like(g, float("nan")) if (w, i, s) == (1, 5, 0) else g
                for g, (_, w, i, s) in zip(grads, requests, strict=True)]

    monkeypatch.setattr(TrainProblem, "grad_batch", grad_batch)
    args = [*SYNTH, "model.name=resnet20", "method.name=orlomo", "method.local_steps=2", f"train.epochs={epochs}",
            "train.checkpoint_every=0.1", "train.eval_every=0.5", "train.batch_workers=true", "train.batch_max=3"]
    strict = train(load_config(None, [*args, "train.deferred_checks=false"]), tmp_path / "s", progress=False)
    deferred = train(load_config(None, [*args, "train.deferred_checks=true"]), tmp_path / "d", progress=False)
    assert (strict.diverged is not None) == (epochs > 1) and deferred.diverged == strict.diverged
    _same_runs(tmp_path / "s", tmp_path / "d")


def test_a_kill_right_after_the_first_checkpoint_of_a_batched_deferred_run_resumes(tmp_path, monkeypatch):
    # the checkpoint at w_0 holds batch=N: run.json must say so before it exists, or a resume would refuse it
    from ormo.experiment import run as run_module

    class Killed(BaseException):
        pass

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Killed  # as SIGKILL: nothing after the save runs (run.json is not written on the way out)

    original = run_module.save_checkpoint
    monkeypatch.setattr(run_module, "save_checkpoint", save_then_die)
    args = [*SYNTH, "model.name=mlp", "train.epochs=0.5", "train.batch_workers=true", "train.batch_max=3",
            "train.deferred_checks=true"]
    cfg = load_config(None, args)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "k", progress=False)
    monkeypatch.setattr(run_module, "save_checkpoint", original)
    info = json.loads((tmp_path / "k" / "run.json").read_text())
    assert info["batch_workers"]["mode"] == "batched" and info["status"] == "running"
    resumed = train(None, tmp_path / "k", resume=True, progress=False)
    whole = train(cfg, tmp_path / "w", progress=False)
    assert torch.equal(resumed.params, whole.params)


def test_batched_and_deferred_diverges_as_batched_alone(tmp_path):
    args = [*SYNTH, "model.name=mlp", "method.name=orlomo", "method.local_steps=2", "method.lr=5.0",
            "method.local_lr=5.0", "train.epochs=3", "train.checkpoint_every=0.5", "train.batch_workers=true",
            "train.batch_max=3"]
    strict = train(load_config(None, [*args, "train.deferred_checks=false"]), tmp_path / "s", progress=False)
    train(load_config(None, [*args, "train.deferred_checks=true"]), tmp_path / "d", progress=False)
    assert strict.diverged is not None
    _same_runs(tmp_path / "s", tmp_path / "d")


def test_a_deferred_run_stopped_and_resumed_is_bit_identical(tmp_path):
    args = [*SYNTH, "model.name=resnet20", "method.name=ormo", "train.epochs=0.75", "train.checkpoint_every=0.25",
            "train.deferred_checks=true"]
    cfg = load_config(None, args)
    whole = train(cfg, tmp_path / "a", progress=False)
    from ormo.experiment import run as run_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "DeferredInterrupt", stopping_interrupt(run_module.DeferredInterrupt, 12))
        with pytest.raises(KeyboardInterrupt, match="stopped at iteration 7"):
            train(cfg, tmp_path / "c", progress=False)
    resumed = train(None, tmp_path / "c", resume=True, progress=False)
    assert torch.equal(resumed.params, whole.params)
    assert (tmp_path / "c" / "metrics.csv").read_text() == (tmp_path / "a" / "metrics.csv").read_text()


def test_the_setting_is_validated_and_auto_defers_on_cuda_only(tmp_path):
    for bad in ("'sometimes'", "1", "[true]"):
        with pytest.raises(ormo.ConfigError, match=r"train\.deferred_checks.*true, false or \"auto\""):
            load_config(None, [*SYNTH, f"train.deferred_checks={bad}"])
    assert resolve_deferred(load_config(None, SYNTH)) == {"on": False, "why": "auto: on a CPU a check costs no wait"}
    assert resolve_deferred(load_config(None, [*SYNTH, "train.device='cuda:1'"]))["on"] is True
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.epochs=0.1"])
    train(cfg, tmp_path / "r", progress=False)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["deferred_checks"]["on"] is False
