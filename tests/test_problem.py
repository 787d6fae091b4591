"""The training problem: flat parameters, gradients against plain autograd, weight decay at the worker (A13),
BatchNorm statistics per worker, staged until a message is accepted (A14), and the training-loss window (A16)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ormo import ConfigError
from ormo.experiment import load_config, train
from ormo.experiment.metrics import read_metrics
from ormo.experiment.problem import TrainProblem
from ormo.flat import FlatModel
from ormo.models import build_model

SYNTH = ["data.name=synthetic", "data.options.train_size=128", "data.options.test_size=32",
         "data.options.image_shape=[3, 8, 8]", "data.batch_size=8", "model.name=resnet20", "train.num_workers=3"]


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_flat_model_gradient_equals_autograd_and_buffers_are_views():
    net, ref = _bn_net(), _bn_net()
    flat = FlatModel(net)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    for _ in range(2):  # twice: the flat gradient is zeroed and refilled in place
        flat.zero_grad()
        F.cross_entropy(net(x), y).backward()
        flat.check_bound()
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    assert torch.allclose(flat.grad, expected, atol=1e-6)
    assert flat.int_buffers.tolist() == [2]  # num_batches_tracked lives in the flat integer buffer
    assert torch.equal(flat.buffers[:4], net[1].running_mean)


def test_replacing_gradients_is_caught_instead_of_silently_training_on_zero():
    net = _bn_net()
    flat = FlatModel(net)
    net.zero_grad()  # torch's default sets every .grad to None
    F.cross_entropy(net(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    with pytest.raises(RuntimeError, match="gradients no longer reach the flat buffer"):
        flat.check_bound()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_zero_element_parameters_first_and_last_are_not_taken_for_replaced_gradients():
    """nn.Linear(1, 0) has parameters of no elements, whose views' address is 0: the check reads the first and last
    parameters that have elements, and still catches replaced gradients."""
    net = nn.Sequential(nn.Linear(0, 2), nn.Linear(2, 3), nn.Linear(3, 0))
    flat = FlatModel(net)
    net(torch.randn(4, 0)).sum().backward()
    flat.check_bound()
    assert flat.num_params == 2 + 2 * 3 + 3
    net.zero_grad()
    net(torch.randn(4, 0)).sum().backward()
    with pytest.raises(RuntimeError, match="gradients no longer reach the flat buffer"):
        flat.check_bound()


def test_gradient_has_weight_decay_added_at_the_worker_point():
    cfg = load_config(None, [*SYNTH, "train.weight_decay=0.01"])
    problem = TrainProblem(cfg)
    params = problem.params0 + 0.01
    g = problem.grad_fn(params, 1, 4, 0)
    problem.commit_message()
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=8, seed=0)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(params, model.parameters())
    model.train()
    x, y = problem.batch(1, 4, 0)
    F.cross_entropy(model(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) + 0.01 * params
    assert torch.allclose(g, expected, atol=1e-5)


def test_batchnorm_statistics_are_per_worker_and_committed_only_when_accepted():
    problem = TrainProblem(load_config(None, SYNTH))
    initial = problem.server_buffers.clone()
    problem.grad_fn(problem.params0, 0, 0, 0)
    assert torch.equal(problem.worker_buffers[0], initial)  # staged, not yet committed
    problem.commit_message()
    w0 = problem.worker_buffers[0].clone()
    assert not torch.equal(w0, initial) and torch.equal(problem.server_buffers, w0)  # the server keeps the latest
    assert torch.equal(problem.worker_buffers[1], initial)  # other workers untouched
    assert problem.worker_int_buffers[0].sum() > 0 and problem.worker_int_buffers[1].sum() == 0
    problem.grad_fn(problem.params0, 1, 0, 0)
    problem.discard_message()  # rejected: nothing kept
    assert torch.equal(problem.worker_buffers[1], initial) and torch.equal(problem.server_buffers, w0)
    # a local message of two steps continues the worker's statistics from step to step
    problem.grad_fn(problem.params0, 0, 3, 0)
    problem.grad_fn(problem.params0, 0, 3, 1)
    problem.commit_message()
    assert int(problem.worker_int_buffers[0][0]) == 3  # 1 + 2 training-mode forward passes


def test_diverged_batchnorm_statistics_poison_the_gradient_not_the_server():
    problem = TrainProblem(load_config(None, SYNTH))
    before = problem.server_buffers.clone()
    g = problem.grad_fn(problem.params0 * 1e30, 2, 0, 0)  # activations overflow the running variance
    assert not torch.isfinite(g).all()
    problem.discard_message()
    assert torch.equal(problem.server_buffers, before)


def test_training_loss_metric_is_the_mean_over_the_last_epoch_of_messages(tmp_path, monkeypatch):
    losses = []
    original = TrainProblem.commit_message

    def recording(self):
        out = original(self)
        losses.append(out)
        return out

    monkeypatch.setattr(TrainProblem, "commit_message", recording)
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "train.epochs=2", "train.eval_every=1"])
    train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    window = math.ceil(128 / 8)  # messages per epoch
    for row in rows[1:]:
        t = row["iteration"]
        assert row["train_loss"] == pytest.approx(float(np.mean(losses[max(0, t - window) : t])), rel=1e-12)


def test_the_schedule_reaches_the_local_rate_of_local_methods(tmp_path):
    cfg = load_config(None, [*SYNTH, "model.name=mlp", "method.name=orlomo", "method.local_steps=2",
                             "train.epochs=2", "train.eval_every=0.5", "schedule.milestones=[1.0]"])
    train(cfg, tmp_path / "run", progress=False)
    scales = [r["lr_scale"] for r in read_metrics(tmp_path / "run")]
    assert scales[:3] == [1.0, 1.0, 1.0] and scales[-1] == pytest.approx(0.1)


def test_a_validation_split_is_held_out_of_training_and_evaluated_like_the_test_set(tmp_path):
    """data.validation removes a class-balanced, seed-independent hold-out from the training set; every metrics row
    reports its loss and accuracy, computed exactly as the test set's."""
    base = ["model.name=mlp", "data.batch_size=16", "train.num_workers=2", "train.epochs=0.5"]
    plain = TrainProblem(load_config(None, base))
    held = TrainProblem(load_config(None, [*base, "data.validation=200"]))
    other_seed = TrainProblem(load_config(None, [*base, "data.validation=200", "train.seed=3"]))
    assert held.train_size == plain.train_size - 200 and held.val_x.shape[0] == 200
    assert torch.equal(held.val_x, other_seed.val_x)  # the same hold-out for every seed
    assert torch.bincount(held.val_y, minlength=10).tolist() == [20] * 10
    # no example is in both: every held-out image is absent from the training set
    flat_train = {tuple(x.flatten().tolist()) for x in held.train_x}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in held.val_x)
    # the validation metrics are the test metrics' computation on the held-out split
    params = held.params0
    loss, acc = held.evaluate_validation(params)
    held.test_x, held.test_y = held.val_x, held.val_y
    assert (loss, acc) == held.evaluate(params)
    assert plain.evaluate_validation(params) == (None, None)

    res = train(load_config(None, [*base, "data.validation=200"]), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert all(0 <= r["val_acc"] <= 100 and r["val_loss"] > 0 for r in rows) and res.final["val_acc"] >= 0
    with pytest.raises(ConfigError, match=r"invalid data.validation: 5000 \(must be < the 1438 training examples"):
        TrainProblem(load_config(None, [*base, "data.validation=5000"]))
    with pytest.raises(ConfigError, match="data.validation"):
        load_config(None, [*base, "data.validation=0"])


def test_the_cpu_evaluation_batch_changes_the_metrics_only_in_the_last_bits(monkeypatch):
    """Issue 10: evaluation runs in batches of 128 on a CPU (cache-sized) instead of 1000; a BatchNorm model's
    accuracy is the same and its loss agrees to float rounding."""
    from ormo.experiment import problem as P

    cfg = load_config(None, [*SYNTH, "data.options.test_size=600"])
    task = TrainProblem(cfg)
    params = task.params0 + 0.01 * torch.randn(task.params0.shape, generator=torch.Generator().manual_seed(1))
    assert P.EVAL_BATCH["cpu"] == 128
    small = task.evaluate(params, "test")
    monkeypatch.setitem(P.EVAL_BATCH, "cpu", 1000)
    large = task.evaluate(params, "test")
    assert small["acc"] == large["acc"]
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-6) and small["loss"] > 0


def test_a_gradient_buffer_is_reused_only_when_nothing_holds_it():
    """Issue 10: the gradient handed out is written into the previous one's memory when no reference, view or numpy
    array holds that any more (a fresh 44 MB per message is measurable at 11M parameters), never under a holder."""
    task = TrainProblem(load_config(None, SYNTH))
    p = task.params0
    first = task.grad_fn(p, 0, 0, 0)
    kept = first.clone()
    second = task.grad_fn(p, 1, 0, 0)  # `first` is held: new memory, and `first` keeps its values
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept)
    view, array = second[:10], second.numpy()
    del second
    third = task.grad_fn(p, 2, 0, 0)
    assert third.data_ptr() != view.data_ptr() and array.ctypes.data != third.data_ptr()
    del view, array, first
    import weakref

    watch, expected = weakref.ref(third), third.clone()  # a weak reference holds nothing
    del third
    fourth = task.grad_fn(p, 2, 0, 0)  # nothing holds the last one: it is reused, and the values are exact
    assert fourth is watch() and torch.equal(fourth, expected)


def test_gradients_held_by_messages_computed_ahead_come_back_to_the_pool_and_the_pool_is_bounded():
    task = TrainProblem(load_config(None, [*SYNTH, "train.num_workers=4", "model.name=mlp"]))  # a pool of at most 6
    p = task.params0
    held = [task.grad_fn(p, w, 0, 0) for w in range(4)]  # four messages computed ahead, none consumed
    ptrs = {g.data_ptr() for g in held}
    assert len(ptrs) == 4
    del held
    again = [task.grad_fn(p, w, 1, 0) for w in range(4)]  # their memory, once consumed
    assert {g.data_ptr() for g in again} == ptrs
    many = [task.grad_fn(p, w % 4, 2 + w, 0) for w in range(20)]  # held elsewhere: new memory, forgotten by the pool
    assert len({g.data_ptr() for g in many + again}) == 24 and len(task._grad_pool) == 6


@pytest.mark.parametrize("method", ["ormo", "orlomo"])
def test_large_parameters_are_bound_and_gradients_swapped_with_the_same_bits(method):
    """Above REBIND_ELEMENTS per tensor the model's parameters become views of the worker's snapshot and the gradient
    leaves by swapping buffers (no copies): the run is bit for bit the copying one."""
    from ormo.engine import Simulator

    cfg = load_config(None, [*SYNTH, "model.name=mlp", "data.options.image_shape=[3, 32, 32]", f"method.name={method}",
                             "method.local_steps=2", "train.weight_decay=0.01"])
    results = []
    for rebinds in (True, False):
        problem = TrainProblem(cfg)
        assert problem.flat.rebinds  # the MLP on 32x32x3 averages over 65,536 elements per tensor
        problem.flat.rebinds = rebinds
        sim = Simulator(cfg.method.build(), problem.params0, problem.grad_fn, num_workers=3, num_iterations=20,
                        seed=1)
        while sim.t < 20:  # a grad_fn writing to its params argument (the snapshot) would stop the run
            sim.step()
            problem.commit_message()
        results.append((sim.result().params, problem.evaluate_test(sim.state.params)))
    (bound, bound_eval), (copied, copied_eval) = results
    assert torch.equal(bound, copied) and bound_eval == copied_eval


def test_channels_last_images_give_the_same_gradients_up_to_rounding_and_are_part_of_the_config():
    base = [*SYNTH, "data.augment=true", "train.weight_decay=0.001"]
    nchw, nhwc = TrainProblem(load_config(None, base)), TrainProblem(load_config(None, [*base,
                                                                                      "train.channels_last=true"]))
    x, _ = nhwc.batch(1, 3, 0)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert torch.equal(x, nchw.batch(1, 3, 0)[0])  # the same values, laid out NHWC
    g1, g2 = nchw.grad_fn(nchw.params0, 1, 3, 0), nhwc.grad_fn(nhwc.params0, 1, 3, 0)
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-5)
    nchw.commit_message()
    nhwc.commit_message()
    a, b = nchw.evaluate(nchw.params0, "test"), nhwc.evaluate(nhwc.params0, "test")
    assert a["acc"] == b["acc"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
    batched = nhwc.grad_batch([(nhwc.params0, 0, 0, 0), (nhwc.params0, 2, 0, 0)])  # vmap takes NHWC images too
    assert len(batched) == 2 and torch.isfinite(batched[0]).all()
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(None, [*SYNTH, "train.channels_last=1"])
