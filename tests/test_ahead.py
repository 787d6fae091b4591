"""Computing messages ahead (``Simulator(ahead=True)``, chosen by ``ormo train`` for large parameter tensors): each
one-step asynchronous message is computed from the server's own tensors at the start of the iteration after its
dispatch instead of from a copy. Everything here is bit for bit against computing each message when consumed:
every rule it applies to, resume in both directions, NaN/Inf and failures at their own iterations, interrupts, and
the whole ``ormo train`` run (metrics, events, parameters, BatchNorm statistics), stopped and resumed."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SYNTH, Quadratic, roundtrip, rule_with_local_steps, stopping_interrupt

import ormo
from ormo.engine import Simulator
from ormo.engine.simulator import GradFnError, NonFiniteError, ahead_problem
from ormo.engine.timing import SlowFraction
from ormo.errors import ConfigError
from ormo.experiment import load_config, train
from ormo.experiment import run as run_module

pytestmark = pytest.mark.filterwarnings("ignore::ormo.GrowthWarning")

RULES = ormo.rule_names()
ONE_STEP = [n for n in RULES if ahead_problem(rule_with_local_steps(n), rule_with_local_steps(n).scheduler, 0, False)
            is None]
KW = {"num_workers": 5, "timing": SlowFraction(fraction=0.4, slowdown=3.0), "seed": 4}


def test_it_applies_to_every_one_step_asynchronous_rule_and_no_other():
    assert {"asgd", "ormo", "ormo-da", "smega2", "shifted-momentum"} <= set(ONE_STEP)
    for name in set(RULES) - set(ONE_STEP):
        rule = rule_with_local_steps(name)
        assert rule.scheduler == "sync" or rule.local_steps > 1 or type(rule).work is not ormo.Rule.work, name


@pytest.mark.parametrize("name", ONE_STEP)
@pytest.mark.parametrize("checks", [False, "state"])
def test_computing_ahead_changes_nothing(name, checks):
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    one = ormo.simulate(rule_with_local_steps(name), problem.w0, problem.grad_fn, num_iterations=80,
                        defer_checks=checks, **KW)
    ahead = ormo.simulate(rule_with_local_steps(name), problem.w0, problem.grad_fn, num_iterations=80,
                          defer_checks=checks, ahead=True, **KW)
    assert ahead.events == one.events
    assert torch.equal(ahead.params, one.params)
    assert torch.equal(ahead.state.momentum, one.state.momentum) if hasattr(one.state, "momentum") else True


def test_it_copies_the_parameters_once_and_computes_each_message_from_the_server_tensors():
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    seen = []

    def grad_fn(x, w, i, s):
        seen.append(x.data_ptr())
        return problem.grad_fn(x, w, i, s)

    sim = Simulator(ormo.make_rule("ormo", lr=0.1, momentum=0.9), problem.w0, grad_fn, num_iterations=40, ahead=True,
                    **KW)
    sim.run()
    server = sim.state.params.data_ptr()
    first = seen[0]  # the initial broadcast: one copy of w_0, shared by every worker
    assert set(seen) == {first, server} and seen.count(first) == 5
    assert all(b is None for b in sim.own_buffers)  # no worker owns a copy of the parameters


@pytest.mark.parametrize("settings,match", [
    ({"rule": "ssgdm"}, "synchronous round"),
    ({"rule": "orlomo"}, "local steps"),
    ({"batch": 3}, "batched"),
    ({"defer_checks": True}, "defer_checks=True"),
])
def test_it_is_refused_where_it_does_not_apply(settings, match):
    problem = Quadratic(dim=4, seed=0)
    rule = rule_with_local_steps(settings.pop("rule", "ormo"))
    with pytest.raises(ConfigError, match=f"invalid ahead: True .*{match}") as e:
        Simulator(rule, problem.w0, problem.grad_fn, num_workers=3, num_iterations=5, ahead=True, **settings)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="invalid ahead: 1 "):
        Simulator(ormo.make_rule("asgd", lr=0.1), problem.w0, problem.grad_fn, num_workers=3, ahead=1)


@pytest.mark.parametrize("saver,loader", [(True, True), (True, False), (False, True)])
def test_a_state_saved_computing_ahead_or_not_continues_bit_for_bit_either_way(saver, loader):
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    rule = ormo.make_rule("ormo", lr=0.1, momentum=0.9)
    whole = Simulator(rule, problem.w0, problem.grad_fn, num_iterations=90, **KW).run()
    first = Simulator(rule, problem.w0, problem.grad_fn, num_iterations=90, ahead=saver, **KW)
    first.run(37)
    if saver:
        assert first._ahead is not None and first.computed  # saved with one pending and some computed
    second = Simulator(rule, problem.w0, problem.grad_fn, num_iterations=90, ahead=loader, **KW)
    second.load_state_dict(roundtrip(first.state_dict()))
    second.run()
    assert second.events == whole.events
    assert torch.equal(second.state.params, whole.state.params)
    assert torch.equal(second.state.momentum, whole.state.momentum)



@pytest.mark.parametrize("last", [False, True])
def test_a_state_passed_from_one_at_a_time_to_ahead_and_back_continues_bit_for_bit(last):
    # a worker that owned a copy of its parameters (one at a time) and then had its message computed ahead holds no
    # buffer: its saved snapshot is empty, and loading it as the worker's buffer failed at its next copy
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    rule = ormo.make_rule("ormo", lr=0.1, momentum=0.9)
    whole = Simulator(rule, problem.w0, problem.grad_fn, num_iterations=90, **KW).run()
    sim = Simulator(rule, problem.w0, problem.grad_fn, num_iterations=90, **KW)
    for until, ahead in ((20, True), (50, last), (70, False)):
        sim.run(until)
        sd = roundtrip(sim.state_dict())
        sim = Simulator(rule, problem.w0, problem.grad_fn, num_iterations=90, ahead=ahead, **KW)
        if ahead:  # as 1bfb532 saved it: the empty snapshot of a worker that owned a buffer marked as its own
            sd["own"] = [True] * len(sd["own"])
        sim.load_state_dict(sd)
        assert all(b is None or b.shape == problem.w0.shape for b in sim.own_buffers)
    sim.run()
    assert sim.events == whole.events and torch.equal(sim.state.params, whole.state.params)

def _nan_at(problem, worker, index, value=float("nan")):
    def grad_fn(x, w, i, s):
        g = problem.grad_fn(x, w, i, s)
        if w == worker and i >= index:
            g = g.clone()
            g[1] = value
        return g
    return grad_fn


@pytest.mark.parametrize("name", ["ormo", "asgd", "smega2"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_gradient_computed_ahead_stops_where_one_at_a_time_stops(name, value):
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    grad_fn = _nan_at(problem, 2, 17, value)
    errors = []
    for ahead in (False, True):
        with pytest.raises(NonFiniteError) as e:
            ormo.simulate(rule_with_local_steps(name), problem.w0, grad_fn, num_iterations=60, ahead=ahead, **KW)
        errors.append(e.value)
    one, ahead = errors
    assert str(ahead) == str(one) and (ahead.t, ahead.worker, ahead.index) == (one.t, one.worker, one.index)
    assert torch.equal(ahead.partial.params, one.partial.params) and torch.isfinite(ahead.partial.params).all()



@pytest.mark.parametrize("saver", [False, True])
def test_a_state_saved_unchecked_is_checked_when_consumed_by_a_simulator_that_checks(saver):
    # check_finite=False computes ahead without checking: a message held in its state is checked when consumed by a
    # simulator that checks, as one computed there when consumed is (not applied, to fail at the parameters sent)
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    grad_fn = _nan_at(problem, 0, 30)  # worker 0's message of index 30, computed ahead and held at t=31
    rule = ormo.make_rule("ormo", lr=0.1, momentum=0.9)
    errors = []
    for ahead in (False, saver):
        first = Simulator(rule, problem.w0, grad_fn, num_iterations=80, check_finite=False, ahead=ahead, **KW)
        first.run(31)
        second = Simulator(rule, problem.w0, grad_fn, num_iterations=80, **KW)
        second.load_state_dict(roundtrip(first.state_dict()))
        with pytest.raises(NonFiniteError) as e:
            second.run()
        errors.append(e.value)
    one, got = errors
    assert str(got) == str(one) and "parameters untouched" in str(got) and got.t == one.t
    assert torch.equal(got.partial.params, one.partial.params)

def test_a_grad_fn_failing_ahead_raises_at_its_own_iteration_and_the_others_go_on_as_one_at_a_time():
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)

    def grad_fn(x, w, i, s):
        if (w, i) == (1, 21):
            raise ValueError("bad minibatch")
        return problem.grad_fn(x, w, i, s)

    errors = []
    for ahead in (False, True):
        sim = Simulator(ormo.make_rule("ormo", lr=0.1, momentum=0.9), problem.w0, grad_fn, num_iterations=80,
                        ahead=ahead, **KW)
        with pytest.raises(ValueError, match="bad minibatch"):
            sim.run()
        errors.append((sim.t, sim.state.params.clone(), sim.events))
    assert errors[0][0] == errors[1][0] and torch.equal(errors[0][1], errors[1][1]) and errors[0][2] == errors[1][2]


def test_an_interrupt_while_computing_ahead_computes_it_again_at_the_next_step():
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    rule = ormo.make_rule("ormo", lr=0.1, momentum=0.9)
    whole = Simulator(rule, problem.w0, problem.grad_fn, num_iterations=50, **KW).run()
    fired = []

    def grad_fn(x, w, i, s):
        if i == 20 and not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return problem.grad_fn(x, w, i, s)

    sim = Simulator(rule, problem.w0, grad_fn, num_iterations=50, ahead=True, **KW)
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    assert sim.t == 20 and fired
    sim.run()
    assert torch.equal(sim.state.params, whole.state.params) and sim.events == whole.events


def test_a_grad_fn_writing_into_the_server_parameters_stops_at_once():
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)

    def grad_fn(x, w, i, s):
        g = problem.grad_fn(x, w, i, s)
        if i == 9:
            x.mul_(2.0)
        return g

    sim = Simulator(ormo.make_rule("asgd", lr=0.1), problem.w0, grad_fn, num_iterations=40, ahead=True, **KW)
    with pytest.raises(GradFnError, match=r"changed its params argument in place at server iteration t=9; .*"
                                          r"clone it first") as e:
        sim.run()
    assert (e.value.t, e.value.index) == (9, 9) and sim.t == 9
    assert e.value.partial is not None and len(e.value.partial.events) == 9  # as every SimulationError has it
    assert "\n" not in str(e.value)


def test_a_grad_fn_reusing_the_memory_of_a_message_computed_ahead_is_refused():
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    out = torch.empty(6)

    def grad_fn(x, w, i, s):
        return out.copy_(problem.grad_fn(x, w, i, s))

    ormo.simulate(ormo.make_rule("asgd", lr=0.1), problem.w0, grad_fn, num_iterations=20, **KW)  # fine one at a time
    with pytest.raises(GradFnError, match="returned memory that a message computed ahead still holds"):
        ormo.simulate(ormo.make_rule("asgd", lr=0.1), problem.w0, grad_fn, num_iterations=20, ahead=True, **KW)


def test_a_grad_fn_reusing_part_of_the_memory_of_a_message_computed_ahead_is_refused():
    # windows at other offsets of one buffer: no two gradients start at the same address, but they overlap
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    out, calls = torch.empty(45), [0]

    def grad_fn(x, w, i, s):
        calls[0] = (calls[0] + 1) % 40
        return out[calls[0]:calls[0] + 6].copy_(problem.grad_fn(x, w, i, s))

    ormo.simulate(ormo.make_rule("asgd", lr=0.1), problem.w0, grad_fn, num_iterations=20, **KW)  # fine one at a time
    with pytest.raises(GradFnError, match="returned memory that a message computed ahead still holds"):
        ormo.simulate(ormo.make_rule("asgd", lr=0.1), problem.w0, grad_fn, num_iterations=20, ahead=True, **KW)



@pytest.mark.parametrize("name", ["ormo", "asgd", "smega2"])
@pytest.mark.parametrize("num_workers", [1, 4])
def test_a_gradient_that_is_its_argument_is_computed_when_consumed(name, num_workers):
    # grad_fn = identity (f = |w|^2 / 2, the argument returned as is) is fine one at a time (the worker's copy); ahead,
    # the message would be the server's own tensors, moved by the next iterations (OrMo's PRE at K = 1: silently
    # other results; K > 1: refused as memory a message computed ahead holds)
    w0 = torch.linspace(-1.0, 1.0, 8)
    one, ahead = (ormo.simulate(ormo.make_rule(name, lr=0.1), w0, lambda x, w, i, s: x, num_workers=num_workers,
                                num_iterations=30, ahead=a) for a in (False, True))
    assert torch.equal(ahead.params, one.params) and ahead.events == one.events

# ----------------------------------------------------------------------------------------------------------------
# ormo train: on for large parameter tensors (here every model, REBIND_ELEMENTS lowered), the same run as off


def _runs(tmp_path, monkeypatch, args, *, stop_after=None, base=None):
    """The run computing ahead (``a``) and the run computing each message when consumed (``b``)."""
    import ormo.flat

    monkeypatch.setattr(ormo.flat, "REBIND_ELEMENTS", 1)
    cfg = load_config(base, args)
    if stop_after is not None:
        with monkeypatch.context() as mp:
            mp.setattr(run_module, "DeferredInterrupt", stopping_interrupt(run_module.DeferredInterrupt, stop_after))
            with pytest.raises(KeyboardInterrupt):
                train(cfg, tmp_path / "a", progress=False)
        a = train(None, tmp_path / "a", resume=True, progress=False)
    else:
        a = train(cfg, tmp_path / "a", progress=False)
    with monkeypatch.context() as mp:
        mp.setattr(run_module, "resolve_ahead", lambda *a, **k: {"on": False, "why": "test"})
        b = train(cfg, tmp_path / "b", progress=False)
    for name in ("metrics.jsonl", "events.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    fa, fb = (torch.load(tmp_path / d / "final.pt", weights_only=True) for d in "ab")
    assert torch.equal(fa["params"], fb["params"]) and torch.equal(a.params, b.params)
    assert torch.equal(fa["bn_buffers"], fb["bn_buffers"])
    ja, jb = (json.loads((tmp_path / d / "run.json").read_text()) for d in "ab")
    assert ja["summary"] == jb["summary"] and ja["diverged"] == jb["diverged"]
    return ja, jb


@pytest.mark.parametrize("checks", ["'auto'", "false"])
def test_a_training_run_computing_ahead_is_the_run_computing_each_message_when_consumed(tmp_path, monkeypatch,
                                                                                        checks):
    ja, jb = _runs(tmp_path, monkeypatch, [*SYNTH, "model.name=resnet20", "method.name=ormo", "train.epochs=0.75",
                                           f"train.deferred_checks={checks}"])
    assert ja["compute_ahead"]["on"] is True and "large parameter tensors" in ja["compute_ahead"]["why"]
    assert jb["compute_ahead"]["on"] is False
    from ormo.experiment.replay import replay

    assert replay(tmp_path / "a", write=False)["bit_identical"]  # a replay computes each message when consumed


def test_a_training_run_computing_ahead_stopped_and_resumed_is_bit_identical(tmp_path, monkeypatch):
    _runs(tmp_path, monkeypatch, [*SYNTH, "model.name=resnet20", "method.name=asgd", "train.epochs=0.75",
                                  "train.checkpoint_every=0.25"], stop_after=9)


@pytest.mark.parametrize("checks", ["'auto'", "false"])
def test_a_diverging_run_computing_ahead_ends_as_one_computing_each_message(tmp_path, monkeypatch, checks):
    ja, _ = _runs(tmp_path, monkeypatch, ["method.lr=3.0", "train.epochs=4", "train.checkpoint_every=1.0",
                                          f"train.deferred_checks={checks}"], base="preset:quickstart")
    assert ja["diverged"] is not None and ja["compute_ahead"]["on"] is True


def test_ormo_train_computes_ahead_only_where_it_pays(tmp_path):
    small = train(load_config("preset:quickstart", ["train.epochs=0.25"]), tmp_path / "q", progress=False)
    assert small is not None
    info = json.loads((tmp_path / "q" / "run.json").read_text())
    assert info["compute_ahead"]["on"] is False and "small tensors" in info["compute_ahead"]["why"]
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.epochs=0.25", "method.name=ssgdm"])
    from ormo.experiment.problem import TrainProblem

    problem = TrainProblem(cfg)
    problem.flat.rebinds = True
    got = run_module.resolve_ahead(problem, cfg.method.build(), batched=False, defer_checks="state")
    assert got["on"] is False and "synchronous" in got["why"]
    assert run_module.resolve_ahead(problem, cfg.method.build(), batched=True, defer_checks=False)["on"] is False
    asgd = ormo.make_rule("asgd", lr=0.1)
    assert run_module.resolve_ahead(problem, asgd, batched=False, defer_checks="state")["on"] is True
    assert run_module.resolve_ahead(problem, asgd, batched=False, defer_checks=True)["on"] is False
    # a task that computes its own gradients (it may reuse one buffer, or stage differently) keeps the copies
    problem.compute_ahead = False
    got = run_module.resolve_ahead(problem, asgd, batched=False, defer_checks="state")
    assert got["on"] is False and "sets compute_ahead = False" in got["why"]
    base = type(problem)
    problem.__class__ = type("Own", (base,), {"grad_fn": lambda self, *a: base.grad_fn(self, *a)})
    got = run_module.resolve_ahead(problem, asgd, batched=False, defer_checks="state")
    assert got["on"] is False and "computes its own messages" in got["why"]


def test_gradients_read_from_rows_of_one_table_are_not_refused():
    # each worker's gradient a row of one read-only table: other memory than any message held, though one storage
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    table = torch.stack([problem.noise_at(w, 0, 0) for w in range(5)])
    one, ahead = (ormo.simulate(ormo.make_rule("asgd", lr=0.1), problem.w0, lambda x, w, i, s: table[w],
                                num_iterations=30, ahead=a, **KW) for a in (False, True))
    assert torch.equal(ahead.params, one.params) and ahead.events == one.events
