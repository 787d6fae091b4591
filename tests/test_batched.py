"""Batched in-flight gradients (``batch`` / ``train.batch_workers``): the same run as one message at a time.

* With a ``grad_fn`` that computes each request alone (no ``grad_batch``), batching changes only *when* a message is
  computed, never its value: every rule gives bit-identical events and parameters, under every arrival source.
* With a task's vmapped ``grad_batch`` the values differ by rounding only: bounded here per rule, for an MLP and for
  a BatchNorm model (per-worker statistics as batched buffers), including the local steps of OrLoMo and PRSGDm.
* Batched mode is deterministic, resumes bit for bit from a checkpoint with messages computed ahead, and replays.
* Errors keep the sequential contract: the iteration and worker that consumed a NaN message, state untouched.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from helpers import (
    SYNTH,
    Quadratic,
    random_async_order,
    random_sync_order,
    roundtrip,
    rule_with_local_steps,
    stopping_interrupt,
)

import ormo
from ormo import ConfigError
from ormo.engine import Simulator
from ormo.engine.simulator import GradFnError, NonFiniteError
from ormo.engine.timing import Replay, SlowFraction
from ormo.experiment import load_config, train
from ormo.experiment.problem import TrainProblem
from ormo.experiment.replay import replay
from ormo.experiment.run import resolve_batching

RULES = ormo.rule_names()
_rule = rule_with_local_steps


# ----------------------------------------------------------------------------------------------------------------
# the engine: batching moves computations, not values


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("source", ["heap", "order"])
def test_batching_with_a_per_request_grad_fn_is_bit_identical(name, source):
    problem = Quadratic(dim=6, seed=2, dtype=torch.float32)
    k, total = 5, 60
    if source == "order":
        rng = np.random.default_rng(1)
        order = random_sync_order(rng, k, total // k) if _rule(name).scheduler == "sync" else \
            random_async_order(rng, k, total, skew=3.0)
        kw = {"order": order}
    else:
        kw = {"num_iterations": total, "timing": SlowFraction(fraction=0.4, slowdown=3.0)}
    calls = []

    def grad_fn(x, w, i, s):
        calls.append((w, i, s))
        return problem.grad_fn(x, w, i, s)

    one = ormo.simulate(_rule(name), problem.w0, problem.grad_fn, num_workers=k, seed=4, **kw)
    for cap in (2, k):
        calls.clear()
        batched = ormo.simulate(_rule(name), problem.w0, grad_fn, num_workers=k, seed=4, batch=cap, **kw)
        assert batched.events == one.events
        assert torch.equal(batched.params, one.params)
        assert len(calls) >= len(one.events) * _rule(name).local_steps  # every consumed message was computed
    assert batched.events.meta["batch"] == k and "batch" not in one.events.meta


def test_local_steps_run_in_lock_step_across_the_batch():
    problem = Quadratic(dim=4, seed=0)
    seen = []

    def grad_batch(requests):
        seen.append([(w, s) for _, w, _, s in requests])
        return [problem.grad_fn(x, w, i, s) for x, w, i, s in requests]

    ormo.simulate(_rule("orlomo"), problem.w0, problem.grad_fn, num_workers=4, num_iterations=4, batch=4,
                  grad_batch=grad_batch)
    # the first message needed is computed with the other three in flight: step 0 of all four, then step 1, ...
    workers = [w for w, _ in seen[0]]
    assert sorted(workers) == [0, 1, 2, 3]
    assert seen[:3] == [[(w, s) for w in workers] for s in range(3)]


def test_the_cap_bounds_every_batch():
    problem = Quadratic(dim=4, seed=0)
    sizes = []

    def grad_batch(requests):
        sizes.append(len(requests))
        return [problem.grad_fn(*r) for r in requests]

    ormo.simulate(_rule("ormo"), problem.w0, problem.grad_fn, num_workers=8, num_iterations=50, batch=3,
                  grad_batch=grad_batch)
    assert max(sizes) == 3 and sum(sizes) >= 50


@pytest.mark.parametrize("name", ["ormo", "orlomo", "prsgdm", "ssgdm"])
def test_resume_with_messages_computed_ahead_is_bit_identical(name):
    problem = Quadratic(dim=5, seed=1, dtype=torch.float32)
    k, total = 4, 40

    def build():
        return Simulator(_rule(name), problem.w0, problem.grad_fn, num_workers=k, num_iterations=total, seed=2,
                         timing=SlowFraction(fraction=0.5, slowdown=2.0), batch=3)

    full = build().run().result()
    ahead = []
    for stop in (1, 9, 22, 23):
        first = build().run(stop)
        ahead.append(len(first.computed))
        second = build()
        second.load_state_dict(roundtrip(first.state_dict(copy=False)))
        res = second.run().result()
        assert res.events == full.events and torch.equal(res.params, full.params), f"stopped at {stop}"
    assert max(ahead) > 0  # some checkpoints held messages computed ahead


def test_a_checkpoint_continues_only_with_the_same_batching():
    problem = Quadratic()
    sim = Simulator(_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=10, batch=3).run(4)
    other = Simulator(_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=10)
    with pytest.raises(ConfigError, match="batch=3"):
        other.load_state_dict(sim.state_dict())


def test_a_batched_run_replays_its_log():
    problem = Quadratic(dim=4, seed=3)
    first = ormo.simulate(_rule("orlomo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=30, batch=3,
                          timing=SlowFraction(fraction=0.34, slowdown=3.0))
    again = Simulator(_rule("orlomo"), problem.w0, problem.grad_fn, num_workers=3, timing=Replay(first.events),
                      batch=3).run().result()
    assert torch.equal(again.params, first.params)


@pytest.mark.parametrize("name", ["asgd", "orlomo"])
def test_a_nan_message_computed_ahead_stops_the_run_when_it_is_consumed(name):
    problem = Quadratic(dim=3, seed=0)
    bad = (2, 0)  # worker 2's first message

    def grad_fn(x, w, i, s):
        g = problem.grad_fn(x, w, i, s)
        return g * float("nan") if (w, i) == bad else g

    kw = {"num_workers": 4, "num_iterations": 20, "order": [0, 1, 0, 3, 2, 1, 0, 3, 2, 1] * 2}
    errors = []
    for batch in (0, 4):
        with pytest.raises(NonFiniteError) as info:
            ormo.simulate(_rule(name), problem.w0, grad_fn, batch=batch, **kw)
        errors.append(info.value)
    seq, bat = errors
    assert (bat.t, bat.worker, bat.index) == (seq.t, seq.worker, seq.index) == (4, 2, 0)
    assert "t=4" in str(bat) and "t=?" not in str(bat)
    assert torch.equal(bat.partial.params, seq.partial.params) and len(bat.partial.events) == 4


def test_a_grad_fn_reusing_its_output_buffer_is_refused_in_batched_mode():
    problem = Quadratic(dim=3)
    out = torch.zeros(3, dtype=problem.dtype)

    def reusing(x, w, i, s):
        return out.copy_(problem.grad_fn(x, w, i, s))

    ormo.simulate(_rule("asgd"), problem.w0, reusing, num_workers=3, num_iterations=6)  # fine one at a time
    with pytest.raises(GradFnError, match="new tensor"):
        ormo.simulate(_rule("asgd"), problem.w0, reusing, num_workers=3, num_iterations=6, batch=3)


def test_bad_batch_arguments_are_one_line_errors():
    problem = Quadratic()
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ConfigError, match="batch"):
            Simulator(_rule("asgd"), problem.w0, problem.grad_fn, num_workers=2, num_iterations=2, batch=bad)
    with pytest.raises(ConfigError, match="grad_batch"):
        Simulator(_rule("asgd"), problem.w0, problem.grad_fn, num_workers=2, num_iterations=2, batch=2,
                  grad_batch=3)

    def short(requests):
        return [problem.grad_fn(*requests[0])]

    with pytest.raises(GradFnError, match="one gradient per request"):
        ormo.simulate(_rule("asgd"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=3, batch=3,
                      grad_batch=short)


# ----------------------------------------------------------------------------------------------------------------
# the task's vmapped gradients: equal to the sequential path up to rounding

#: bound on max|w_batched − w_sequential| / max(1, max|w|) after the run below (float32; measured ≤ 2e-6)
TOLERANCE = 1e-4


def _run_task(cfg, *, batch, total, wrap=None):
    problem = TrainProblem(cfg)
    rule = cfg.method.build()
    grad_batch = (wrap(problem) if wrap else problem.grad_batch) if batch else None
    sim = Simulator(rule, problem.params0, problem.grad_fn, num_workers=cfg.train.num_workers, num_iterations=total,
                    timing=cfg.timing.build(), seed=cfg.train.seed, batch=batch, grad_batch=grad_batch,
                    on_consume=problem.select_message if batch else None)
    losses = []
    while sim.t < total:
        sim.step()
        losses.append(problem.commit_message())
    return sim.result().params, problem, losses


@pytest.mark.parametrize("name", RULES)
def test_vmapped_gradients_match_the_sequential_run_for_every_rule(name):
    extra = ["method.local_steps=2"] if "local_steps" in ormo.make_rule(name).describe()["hyperparameters"] else []
    cfg = load_config(None, [*SYNTH, "model.name=mlp", f"method.name={name}", "train.weight_decay=0.001",
                             "timing.model=slow_fraction", *extra])
    seq, _, seq_losses = _run_task(cfg, batch=0, total=24)
    bat, _, bat_losses = _run_task(cfg, batch=4, total=24)
    diff = (seq - bat).abs().max().item() / max(1.0, seq.abs().max().item())
    assert diff <= TOLERANCE, diff
    assert np.allclose(seq_losses, bat_losses, rtol=1e-4)
    assert not torch.equal(seq, ormo_params0(cfg))  # the run moved


def ormo_params0(cfg):
    return TrainProblem(cfg).params0


@pytest.mark.parametrize("name", ["ormo", "orlomo", "prsgdm"])
def test_vmapped_gradients_match_with_batchnorm_statistics_per_worker(name):
    extra = ["method.local_steps=2"] if name != "ormo" else []
    cfg = load_config(None, [*SYNTH, "model.name=resnet20", f"method.name={name}", *extra])
    # A ResNet on 8x8 images with batches of 8 amplifies rounding chaotically (a 1e-7 relative perturbation of each
    # gradient moves the parameters by ~1e-4 within 12 messages), so the trajectories are compared over 8 messages
    # and every batched gradient against the sequential one at the same point.
    seq, seq_problem, _ = _run_task(cfg, batch=0, total=8)
    reference = TrainProblem(cfg)
    worst = []

    def checked(problem):
        def grad_batch(requests):
            out = problem.grad_batch(requests)
            for (x, w, i, s), g in zip(requests, out, strict=True):
                ref = reference.grad_fn(x, w, i, s)
                reference.discard_message()
                worst.append((ref - g).abs().max().item() / max(1.0, ref.abs().max().item()))
            return out
        return grad_batch

    bat, bat_problem, _ = _run_task(cfg, batch=4, total=8, wrap=checked)
    assert worst and max(worst) <= 1e-5, max(worst)  # each gradient: rounding only (measured ≤ 1.5e-6)
    # the trajectories: measured 2e-4 for OrLoMo, as far as a 1e-6 relative perturbation of the sequential run moves
    assert (seq - bat).abs().max().item() / max(1.0, seq.abs().max().item()) <= 1e-3
    for a, b in zip(seq_problem.worker_buffers, bat_problem.worker_buffers, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    assert torch.allclose(seq_problem.server_buffers, bat_problem.server_buffers, rtol=1e-3, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(seq_problem.worker_int_buffers, bat_problem.worker_int_buffers,
                                                  strict=True))
    assert int(bat_problem.worker_int_buffers[0][0]) > 0  # the statistics moved, per worker


def test_batched_task_runs_are_deterministic_resume_and_replay_bit_for_bit(tmp_path):
    args = [*SYNTH, "model.name=resnet20", "method.name=orlomo", "method.local_steps=2", "train.epochs=0.75",
            "train.checkpoint_every=0.25", "train.batch_workers=true", "train.batch_max=3"]
    cfg = load_config(None, args)
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert torch.equal(a.params, b.params)
    info = json.loads((tmp_path / "a" / "run.json").read_text())
    assert info["batch_workers"] == {"mode": "batched", "max": 3, "why": "train.batch_workers = true"}
    assert replay(tmp_path / "a", write=False)["bit_identical"]
    # stop mid-run as Ctrl-C does (a checkpoint at the iteration boundary, with messages computed ahead) and resume
    from ormo.experiment import run as run_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "DeferredInterrupt", stopping_interrupt(run_module.DeferredInterrupt, 4))
        with pytest.raises(KeyboardInterrupt, match="stopped at iteration 5"):
            train(cfg, tmp_path / "c", progress=False)
    ckpt = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert ckpt["sim"]["computed"] and ckpt["problem"]["batch_staged"]  # computed ahead, saved
    resumed = train(None, tmp_path / "c", resume=True, progress=False)
    assert torch.equal(resumed.params, a.params)
    assert (tmp_path / "c" / "metrics.csv").read_text() == (tmp_path / "a" / "metrics.csv").read_text()


def test_auto_batching_is_sequential_on_cpu_and_recorded(tmp_path):
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.epochs=0.1"])
    train(cfg, tmp_path / "r", progress=False)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["batch_workers"]["mode"] == "sequential" and "CPU" in info["batch_workers"]["why"]
    assert resolve_batching(load_config(None, [*SYNTH, "train.batch_workers=true"]), TrainProblem(cfg)) == {
        "mode": "batched", "max": 4, "why": "train.batch_workers = true"}


def test_the_default_cap_keeps_the_stacked_batch_near_one_gib():
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.num_workers=64", "train.batch_workers=true"])

    class Big:
        params0 = torch.zeros(11_000_000)

        def grad_batch(self, requests):  # pragma: no cover - never called
            raise AssertionError

    assert resolve_batching(cfg, Big())["max"] == (1 << 30) // (3 * 44_000_000)


@pytest.mark.parametrize(("override", "match"), [
    ("train.batch_workers=\"yes\"", "train.batch_workers"),
    ("train.batch_workers=2", "train.batch_workers"),
    ("train.batch_max=0", "train.batch_max"),
])
def test_bad_batching_settings_are_one_line_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*SYNTH, override])


def test_batching_is_refused_on_ray_and_for_a_task_without_grad_batch(tmp_path):
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.batch_workers=true"])
    with pytest.raises(ConfigError, match="--engine ray"):
        train(cfg, tmp_path / "ray", engine="ray", progress=False)
    assert not (tmp_path / "ray").exists()

    class OneAtATime:
        params0 = torch.zeros(3)

    with pytest.raises(ConfigError, match="no grad_batch"):
        resolve_batching(cfg, OneAtATime())
    auto = load_config(None, [*SYNTH, "model.name=mlp", "train.device=cpu"])
    assert resolve_batching(auto, OneAtATime())["mode"] == "sequential"


def test_a_loss_vmap_cannot_run_is_a_one_line_task_error():
    cfg = load_config(None, [*SYNTH, "model.name=mlp"])
    problem = TrainProblem(cfg)

    def item_loss(model, batch):
        x, y = batch
        out = torch.nn.functional.cross_entropy(model(x), y)
        if out.item() > 0:  # data-dependent control flow: not batchable
            return out
        return out

    problem.loss = item_loss
    assert "vmap" in problem.batch_problem()
    with pytest.raises(Exception, match="batch_workers = false") as info:
        problem.grad_batch([(problem.params0, 0, 0, 0), (problem.params0, 1, 0, 0)])
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run under the device tool, see README)")
def test_batched_on_cuda_matches_sequential_on_cuda():
    cfg = load_config(None, [*SYNTH, "model.name=resnet20", "method.name=ormo", "train.device=cuda"])
    seq, _, _ = _run_task(cfg, batch=0, total=16)
    bat, _, _ = _run_task(cfg, batch=4, total=16)
    assert seq.device.type == "cuda"
    assert (seq - bat).abs().max().item() / max(1.0, seq.abs().max().item()) <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------------
# what an adversarial read found: failures stay with their message, interrupts leave no thread behind


def _failing_for(bad, problem):
    def grad_fn(x, w, i, s):
        if (w, i) == bad:
            raise KeyError(f"no data for worker {w} index {i}")
        return problem.grad_fn(x, w, i, s)
    return grad_fn


@pytest.mark.parametrize("name", ["asgd", "orlomo"])
def test_an_exception_in_a_message_never_consumed_changes_nothing(name):
    problem = Quadratic(dim=3, seed=0)
    kw = {"num_workers": 4, "num_iterations": 40, "timing": SlowFraction(fraction=0.25, slowdown=4.0), "seed": 1}
    one = ormo.simulate(_rule(name), problem.w0, problem.grad_fn, **kw)
    # the message each worker was sent last (at its last arrival t, parameter index t + 1), never consumed
    last_t = {w: t for t, w in enumerate(one.events.workers)}
    unused = min(((w, t + 1) for w, t in last_t.items()), key=lambda m: m[1])
    failing = _failing_for(unused, problem)
    asked = []

    def grad_fn(x, w, i, s):
        asked.append((w, i))
        return failing(x, w, i, s)

    batched = ormo.simulate(_rule(name), problem.w0, grad_fn, batch=4, **kw)
    assert unused in asked  # it was computed ahead, and failed
    assert torch.equal(batched.params, one.params) and batched.events == one.events


def test_an_exception_in_a_consumed_message_is_raised_at_its_iteration_and_a_retry_raises_it_again():
    problem = Quadratic(dim=3, seed=0)

    def grad_batch(requests):
        if any(w == 2 for _, w, _, _ in requests):
            raise KeyError("worker 2's data is missing")  # the whole batch fails: retried request by request
        return [problem.grad_fn(*r) for r in requests]

    sim = Simulator(_rule("asgd"), problem.w0, problem.grad_fn, num_workers=4, order=[0, 1, 2, 3], batch=4,
                    grad_batch=grad_batch)
    sim.run(2)
    for _ in range(2):
        with pytest.raises(KeyError, match="worker 2"):
            sim.step()
        assert sim.t == 2  # the arrival was put back
    assert set(sim.computed) == {2, 3}  # worker 3's message was computed alone, worker 2's error is held


@pytest.mark.parametrize("returned", [None, 3, "short"])
def test_a_grad_batch_returning_nonsense_is_a_grad_fn_error_naming_the_iteration(returned):
    problem = Quadratic(dim=3)

    def grad_batch(requests):
        if returned == "short":
            return [problem.grad_fn(*requests[0])]
        return returned

    sim = Simulator(_rule("asgd"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=3, batch=3,
                    grad_batch=grad_batch)
    with pytest.raises(GradFnError, match=r"grad_batch\(requests\) returned .*server iteration t=0") as info:
        sim.step()
    assert info.value.t == 0 and info.value.partial is not None and sim.t == 0
    with pytest.raises(GradFnError):  # and again: the simulator is still at the boundary
        sim.step()


def test_an_interrupt_in_the_lockstep_leaves_no_thread_waiting():
    import threading

    problem = Quadratic(dim=3)
    calls = []

    def grad_batch(requests):
        calls.append(len(requests))
        if len(calls) == 2:  # the second local step of the batch
            raise KeyboardInterrupt
        return [problem.grad_fn(*r) for r in requests]

    before = {t for t in threading.enumerate() if t.name == "ormo-batched-worker"}
    with pytest.raises(KeyboardInterrupt):
        ormo.simulate(_rule("orlomo"), problem.w0, problem.grad_fn, num_workers=4, num_iterations=8, batch=4,
                      grad_batch=grad_batch)
    for t in threading.enumerate():
        if t.name == "ormo-batched-worker" and t not in before:
            t.join(timeout=5)
            assert not t.is_alive()


def test_a_batch_mismatch_is_refused_before_anything_is_loaded():
    problem = Quadratic()
    saved = Simulator(_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=10,
                      batch=3).run(6).state_dict()
    other = Simulator(_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=10)
    with pytest.raises(ConfigError):
        other.load_state_dict(saved)
    assert other.t == 0 and torch.equal(other.state.params, problem.w0)


def test_a_huge_batch_max_is_refused_and_a_large_one_is_capped_at_k():
    with pytest.raises(ConfigError, match="train.batch_max"):
        load_config(None, [*SYNTH, "train.batch_max=99999999999"])
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.batch_workers=true", "train.batch_max=1000"])
    assert resolve_batching(cfg, TrainProblem(cfg))["max"] == 4


def test_a_run_from_before_these_settings_existed_resumes_one_message_at_a_time(tmp_path):
    """Its config.toml and checkpoint lack train.batch_workers/batch_max/channels_last: they held the defaults (what
    it ran with), so the checkpoint is accepted, and it continues sequentially, bit for bit."""
    from ormo.experiment import run as run_module
    from ormo.experiment.rundir import config_diff

    args = [*SYNTH, "model.name=mlp", "method.name=ormo", "train.epochs=0.5", "train.checkpoint_every=0.125"]
    reference = train(load_config(None, args), tmp_path / "ref", progress=False)

    class StopEarly(run_module.DeferredInterrupt):
        reads = 0

        @property
        def requested(self):
            type(self).reads += 1
            return signal.SIGTERM if type(self).reads > 10 else None

        @requested.setter
        def requested(self, value):
            pass

    run_dir = tmp_path / "old"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "DeferredInterrupt", StopEarly)
        with pytest.raises(KeyboardInterrupt):
            train(load_config(None, args), run_dir, progress=False)
    # as an older ormo wrote them: without the three settings, and run.json without the batching record
    new_keys = ("batch_workers", "batch_max", "channels_last")

    def old(text):
        return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(new_keys))

    config = (run_dir / "config.toml").read_text()
    assert any(line.startswith(new_keys) for line in config.splitlines())
    (run_dir / "config.toml").write_text(old(config))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["config"] = old(ckpt["config"])
    ckpt["config_sha256"] = "from an older ormo"
    torch.save(ckpt, run_dir / "checkpoint.pt")
    info = json.loads((run_dir / "run.json").read_text())
    del info["batch_workers"]
    (run_dir / "run.json").write_text(json.dumps(info))
    assert config_diff(ckpt["config"], config) == ("", "")  # absent = the default it ran with
    resumed = train(None, run_dir, resume=True, progress=False)
    assert torch.equal(resumed.params, reference.params)
    assert json.loads((run_dir / "run.json").read_text())["batch_workers"]["mode"] == "sequential"


def test_a_run_stopped_before_its_first_checkpoint_takes_the_batching_of_its_edited_config(tmp_path):
    # an adversarial read: the error of a loss vmap cannot run says "set train.batch_workers = false"; a resume after
    # that edit reused the recorded batched mode although no checkpoint held it
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.epochs=0.25", "train.batch_workers=true"])
    run_dir = tmp_path / "r"
    from ormo.experiment import run as run_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainProblem, "grad_batch", lambda self, requests: (_ for _ in ()).throw(RuntimeError("no vmap")))
        with pytest.raises(Exception, match="no vmap"):
            run_module.train(cfg, run_dir, progress=False)
    assert not (run_dir / "checkpoint.pt").exists()
    text = (run_dir / "config.toml").read_text().replace("batch_workers = true", "batch_workers = false")
    (run_dir / "config.toml").write_text(text)
    resumed = train(None, run_dir, resume=True, progress=False)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["batch_workers"] == {"mode": "sequential", "why": "train.batch_workers = false"}
    whole = train(load_config(None, [*SYNTH, "model.name=mlp", "train.epochs=0.25", "train.batch_workers=false"]),
                  tmp_path / "w", progress=False)
    assert torch.equal(resumed.params, whole.params)


# ----------------------------------------------------------------------------------------------------------------
# an audit found batched mode quietly computing one message at a time while run.json said "batched"


def test_batching_asked_for_a_task_that_cannot_batch_is_a_one_line_error():
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.batch_workers=true"])

    class Ragged:
        params0 = torch.zeros(3)

        def grad_batch(self, requests):  # pragma: no cover - never called
            raise AssertionError

        def batch_problem(self):
            return "Ragged.batch() gave minibatches that cannot be stacked"

    with pytest.raises(ConfigError, match=r"batch_workers: true \(Ragged.batch\(\) gave .*set it to false") as info:
        resolve_batching(cfg, Ragged())
    assert "\n" not in str(info.value)
    auto = load_config(None, [*SYNTH, "model.name=mlp", "train.device=cpu"])
    assert resolve_batching(auto, Ragged())["mode"] == "sequential"


def test_a_batch_that_fails_only_as_a_batch_stops_the_run_instead_of_going_on_one_at_a_time():
    problem = Quadratic(dim=3, seed=0)
    calls = []

    def grad_batch(requests):
        calls.append(len(requests))
        if len(requests) > 1:
            raise ValueError("minibatches of 8 and 9 examples cannot be stacked")
        return [problem.grad_fn(*r) for r in requests]

    sim = Simulator(_rule("asgd"), problem.w0, problem.grad_fn, num_workers=4, order=[0, 1, 2, 3], batch=4,
                    grad_batch=grad_batch)
    with pytest.raises(ValueError, match="cannot be stacked"):
        sim.step()
    assert sim.t == 0 and calls == [4, 1, 1, 1, 1]
