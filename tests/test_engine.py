"""The simulator: determinism, replay, the event log on disk, delay bookkeeping, timing models, summary statistics."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
from helpers import Quadratic, random_async_order

import ormo
from ormo.engine.timing import HeavyTailed, Homogeneous, OneSlow, PerWorker, SlowFraction

ALL_RULES = ormo.rule_names()


def _hp(name: str) -> dict:
    rule = ormo.make_rule(name)
    hp = {"lr": 0.05} if "lr" in rule.describe()["hyperparameters"] else {}
    if name in ("al-sgd", "local-ormo-da", "orlomo", "prsgdm"):
        hp["local_steps"] = 2
    return hp


# ---------------------------------------------------------------------------------------------------------------
# determinism and replay


@pytest.mark.parametrize("name", ALL_RULES)
def test_same_seed_same_events_and_bit_identical_params_float32(name):
    problem = Quadratic(seed=1, dtype=torch.float32)
    kw = dict(num_workers=4, num_iterations=60, timing=SlowFraction(fraction=0.5, slowdown=3.0), seed=11)
    a = ormo.simulate(ormo.make_rule(name, **_hp(name)), problem.w0, problem.grad_fn, **kw)
    b = ormo.simulate(ormo.make_rule(name, **_hp(name)), problem.w0, problem.grad_fn, **kw)
    assert a.events == b.events
    assert a.params.dtype == torch.float32
    assert torch.equal(a.params, b.params)


def test_different_seeds_give_different_orders():
    problem = Quadratic(seed=1)
    runs = [ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=8, num_iterations=200,
                          seed=s) for s in (0, 1)]
    assert runs[0].events.workers != runs[1].events.workers


@pytest.mark.parametrize("name", ALL_RULES)
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_recorded_log_replays_exactly(tmp_path, name, suffix):
    problem = Quadratic(seed=2)
    timing = OneSlow(ratio=5.0)
    first = ormo.simulate(ormo.make_rule(name, **_hp(name)), problem.w0, problem.grad_fn, num_workers=5,
                          num_iterations=80, timing=timing, seed=3)
    path = first.events.save(tmp_path / f"events{suffix}")
    log = ormo.EventLog.load(path)
    assert log == first.events and log.meta["rule"] == name
    again = ormo.simulate(ormo.make_rule(name, **_hp(name)), problem.w0, problem.grad_fn, num_workers=5,
                          timing=ormo.Replay(path))
    assert again.events == first.events  # same order, indices, delays, times
    assert torch.equal(again.params, first.params)


def test_replay_of_a_prefix():
    problem = Quadratic(seed=2)
    first = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=50)
    part = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=20,
                         timing=ormo.Replay(first.events))
    assert list(part.events) == list(first.events)[:20]


def test_same_order_gives_every_method_the_same_data():
    """Minibatches are keyed by (worker, index, step): two methods fed one order request the same keys."""
    problem = Quadratic(seed=4)
    order = random_async_order(np.random.default_rng(0), 4, 50)
    keys = {}
    for name in ("asgd", "ormo", "naive-asgdm"):
        seen = []

        def grad_fn(params, worker, index, step, seen=seen):
            seen.append((worker, index, step))
            return problem.grad_fn(params, worker, index, step)

        ormo.simulate(ormo.make_rule(name), problem.w0, grad_fn, num_workers=4, order=order)
        keys[name] = seen
    assert keys["asgd"] == keys["ormo"] == keys["naive-asgdm"]


# ---------------------------------------------------------------------------------------------------------------
# delays and schedulers (spec §2.3)


def _ite_reference(order, k):
    """Async: ite(k, t) = 1 + max{t' < t : k_{t'} = k}, or 0."""
    last = [-1] * k
    out = []
    for t, w in enumerate(order):
        out.append(last[w] + 1)
        last[w] = t
    return out


@pytest.mark.parametrize("seed", range(5))
def test_async_indices_and_delays_follow_ite(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 7))
    order = random_async_order(rng, k, 100, skew=4.0)
    res = ormo.simulate(ormo.make_rule("asgd"), Quadratic().w0, Quadratic().grad_fn, num_workers=k, order=order)
    assert res.events.workers == order
    assert res.events.column("index").tolist() == _ite_reference(order, k)
    assert (res.events.column("delay") == np.arange(100) - res.events.column("index")).all()
    # exactly K messages carry index 0; every index s ≥ 1 at most once (exactly once if its sender came back)
    idx = res.events.column("index")
    assert (idx == 0).sum() == min(k, len(set(order)))
    assert len(set(idx[idx > 0].tolist())) == (idx > 0).sum()


def test_sync_delays_are_t_mod_k_and_indices_round_starts():
    k = 4
    res = ormo.simulate(ormo.make_rule("ssgdm"), Quadratic().w0, Quadratic().grad_fn, num_workers=k,
                        num_iterations=40, timing=SlowFraction(fraction=0.25, slowdown=4.0))
    t = np.arange(40)
    assert (res.events.column("delay") == t % k).all()
    assert (res.events.column("index") == k * (t // k)).all()
    for r in range(10):  # each round is a permutation of the workers
        assert sorted(res.events.workers[r * k : (r + 1) * k]) == list(range(k))


def test_sync_idle_time_and_async_none():
    problem = Quadratic()
    timing = SlowFraction(fraction=0.25, slowdown=4.0, jitter="none")
    sync = ormo.simulate(ormo.make_rule("ssgdm"), problem.w0, problem.grad_fn, num_workers=4, num_iterations=40,
                         timing=timing)
    asyn = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=4, num_iterations=40,
                         timing=timing)
    # 10 rounds of 4 s each (the slow worker); each fast worker waits 3 s per round
    assert sync.sim_time_s == pytest.approx(40.0)
    assert sync.idle_time_s == pytest.approx([30.0, 30.0, 30.0, 0.0])
    assert asyn.idle_time_s == [0.0] * 4
    assert asyn.sim_time_s < sync.sim_time_s / 2
    s = sync.summary()
    assert s["idle_fraction"] == pytest.approx(90.0 / 160.0)
    assert s["messages_per_worker"] == [10, 10, 10, 10]


def test_summary_statistics_match_events():
    problem = Quadratic()
    res = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=6, num_iterations=300,
                        timing=HeavyTailed(alpha=1.2, cap=8.0), seed=5)
    d = res.events.column("delay")
    s = res.summary()
    assert s["delay"]["mean"] == pytest.approx(d.mean())
    assert s["delay"]["max"] == d.max()
    assert s["delay"]["p90"] == pytest.approx(np.percentile(d, 90))
    assert sum(s["messages_per_worker"]) == 300
    assert s["sim_time_s"] == res.events[-1].sim_time
    times = res.events.column("sim_time")
    assert (np.diff(times) >= 0).all()
    assert (res.events.column("dispatch_time") <= times).all()


# ---------------------------------------------------------------------------------------------------------------
# timing models


def test_homogeneous_round_robin_delay_is_about_k_minus_one():
    problem = Quadratic()
    res = ormo.simulate(ormo.make_rule("asgd"), problem.w0, problem.grad_fn, num_workers=8, num_iterations=2000,
                        timing=Homogeneous(jitter_cv=0.05))
    assert res.delay["mean"] == pytest.approx(7.0, abs=0.2)
    assert res.sim_time_s == pytest.approx(2000 / 8, rel=0.02)  # one second per gradient per worker


def test_slow_fraction_workers_send_proportionally_fewer_messages():
    problem = Quadratic()
    res = ormo.simulate(ormo.make_rule("asgd"), problem.w0, problem.grad_fn, num_workers=8, num_iterations=4000,
                        timing=SlowFraction(fraction=0.25, slowdown=4.0))
    counts = np.array(res.messages_per_worker)
    assert counts[:6].mean() / counts[6:].mean() == pytest.approx(4.0, rel=0.05)  # workers 6, 7 are slow


@pytest.mark.parametrize("ratio", [2.0, 10.0])
def test_one_slow_worker_max_delay_grows_with_the_ratio(ratio):
    """OrLoMo Table 3 shape: while the slow worker computes one message, the K − 1 others send (K − 1)·ratio."""
    problem = Quadratic()
    k = 16
    res = ormo.simulate(ormo.make_rule("asgd"), problem.w0, problem.grad_fn, num_workers=k, num_iterations=3000,
                        timing=OneSlow(ratio=ratio, jitter="none"))
    assert res.delay["max"] == pytest.approx((k - 1) * ratio, rel=0.1)


def test_local_methods_take_h_steps_time_per_message():
    problem = Quadratic()
    res = ormo.simulate(ormo.make_rule("orlomo", local_steps=4), problem.w0, problem.grad_fn, num_workers=4,
                        num_iterations=40, timing=Homogeneous(jitter="none"))
    assert res.sim_time_s == pytest.approx(40.0)  # 10 messages per worker × 4 steps × 1 s


@pytest.mark.parametrize(("jitter", "cv"), [("gamma", 0.3), ("exponential", 1.0)])
def test_jitter_has_the_requested_mean_and_spread(jitter, cv):
    clock = Homogeneous(step_time_s=2.0, jitter=jitter, jitter_cv=cv).bind(1, seed=0)
    x = np.array([clock.duration(0, 1) for _ in range(20000)])
    assert x.mean() == pytest.approx(2.0, rel=0.03)
    assert x.std() / x.mean() == pytest.approx(cv, rel=0.05)
    x4 = np.array([clock.duration(0, 4) for _ in range(20000)])  # 4 steps: mean ×4, cv / 2
    assert x4.mean() == pytest.approx(8.0, rel=0.03)
    assert x4.std() / x4.mean() == pytest.approx(cv / 2, rel=0.05)


def test_heavy_tailed_speeds_are_capped_and_seeded():
    model = HeavyTailed(alpha=0.8, cap=5.0)
    a, b, c = model.step_times(100, 0), model.step_times(100, 0), model.step_times(100, 1)
    assert (a >= 1.0).all() and (a <= 5.0).all() and (a == 5.0).any()
    assert (a == b).all() and not (a == c).all()


def test_per_worker_constant_speeds_without_jitter():
    problem = Quadratic()
    res = ormo.simulate(ormo.make_rule("asgd"), problem.w0, problem.grad_fn, num_workers=2, num_iterations=9,
                        timing=PerWorker(step_times_s=(1.0, 2.0)))
    # worker 0 arrives at 1,2,3,...; worker 1 at 2,4,6; at a tie the earlier dispatch (worker 1's) goes first
    assert res.events.workers == [0, 1, 0, 0, 1, 0, 0, 1, 0]
    assert res.events.column("sim_time").tolist() == [1, 2, 2, 3, 4, 4, 5, 6, 6]


def test_explicit_order_uses_a_nominal_monotone_clock():
    problem = Quadratic()
    order = [1, 1, 1, 0, 0]
    res = ormo.simulate(ormo.make_rule("asgd"), problem.w0, problem.grad_fn, num_workers=2, order=order,
                        timing=Homogeneous(jitter="none"))
    assert res.events.column("sim_time").tolist() == [1, 2, 3, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# the API surface


def test_events_are_readable_as_attributes_and_keys():
    problem = Quadratic()
    res = ormo.simulate(ormo.make_rule("ormo", lr=0.1, momentum=0.9), problem.w0, problem.grad_fn, num_workers=3,
                        num_iterations=10)
    ev = res.events[4]
    assert (ev.t, ev.worker, ev.index, ev.delay) == (ev["t"], ev["worker"], ev["index"], ev["delay"])
    assert ev.sim_time == ev["sim_time"] and len(res.events) == 10
    assert [e.t for e in res.events] == list(range(10))


def test_params0_is_not_modified_and_result_is_a_copy():
    problem = Quadratic()
    w0 = problem.w0.clone()
    res = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=2, num_iterations=10)
    assert torch.equal(problem.w0, w0)
    assert res.params.data_ptr() != res.state.params.data_ptr()


def test_callback_sees_every_iteration_in_order():
    problem = Quadratic()
    seen = []
    ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=12,
                  callback=lambda e, s: seen.append((e.t, s.params.clone())))
    assert [t for t, _ in seen] == list(range(12))


def test_gzip_log_is_compressed_json_lines(tmp_path):
    problem = Quadratic()
    res = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=2, num_iterations=5)
    path = res.events.save(tmp_path / "e.jsonl.gz")
    lines = gzip.open(path, "rt").read().splitlines()
    assert len(lines) == 6 and '"format": "ormo.events"' in lines[0]


def test_every_rule_says_how_it_is_wired():
    for name in ALL_RULES:
        d = ormo.make_rule(name).describe()
        assert d["scheduler"] in ("sync", "async") and d["worker_sends"] and d["server_sends"]
    assert {n for n in ALL_RULES if ormo.make_rule(n).scheduler == "sync"} == {"ssgd", "ssgdm", "prsgdm"}


def test_finiteness_check_is_exact():
    """The fast check (a sum) must neither miss a NaN/Inf nor flag finite values whose sum overflows."""
    from ormo.engine.simulator import all_finite

    g = torch.randn(1000, dtype=torch.float32)
    assert all_finite(g)
    for bad in (math.nan, math.inf, -math.inf):
        h = g.clone()
        h[7] = bad
        assert not all_finite(h)
    assert all_finite(torch.full((10,), 3e38, dtype=torch.float32))  # the float32 sum overflows; elements are finite
    both = torch.tensor([math.inf, -math.inf])  # sums to NaN, still non-finite
    assert not all_finite(both)
