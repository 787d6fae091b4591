"""Bad input gets a clear error naming the field, the value and the constraint, and never corrupts parameters."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
from helpers import Quadratic

import ormo
from ormo import ConfigError, GradFnError, NonFiniteError
from ormo.engine import EventLogError
from ormo.engine.timing import HeavyTailed, Homogeneous, OneSlow, PerWorker, SlowFraction

# ---------------------------------------------------------------------------------------------------------------
# rules


def test_unknown_rule_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"unknown rule 'ormo2'; valid names: .*ormo-da.*orlomo"):
        ormo.make_rule("ormo2")


def test_unknown_hyperparameter_is_named():
    with pytest.raises(ConfigError, match=r"rule 'ormo' has no hyperparameter 'local_steps'; accepted: lr, momentum"):
        ormo.make_rule("ormo", local_steps=4)
    with pytest.raises(ConfigError, match=r"'prsgdm' has no hyperparameter 'lr'"):
        ormo.make_rule("prsgdm", lr=0.1)


RATE_LIMIT = (r"<= 1e\+30: an update multiplies it by up to 1/\(1 - momentum\), and float32 arithmetic overflows at "
              r"3\.4e38")
BAD_VALUES = [
    ("lr", [0, -0.1, math.nan, math.inf, "0.1", True, None], "a finite number > 0"),
    ("momentum", [-0.1, 1.0, 1.2, math.nan, "0.9"], r"a number in \[0, 1\)"),
    ("local_lr", [0.0, -1.0, math.inf], "a finite number > 0"),
    ("lr", [1e31, 3e38], RATE_LIMIT),  # float32 kernels cannot take it times 1/(1 - β)
    ("local_lr", [1e31], RATE_LIMIT),
    ("local_steps", [0, -3, 1.5, True, "8"], "an integer >= 1"),
    ("delay_rule", ["bogus", 3], "one of 'inverse', 'drop_above', 'none' or a callable"),
    ("delay_threshold", [0.0, -1.0], "a finite number > 0"),
    ("convention", ["torch"], "one of 'scaled', 'pytorch'"),
    ("estimate", ["fancy"], "one of 'advanced', 'naive'"),
    ("step", ["adam"], "one of 'sgd', 'momentum_increment'"),
    ("group_decay", ["beta_H"], "one of 'beta', 'beta_pow_H'"),
    ("delta_scale", ["1/H"], "one of 'none', 'inverse_lr', 'inverse_steps'"),
]


def _rules_with(field):
    return [n for n in ormo.rule_names() if field in ormo.make_rule(n).describe()["hyperparameters"]]


@pytest.mark.parametrize(
    ("name", "field", "value", "constraint"),
    [(n, f, v, c) for f, values, c in BAD_VALUES for n in _rules_with(f) for v in values],
)
def test_invalid_hyperparameter_names_field_value_and_constraint(name, field, value, constraint):
    with pytest.raises(ConfigError, match=rf"invalid {field}: .*\(must be {constraint}\)") as info:
        ormo.make_rule(name, **{field: value})
    assert repr(value) in str(info.value)


def test_every_rule_has_a_validated_field():
    covered = {n for f, _, _ in BAD_VALUES for n in _rules_with(f)}
    assert covered == set(ormo.rule_names())


def test_callable_delay_rule_returning_negative_is_an_error():
    rule = ormo.make_rule("ormo-da", delay_rule=lambda tau, k: -1.0)
    problem = Quadratic()
    with pytest.raises(ConfigError, match="delay_rule returned -1.0"):
        ormo.simulate(rule, problem.w0, problem.grad_fn, num_workers=2, order=[0, 1])


# ---------------------------------------------------------------------------------------------------------------
# simulate arguments


@pytest.fixture
def problem():
    return Quadratic()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_workers": 0, "num_iterations": 5}, r"invalid num_workers: 0 \(must be an integer >= 1\)"),
        ({"num_workers": 2.0, "num_iterations": 5}, r"invalid num_workers: 2.0"),
        ({"num_workers": 10**9, "num_iterations": 5}, r"invalid num_workers: 1000000000 \(must be <= 100,000"),
        ({"num_workers": 2, "num_iterations": -1}, r"invalid num_iterations: -1 \(must be an integer >= 0\)"),
        ({"num_workers": 2}, r"num_iterations is required"),
        ({"num_workers": 2, "num_iterations": 5, "seed": -1}, r"invalid seed: -1"),
        ({"num_workers": 2, "num_iterations": 5, "scheduler": "lockstep"}, r"invalid scheduler: 'lockstep'"),
        ({"num_workers": 2, "num_iterations": 5, "timing": "slow"}, r"invalid timing: 'slow' \(must be a timing"),
        ({"num_workers": 2, "order": [0, 2]}, r"invalid order\[1\]: 2 \(must be a worker id in \[0, 2\)\)"),
        ({"num_workers": 2, "order": [0, -1]}, r"invalid order\[1\]: -1"),
        ({"num_workers": 2, "order": [0, 1.0]}, r"invalid order\[1\]: 1.0"),
        ({"num_workers": 2, "order": "0101"}, r"invalid order: 'str'"),
        ({"num_workers": 2, "order": [0, 1], "num_iterations": 3}, r"invalid num_iterations: 3 .*len\(order\)=2"),
        # an adversarial read: these were a bare TypeError ("'float' object is not callable"), the callback's after the
        # first iteration had run
        ({"num_workers": 2, "num_iterations": 5, "lr_schedule": 0.5}, r"invalid lr_schedule: 'float' \(must be a "
                                                                       r"callable lr_schedule\(t\)"),
        ({"num_workers": 2, "num_iterations": 5, "callback": 3}, r"invalid callback: 'int' \(must be a callable "
                                                                 r"callback\(event, state\)"),
        # an adversarial read: grad_batch without batch was never called, without a word
        ({"num_workers": 2, "num_iterations": 5, "grad_batch": sorted}, r"invalid grad_batch: 'sorted' \(must be "
                                                                         r"given only with batch > 0, .*\); set "
                                                                         r"batch=N, or leave grad_batch out"),
    ],
)
def test_simulate_argument_errors(problem, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, **kwargs)


def test_sync_order_must_be_permutations_per_round(problem):
    with pytest.raises(ConfigError, match=r"order\[3:6\]: \[0, 2, 0\] is not feasible under the sync scheduler "
                                          r"\(worker 0 appears twice"):
        ormo.simulate(ormo.make_rule("ssgdm"), problem.w0, problem.grad_fn, num_workers=3,
                      order=[2, 1, 0, 0, 2, 0])
    # the same order is fine for an asynchronous rule, and a partial last round is fine too
    ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, order=[2, 1, 0, 0, 2, 0])
    ormo.simulate(ormo.make_rule("ssgdm"), problem.w0, problem.grad_fn, num_workers=3, order=[2, 1, 0, 1, 2])


@pytest.mark.parametrize(
    ("params0", "pattern"),
    [
        (np.zeros(5), r"invalid params0: 'ndarray' \(must be a 1-D torch.Tensor"),
        (torch.zeros(2, 3, dtype=torch.float64), r"invalid params0.shape: \(2, 3\) \(must be 1-D"),
        (torch.zeros(5, dtype=torch.int64), r"invalid params0.dtype: torch.int64"),
        (torch.zeros(5, dtype=torch.float16), r"invalid params0.dtype: torch.float16"),
        (torch.zeros(0, dtype=torch.float64), r"invalid params0: 'an empty tensor'"),
        (torch.tensor([1.0, math.nan], dtype=torch.float64), r"invalid params0: 'a tensor with NaN/Inf values'"),
    ],
)
def test_bad_params0(params0, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ormo.simulate(ormo.make_rule("ormo"), params0, lambda p, *a: p, num_workers=1, num_iterations=1)


def test_rule_must_be_a_rule(problem):
    with pytest.raises(ConfigError, match=r"invalid rule: 'str' \(must be a rule built by ormo.make_rule"):
        ormo.simulate("ormo", problem.w0, problem.grad_fn, num_workers=1, num_iterations=1)
    with pytest.raises(ConfigError, match=r"invalid grad_fn: 'int'"):
        ormo.simulate(ormo.make_rule("ormo"), problem.w0, 3, num_workers=1, num_iterations=1)


# ---------------------------------------------------------------------------------------------------------------
# grad_fn output


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        (lambda p: p[:3].clone(), r"returned shape \(3,\), dtype torch.float64, device cpu; expected a torch.Tensor "
                                  r"of shape \(5,\), dtype torch.float64"),
        (lambda p: p.to(torch.float32), r"returned shape \(5,\), dtype torch.float32"),
        (lambda p: p.numpy().copy(), r"returned a ndarray; expected a torch.Tensor"),
        (lambda p: None, r"returned a NoneType"),
    ],
)
def test_grad_fn_wrong_output_is_named_with_where_it_happened(problem, bad, pattern):
    def grad_fn(params, worker, index, step):
        return bad(params) if (worker, index) == (1, 2) else problem.grad_fn(params, worker, index, step)

    with pytest.raises(GradFnError, match=r"grad_fn\(params, worker=1, index=2, step=0\) at server iteration t=\d+ "
                                          + pattern) as info:
        ormo.simulate(ormo.make_rule("ormo"), problem.w0, grad_fn, num_workers=2, order=[0, 1, 0, 0, 1, 0, 1])
    assert (info.value.worker, info.value.index, info.value.t) == (1, 2, 4)


@pytest.mark.parametrize("name", ormo.rule_names())
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_non_finite_gradient_stops_the_run_and_names_it(name, bad_value):
    """The run stops at the bad gradient with iteration, worker, index and step named; the partial result holds the
    parameters after the last good iteration, and they are finite."""
    problem = Quadratic()
    hp = {"local_steps": 2} if "local_steps" in ormo.make_rule(name).describe()["hyperparameters"] else {}
    bad_step = 1 if hp else 0

    def grad_fn(params, worker, index, step):
        g = problem.grad_fn(params, worker, index, step)
        if index >= 6 and worker == 1 and step == bad_step:
            g[2] = bad_value
        return g

    good = []
    with pytest.raises(NonFiniteError, match=rf"worker=1, index=\d+, step={bad_step}\) returned NaN/Inf values at "
                                             r"server iteration t=\d+; the run stopped before applying it") as info:
        ormo.simulate(ormo.make_rule(name, **hp), problem.w0, grad_fn, num_workers=2, num_iterations=40,
                      callback=lambda e, s: good.append(s.params.clone()))
    err = info.value
    assert err.worker == 1 and err.step == bad_step and err.partial is not None
    assert len(err.partial.events) == err.t == len(good)
    assert torch.isfinite(err.partial.params).all()
    assert torch.equal(err.partial.params, good[-1])


def test_overflow_inside_a_local_loop_is_caught_in_the_message():
    """Finite gradients whose local sum overflows: the message check stops the run before the server applies it."""
    rule = ormo.make_rule("al-sgd", local_lr=1e30, local_steps=3)
    w0 = torch.ones(3, dtype=torch.float64)
    with pytest.raises(NonFiniteError):
        ormo.simulate(rule, w0, lambda p, *a: torch.full_like(p, 1e300), num_workers=1, num_iterations=2)


# ---------------------------------------------------------------------------------------------------------------
# timing models and logs


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: SlowFraction(fraction=1.5), r"invalid fraction: 1.5 \(must be a number in \[0, 1\]\)"),
        (lambda: SlowFraction(slowdown=0.5), r"invalid slowdown: 0.5 \(must be a finite number >= 1\)"),
        (lambda: OneSlow(ratio=0.0), r"invalid ratio: 0.0"),
        (lambda: HeavyTailed(cap=0.5), r"invalid cap: 0.5"),
        (lambda: HeavyTailed(alpha=-1), r"invalid alpha: -1"),
        (lambda: Homogeneous(jitter="uniform"), r"invalid jitter: 'uniform' \(must be one of 'gamma', 'exponential'"),
        (lambda: Homogeneous(jitter_cv=-0.1), r"invalid jitter_cv: -0.1"),
        (lambda: Homogeneous(step_time_s=0), r"invalid step_time_s: 0"),
        (lambda: PerWorker(step_times_s=(1.0, -2.0)), r"invalid step_times_s\[1\]: -2.0"),
    ],
)
def test_bad_timing_models(build, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build()


def test_per_worker_needs_one_time_per_worker(problem):
    with pytest.raises(ConfigError, match=r"invalid step_times_s: \(1.0, 2.0\) \(must be one entry per worker "
                                          r"\(num_workers=3\)\)"):
        ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=3,
                      timing=PerWorker(step_times_s=(1.0, 2.0)))


def test_replay_mismatches(problem, tmp_path):
    first = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=10)
    replay = ormo.Replay(first.events)
    with pytest.raises(ConfigError, match=r"invalid num_workers: 4 \(must be equal to the replayed log's "):
        ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=4, timing=replay)
    with pytest.raises(ConfigError, match=r"invalid num_iterations: 11 \(must be <= the replayed log's length 10"):
        ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=11,
                      timing=replay)
    with pytest.raises(ConfigError, match="either order= or timing=Replay"):
        ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, order=[0], timing=replay)
    with pytest.raises(ConfigError, match="invalid scheduler: 'sync' \\(must be the replayed log's scheduler 'async'"):
        ormo.simulate(ormo.make_rule("ssgdm"), problem.w0, problem.grad_fn, num_workers=3,
                      timing=ormo.Replay(ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn,
                                                       num_workers=3, order=[0, 0, 1]).events))


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("", r"empty file"),
        ("not json\n", r":1: header is not JSON"),
        ('{"format": "other"}\n', r":1: not an ormo event log"),
        ('{"format": "ormo.events", "version": 9}\n', r":1: unsupported version 9"),
        ('{"format": "ormo.events", "version": 1, "meta": [1, 2]}\n', r":1: header meta = \[1, 2\] must be an object"),
        ('{"format": "ormo.events", "version": 1}\n{"t": 0, "worker": 0}\n', r":2: bad event record"),
        ('{"format": "ormo.events", "version": 1}\n'
         '{"t": 1, "worker": 0, "index": 0, "sim_time": 1, "dispatch_time": 0}\n', r":2: event t=1, expected t=0"),
        ('{"format": "ormo.events", "version": 1}\n'
         '{"t": 0, "worker": 0, "index": 2, "sim_time": 1, "dispatch_time": 0}\n', r":2: index=2 must be in"),
        ('{"format": "ormo.events", "version": 1}\n'
         '{"t": 0, "worker": 0, "index": 0, "delay": 3, "sim_time": 1, "dispatch_time": 0}\n', r":2: delay=3"),
    ],
)
def test_corrupt_event_logs(tmp_path, content, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(EventLogError, match=pattern):
        ormo.EventLog.load(path)


@pytest.mark.parametrize(("name", "content", "pattern"), [
    ("bad.jsonl", b"\xff\xfe\x00garbage\n", r"bad.jsonl: not a readable event log \(UnicodeDecodeError: "),
    ("bad.jsonl.gz", gzip.compress(b'{"format": "ormo.events", "version": 1}\n' * 50)[:-20],
     r"bad.jsonl.gz: not a readable event log \(EOFError: "),
    ("bad.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", r"bad.jsonl:1: header is not JSON \(maximum recursion"),
    ("bad.jsonl", b'{"format": "ormo.events", "version": 1}\n' + b"[" * 100_000 + b"\n", r"bad.jsonl:2: bad event"),
])
def test_unreadable_event_logs_name_the_file(tmp_path, name, content, pattern):
    # a binary file, a gzip file cut short, JSON nested past the parser's depth: were tracebacks or unnamed errors
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(EventLogError, match=pattern):
        ormo.EventLog.load(path)


def test_missing_event_log(tmp_path):
    with pytest.raises(EventLogError, match="does not exist"):
        ormo.Replay(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ('{"t": 0, "worker": 0.5, "index": 0, "sim_time": 1, "dispatch_time": 0}', r"worker=0.5 must be an integer"),
        ('{"t": 0, "worker": -1, "index": 0, "sim_time": 1, "dispatch_time": 0}', r"worker=-1 must be >= 0"),
        ('{"t": 0, "worker": 0, "index": 0, "sim_time": 1, "dispatch_time": 2}', r"dispatch_time=2.0 is after"),
        # a NaN time passes every ordering check (comparisons with NaN are false): refused by itself
        ('{"t": 0, "worker": 0, "index": 0, "sim_time": NaN, "dispatch_time": 0}', r"sim_time=nan must be a finite"),
        ('{"t": 0, "worker": 0, "index": 0, "sim_time": 1, "dispatch_time": NaN}', r"dispatch_time=nan must be a"),
        ('{"t": 0, "worker": 0, "index": 0, "sim_time": Infinity, "dispatch_time": 0}', r"sim_time=inf must be"),
        ('{"t": 0, "worker": 0, "index": 0, "sim_time": 1, "dispatch_time": -5}', r"dispatch_time=-5 must be .* >= 0"),
        ('{"t": 0, "worker": 0, "index": 0, "sim_time": "1", "dispatch_time": 0}', r"sim_time='1' must be a finite"),
        ('{"t": 0, "worker": 0, "index": 0, "sim_time": true, "dispatch_time": 0}', r"sim_time=True must be a finite"),
    ],
)
def test_event_log_records_are_checked(tmp_path, record, pattern):
    path = tmp_path / "e.jsonl"
    path.write_text('{"format": "ormo.events", "version": 1}\n' + record + "\n")
    with pytest.raises(ormo.EventLogError, match=pattern):
        ormo.EventLog.load(path)


def test_event_log_times_must_not_go_back(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"format": "ormo.events", "version": 1}\n'
                    '{"t": 0, "worker": 0, "index": 0, "sim_time": 2, "dispatch_time": 0}\n'
                    '{"t": 1, "worker": 1, "index": 0, "sim_time": 1, "dispatch_time": 0}\n')
    with pytest.raises(ormo.EventLogError, match=r":3: sim_time=1.0 goes back in time"):
        ormo.EventLog.load(path)


def test_replaying_a_replay_does_not_nest_metadata():
    problem = Quadratic()
    first = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=2, num_iterations=6)
    second = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=2,
                           timing=ormo.Replay(first.events))
    third = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=2,
                          timing=ormo.Replay(second.events))
    assert third.events.meta["timing"] == second.events.meta["timing"]
