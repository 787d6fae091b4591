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
from ormo.engine.simulator import NonFiniteError, state_checks_sound
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
@pytest.mark.parametrize("setting", ["true", "'auto'"])  # the record; on a CPU "auto" checks the state at read-outs
def test_a_run_with_deferred_checks_is_the_run_checking_each_message(tmp_path, lr, checkpoint_every, diverges,
                                                                      setting):
    args = ["train.epochs=4", f"train.checkpoint_every={checkpoint_every}", f"method.lr={lr}"]
    strict = train(load_config("preset:quickstart", [*args, "train.deferred_checks=false"]), tmp_path / "s",
                   progress=False)
    deferred = train(load_config("preset:quickstart", [*args, f"train.deferred_checks={setting}"]), tmp_path / "d",
                     progress=False)
    assert (strict.diverged is not None) == diverges and deferred.diverged == strict.diverged
    _, jd = _same_runs(tmp_path / "s", tmp_path / "d")
    if diverges:  # found at a read-out, then run again from the last checkpoint (or w_0) checking each message
        assert jd["deferred_checks"]["on"] is False and "run again checking each message" in jd["deferred_checks"][
            "why"]
        assert jd["deferred_checks"]["rerun_from"] == (0 if checkpoint_every > 4 else 90)
        assert jd["deferred_checks"]["checks"] == ("record" if setting == "true" else "state")
    elif setting == "true":
        assert jd["deferred_checks"] == {"on": True, "checks": "record", "why": "train.deferred_checks = true"}
    else:
        assert jd["deferred_checks"]["on"] is True and jd["deferred_checks"]["checks"] == "state"


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
        mp.setattr(run_module, "DeferredInterrupt", stopping_interrupt(run_module.DeferredInterrupt, 6))
        with pytest.raises(KeyboardInterrupt, match="stopped at iteration 7"):
            train(cfg, tmp_path / "c", progress=False)
    resumed = train(None, tmp_path / "c", resume=True, progress=False)
    assert torch.equal(resumed.params, whole.params)
    assert (tmp_path / "c" / "metrics.csv").read_text() == (tmp_path / "a" / "metrics.csv").read_text()


def test_the_setting_is_validated_and_auto_picks_by_device_and_batching(tmp_path):
    for bad in ("'sometimes'", "1", "[true]"):
        with pytest.raises(ormo.ConfigError, match=r"train\.deferred_checks.*true, false or \"auto\""):
            load_config(None, [*SYNTH, f"train.deferred_checks={bad}"])
    cpu = load_config(None, SYNTH)
    assert resolve_deferred(cpu)["checks"] == "state"  # one at a time: the state at read-outs
    assert resolve_deferred(cpu, batched=True)["on"] is False  # batched: checked per batch, no wait on a CPU
    cuda = load_config(None, [*SYNTH, "train.device='cuda:1'"])
    assert resolve_deferred(cuda)["checks"] == resolve_deferred(cuda, batched=True)["checks"] == "record"
    assert resolve_deferred(load_config(None, [*SYNTH, "train.deferred_checks=false"])) == {
        "on": False, "why": "train.deferred_checks = false"}
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.epochs=0.1"])
    train(cfg, tmp_path / "r", progress=False)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["deferred_checks"]["on"] is True and info["deferred_checks"]["checks"] == "state"
    assert info["batch_workers"]["mode"] == "sequential"


@pytest.mark.parametrize("setting", ["true", "'auto'"])
def test_a_deferred_run_diverging_after_a_resume_is_the_run_checking_each_message(tmp_path, setting):
    # stopped before the divergence, resumed: the read-out that finds it goes back to a checkpoint of the resumed run
    args = ["train.epochs=4", "train.checkpoint_every=0.5", "method.lr=1.0"]
    strict = train(load_config("preset:quickstart", [*args, "train.deferred_checks=false"]), tmp_path / "s",
                   progress=False)
    assert strict.diverged is not None
    cfg = load_config("preset:quickstart", [*args, f"train.deferred_checks={setting}"])
    from ormo.experiment import run as run_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "DeferredInterrupt", stopping_interrupt(run_module.DeferredInterrupt, 15))
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "d", progress=False)
    resumed = train(None, tmp_path / "d", resume=True, progress=False)
    assert resumed.diverged == strict.diverged
    _same_runs(tmp_path / "s", tmp_path / "d")


# ----------------------------------------------------------------------------------------------------------------
# defer_checks="state": nothing checked per message, the state at each read-out (what "auto" does on a CPU)


def _faulty(problem, nth, step, value):
    """``problem.grad_fn``, except that its ``nth`` call at local step ``step`` returns ``value`` in one element
    (``"big"``: every element 3e38, finite, so the step overflows)."""
    calls = [0]

    def grad_fn(x, w, i, s):
        g = problem.grad_fn(x, w, i, s)
        if s == step:
            calls[0] += 1
            if calls[0] == nth:
                g = g.clone()
                if value == "big":
                    g.fill_(3e38)
                else:
                    g[1] = value
        return g
    return grad_fn


def _first_failures(rule, grad_fn_of, *, lr_schedule=None, K=4, T=36):
    """(the strict run's failure: (t, iterations it applied) or None, the first read-out after which the state
    check fails, reading after every iteration)."""
    strict = Simulator(rule(), QUAD.w0, grad_fn_of(), num_workers=K, num_iterations=T, seed=1, lr_schedule=lr_schedule)
    failed, n = None, 0
    try:
        while n < T:
            strict.step()
            n += 1
    except NonFiniteError as e:
        failed = (e.t, n)  # n: the iterations run before it (its own applied or not, as the check stops)
    sim = Simulator(rule(), QUAD.w0, grad_fn_of(), num_workers=K, num_iterations=T, seed=1, lr_schedule=lr_schedule,
                    defer_checks="state")
    for n in range(1, T + 1):
        sim.step()
        try:
            sim.flush_checks()
        except NonFiniteError as e:
            assert e.t == -1 and "names no iteration" in str(e)
            return failed, n
    return failed, None


QUAD = Quadratic(dim=6, seed=2, dtype=torch.float32)
_DROPS = {"delay_rule": "drop_above", "delay_threshold": 0.5}  # drops every message delayed more than K/2


@pytest.mark.parametrize("name,hp", [*((n, {}) for n in RULES),
                                     *((n, _DROPS) for n in ("da-asgd", "ormo-da", "local-ormo-da", "orlomo",
                                                             "al-sgd")),
                                     ("ormo-vanilla", {"step": "momentum_increment", "momentum": 0.0}),
                                     ("ormo", {"momentum": 0.0}), ("orlomo", {"momentum": 0.0})])
@pytest.mark.parametrize("zero_rate", [False, True])
def test_the_state_check_finds_every_failure_a_check_per_message_finds_by_the_next_read_out(name, hp, zero_rate):
    # Soundness of checking the state instead of each message: whatever the rule, a NaN, an Inf or a finite step
    # that overflows, at any iteration or local step, with the rate at 0 there (a warm-up from 0) or a message dropped
    # for its delay, is in the state right after the iteration where checking each message stops, never before.
    rule = lambda: _rule(name, **hp)  # noqa: E731
    zeros = {3, 4, 11, 12, 20, 21}
    schedule = (lambda t: 0.0 if t in zeros else 1.0) if zero_rate else None
    steps = sorted({0, rule().local_steps - 1})
    found = 0
    for value in (float("nan"), float("inf"), -float("inf"), "big"):
        for nth in (1, 4, 12, 21):
            for step in steps:
                failed, first = _first_failures(rule, lambda v=value, n=nth, s=step: _faulty(QUAD, n, s, v),
                                                lr_schedule=schedule)
                assert first == (None if failed is None else failed[1] + 1), (value, nth, step, failed)
                found += failed is not None
    assert found >= 12  # the faults did stop the runs that check each message


def test_rules_say_which_messages_they_ignore_and_the_nan_of_any_other_reaches_the_state():
    # Rule.ignores: the engine checks such a message itself. An ignored message leaves the state untouched, bit for
    # bit; the NaN of a message not ignored reaches the state.
    seen = {True: 0, False: 0}
    for name, hp in [("ormo", {}), ("ormo-da", _DROPS), ("da-asgd", _DROPS), ("al-sgd", _DROPS),
                     ("orlomo", _DROPS), ("local-ormo-da", _DROPS),
                     ("ormo-vanilla", {"step": "momentum_increment", "momentum": 0.0}), ("asgd", {}), ("ssgdm", {})]:
        rule = _rule(name, **hp)
        for t, rate in [(5, 1.0), (9, 0.0), (14, 1.0)]:
            sim = Simulator(rule, QUAD.w0, QUAD.grad_fn, num_workers=4, num_iterations=40, seed=3,
                            lr_schedule=lambda t_, r=rate, at=t: r if t_ == at else 1.0)
            sim.run(t)
            k, _ = sim.source.next(t, sim.now)
            payload = sim.snapshots[k]
            message = rule.work(payload, lambda x, s, k=k, i=payload.index: QUAD.grad_fn(x, k, i, s) + 0.5,
                                sim.worker_states[k])
            sim._set_rate(t)
            rule.begin_iteration(sim.state, t=t, waiting_empty=not sim.waiting)
            before = sim.state.state_dict()
            bad = ormo.Message(index=message.index, update=message.update.clone(), momentum=message.momentum,
                               local_lr_scale=message.local_lr_scale)
            bad.update[2] = float("nan")
            rule.apply(sim.state, bad, t=t, worker=k)
            ignored = rule.ignores(sim.state, bad, t=t)
            after = sim.state.state_dict()
            tensors = [f for f in before if isinstance(before[f], torch.Tensor)]
            if ignored:  # untouched, bit for bit
                assert all(torch.equal(before[f], after[f]) for f in tensors), (name, t, rate)
            else:  # its NaN reached the state
                assert not all(torch.isfinite(after[f]).all() for f in tensors), (name, t, rate)
            seen[ignored] += 1
    assert seen[True] >= 5 and seen[False] >= 5


@pytest.mark.parametrize("name", RULES)
def test_state_checks_change_nothing_and_check_nothing_per_message(name, monkeypatch):
    from ormo.engine import simulator as simulator_module

    kw = {"num_workers": 5, "num_iterations": 60, "timing": SlowFraction(fraction=0.4, slowdown=3.0), "seed": 4}
    one = ormo.simulate(_rule(name), QUAD.w0, QUAD.grad_fn, **kw)
    calls = []
    original = simulator_module.all_finite
    monkeypatch.setattr(simulator_module, "all_finite", lambda x: calls.append(1) or original(x))
    state = ormo.simulate(_rule(name), QUAD.w0, QUAD.grad_fn, defer_checks="state", **kw)
    assert state.events == one.events and torch.equal(state.params, one.params)
    # read once, at the end, over the state; only SMEGA2's look-ahead, which is not the server's own tensors and which
    # the next payload overwrites, is checked as it is sent
    assert len(calls) == (60 if name == "smega2" else 0)
    calls.clear()
    ormo.simulate(_rule(name), QUAD.w0, QUAD.grad_fn, **kw)
    assert len(calls) >= 60 + (60 if name == "smega2" else 0)  # checking each message calls it: the above can fail


def test_state_checks_refuse_batches_and_bad_values_and_states_with_an_unread_nan():
    with pytest.raises(ormo.ConfigError, match=r"defer_checks.*True, False or \"state\""):
        Simulator(_rule("ormo"), QUAD.w0, QUAD.grad_fn, num_workers=2, defer_checks="yes")
    with pytest.raises(ormo.ConfigError, match=r"defer_checks.*batched gradients"):
        Simulator(_rule("ormo"), QUAD.w0, QUAD.grad_fn, num_workers=2, batch=2, defer_checks="state")
    sim = Simulator(_rule("ormo"), QUAD.w0, _faulty(QUAD, 3, 0, float("nan")), num_workers=3, num_iterations=20,
                    defer_checks="state")
    sim.run(2)
    clean = sim.state_dict()  # a clean read-out at t=2
    for _ in range(6):
        sim.step()
    saved = roundtrip(sim.state_dict())  # saved without reading: the NaN is in it
    with pytest.raises(NonFiniteError, match="the run diverged at an iteration from 2 to 7"):
        sim.flush_checks()
    for strict in (Simulator(_rule("ormo"), QUAD.w0, QUAD.grad_fn, num_workers=3, num_iterations=20),
                   Simulator(_rule("ormo"), QUAD.w0, QUAD.grad_fn, num_workers=3, num_iterations=20,
                             defer_checks=True)):
        with pytest.raises(ormo.ConfigError, match="defer_checks='state' after a NaN/Inf"):
            strict.load_state_dict(saved)
    again = Simulator(_rule("ormo"), QUAD.w0, QUAD.grad_fn, num_workers=3, num_iterations=20, defer_checks="state")
    again.load_state_dict(saved)
    with pytest.raises(NonFiniteError, match="the run diverged at iteration 7 or before"):
        again.flush_checks()
    # the clean state, continued checking each message, names it exactly
    strict = Simulator(_rule("ormo"), QUAD.w0, _faulty(QUAD, 1, 0, float("nan")), num_workers=3, num_iterations=20)
    strict.load_state_dict(roundtrip(clean))
    with pytest.raises(NonFiniteError, match="returned NaN/Inf"):
        strict.run(20)


def test_the_state_check_finds_overflows_of_bounded_gradients_no_later_than_a_check_per_message():
    # A gradient that stays finite at ±Inf (a clamped, Huber-like loss) does not carry an overflow on by itself. SMEGA2
    # sends a look-ahead that can overflow while its parameters and momentum stay finite, and the next payload
    # overwrites it: it is checked as it is sent (an adversarial read found it missed before that).
    found = 0
    for name in RULES:
        local = rule_with_local_steps(name).local_steps > 1
        for bound, k, zero in ((1e7, 1, False), (1e9, 8, False), (1e7, 8, True)):
            hp = {"local_lr": 1e30} if local else {"lr": 1e30}
            if local and "lr" in _rule(name).describe()["hyperparameters"]:
                hp["lr"] = 1.0
            rule = lambda n=name, h=hp: _rule(n, **h)  # noqa: E731
            grad = lambda b=bound: (lambda x, w, i, s: torch.clamp(x, -b, b))  # noqa: E731
            schedule = (lambda t: 0.0 if t % 5 == 2 else 1.0) if zero else None
            failed, first = _first_failures(rule, grad, lr_schedule=schedule, K=k, T=60)
            if failed is not None:
                found += 1
                assert first is not None and first <= failed[1] + 1, (name, bound, k, zero, failed, first)
    assert found >= 15


def test_smega2_look_ahead_overflowing_alone_is_found():
    w0 = torch.tensor([1.0, -2.0, 0.5])
    kw = {"num_workers": 8, "num_iterations": 60, "seed": 1}
    grad = lambda x, w, i, s: torch.clamp(x, -2e7, 2e7)  # noqa: E731
    with pytest.raises(NonFiniteError, match="server parameters became NaN/Inf") as strict:
        ormo.simulate(ormo.make_rule("smega2", lr=1e30, momentum=0.9), w0, grad, **kw)
    with pytest.raises(NonFiniteError, match="names no iteration"):
        ormo.simulate(ormo.make_rule("smega2", lr=1e30, momentum=0.9), w0, grad, defer_checks="state", **kw)
    assert strict.value.t == 35


def test_a_rule_that_does_not_declare_state_checks_is_checked_per_message():
    base = type(ormo.make_rule("asgd"))

    class SkipsLargeGradients(base):  # a plugin's rule: skips what it deems too large, NaN included
        def apply(self, state, message, *, t, worker):
            if bool(torch.isfinite(message.update).all()) and float(message.update.abs().max()) < 1e3:
                super().apply(state, message, t=t, worker=worker)

    rule = SkipsLargeGradients(lr=0.1)
    assert ormo.make_rule("asgd").state_checks and not state_checks_sound(rule) and state_checks_sound(
        ormo.make_rule("asgd"))
    with pytest.raises(ormo.ConfigError, match=r"defer_checks.*does not declare.*Rule\.state_checks"):
        Simulator(rule, QUAD.w0, QUAD.grad_fn, num_workers=2, defer_checks="state")
    Simulator(rule, QUAD.w0, QUAD.grad_fn, num_workers=2, defer_checks=True)  # the record names what it meets
    cfg = load_config(None, SYNTH)
    assert resolve_deferred(cfg, rule=rule) == {
        "on": False, "why": "auto: on a CPU a check costs no wait (the rule 'asgd' does not declare "
                            "Rule.state_checks, so each message is checked)"}
    assert resolve_deferred(cfg, rule=ormo.make_rule("asgd"))["checks"] == "state"


@pytest.mark.parametrize("name", ["da-asgd", "ormo-da", "orlomo"])
def test_a_callable_delay_rule_is_called_once_per_message(name):
    # it may keep state (here a generator): asking whether a message was dropped must not call it again
    def run(defer):
        rng = np.random.default_rng(0)
        calls = []

        def drop_some(tau, k):
            calls.append(tau)
            return float(rng.random() < 0.7)

        res = ormo.simulate(_rule(name, delay_rule=drop_some), QUAD.w0, QUAD.grad_fn, num_workers=4,
                            num_iterations=50, seed=2, defer_checks=defer)
        return res, calls

    strict, strict_calls = run(False)
    state, state_calls = run("state")
    assert state_calls == strict_calls and torch.equal(state.params, strict.params)
    nan = _faulty(QUAD, 9, 0, float("nan"))  # and a NaN in a message it may have dropped is still found
    with pytest.raises(NonFiniteError, match="names no iteration"):
        ormo.simulate(_rule(name, delay_rule=lambda tau, k: 0.0), QUAD.w0, nan, num_workers=4, num_iterations=50,
                      defer_checks="state")


@pytest.mark.parametrize("factor", [0.0, 1e-200, 1e-40])
def test_inverse_lr_at_a_zero_or_tiny_local_rate_is_a_clear_error(factor):
    rule = ormo.make_rule("local-ormo-da", delta_scale="inverse_lr", local_steps=2)
    with pytest.raises(ormo.ConfigError, match=r"delta_scale = 'inverse_lr'.*local rate of .*over 1e30"):
        ormo.simulate(rule, QUAD.w0, QUAD.grad_fn, num_workers=3, num_iterations=20,
                      lr_schedule=lambda t: factor if t == 0 else 1.0)
    ormo.simulate(rule, QUAD.w0, QUAD.grad_fn, num_workers=3, num_iterations=20,  # a small factor is fine
                  lr_schedule=lambda t: 1e-6 if t == 0 else 1.0)


@pytest.mark.parametrize("reads", [5, 6, 7])
def test_a_stop_names_the_iteration_of_the_checkpoint_it_wrote(tmp_path, reads):
    # the loop read the flag twice per iteration: a signal landing between the two reads stopped the run without a
    # checkpoint at the iteration its message named (an adversarial read found it)
    from ormo.experiment import run as run_module

    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.epochs=0.5", "train.checkpoint_every=10"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "DeferredInterrupt", stopping_interrupt(run_module.DeferredInterrupt, reads))
        with pytest.raises(KeyboardInterrupt, match=f"stopped at iteration {reads + 1}"):
            train(cfg, tmp_path / "c", progress=False)
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["t"] == reads + 1


def test_rows_run_again_after_going_back_to_a_checkpoint_are_not_logged_twice_to_tensorboard(tmp_path, monkeypatch):
    # a NaN/Inf found at a read-out reruns the evaluations since the last checkpoint: TensorBoard cannot take rows
    # back, so a row logged already (same iteration, same values) is not logged again
    import sys
    import types

    from ormo.experiment.metrics import MetricsWriter

    logged = []

    class FakeWriter:
        def __init__(self, path):
            pass

        def add_scalar(self, key, value, step):
            logged.append((key, value, step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    writer = MetricsWriter(tmp_path, fields=["iteration", "epoch", "sim_time_s", "lr_scale", "train_loss"],
                           tensorboard=True)
    rows = [{"iteration": t, "train_loss": 1.0 / (t + 1)} for t in range(4)]
    for r in rows:
        writer.add(r)
    writer.reset(rows[:2])
    for r in rows[2:]:
        writer.add(r)
    assert [s for _, _, s in logged] == [0, 1, 2, 3]
    writer.add({"iteration": 3, "train_loss": float("nan")})  # a diverged run's final row at the same iteration
    assert len(logged) == 5
