"""The task seam: the one thing an engine needs from a training problem.

The simulator, the Ray workers and the replay see a training problem only through :class:`Task`:

* ``params0``: the initial flat parameter vector; ``train_size``: examples per epoch (an epoch is ``train_size /
  batch_size`` gradients);
* ``grad_fn(params, worker, index, step)``: the stochastic gradient at ``params`` on the minibatch of ``worker`` at
  parameter ``index``, local step ``step`` (with weight decay ``λ·params`` added, spec A13);
* per-worker model state (BatchNorm running statistics, spec A14): a message's state is *staged* while it is
  computed, :meth:`Task.commit_message` keeps it (the worker's and, as the latest, the server's) once the engine
  accepted the message, :meth:`Task.discard_message` drops it; ``message_state()`` / ``set_server_state()`` carry it
  across processes on Ray;
* ``evaluate(params, split)``: the server parameters' named metrics on the ``"test"`` or ``"val"`` split (None when
  the task has no such split), each declared in ``metrics`` with its direction (:class:`Metric`), so tables, plots,
  tuning and time-to-target work for any metric. A run writes them as ``test_<name>`` and ``val_<name>`` columns.

:class:`ModelTask` implements all of it for a ``torch.nn.Module``; a task then says only how to draw a minibatch
(:meth:`ModelTask.batch`), what the loss is (:meth:`ModelTask.loss`) and how to evaluate (:meth:`ModelTask.
evaluate_model`). Image classification (``ormo.experiment.problem``) and the bundled byte-level language model
(``ormo.tasks.stdlib_lm``) are two such tasks.

What a task must guarantee, for exact replay and exact resume:

1. **Keyed batches.** ``batch(worker, index, step)`` is a pure function of ``(seed, worker, index, step)`` (use
   :meth:`ModelTask.generator` or :meth:`ModelTask.minibatch_indices`): the engines compute gradients lazily and in
   an order that depends on timing, and a replay recomputes them.
2. **No global random state.** Never draw from ``torch``'s or ``numpy``'s global generator: seed explicit
   generators from ``context.seed`` (:func:`seeded` builds a model inside a forked, seeded RNG scope). A training
   step must not be random in any other way (no dropout unless its mask is drawn from a keyed generator).
3. **Deterministic construction.** Building the task twice with the same context gives the same ``params0``, data
   and splits (every Ray worker, a resumed run and a replay rebuild it).
4. **Committed state only between messages.** All state that changes while a gradient is computed is staged per
   message (``ModelTask`` does this for the module's buffers) and is part of ``state_dict()``, so a checkpoint is
   taken between messages.
5. **The test split stays unread when ``context.eval_test`` is false** (a tuning run): the run loop never asks for
   it, and a task should not even load it then.
"""

from __future__ import annotations

import math
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from .data.sampler import minibatch_generator
from .data.sampler import minibatch_indices as _minibatch_indices
from .errors import ConfigError
from .flat import FlatModel

#: the evaluation splits, in the column order of a metrics row: ``test_<metric>`` then ``val_<metric>``
SPLITS: tuple[str, ...] = ("test", "val")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Metric:
    """One evaluation metric of a task, reported for each split it evaluates (as ``test_<name>``, ``val_<name>``)."""

    #: lower-case identifier, e.g. ``"loss"``, ``"acc"``, ``"ppl"``
    name: str
    #: the direction: tuning picks, and time-to-target waits for, the better side
    higher_is_better: bool
    #: column heading in tables and plots, e.g. ``"acc. (%)"``; default: the name
    label: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"invalid metric name {self.name!r}: must be a lower-case identifier like 'ppl' "
                              f"(letters, digits, underscores; it becomes the columns test_<name> and val_<name>)")
        if not isinstance(self.higher_is_better, bool):
            raise ConfigError(f"metric {self.name!r}: higher_is_better must be true or false, got "
                              f"{self.higher_is_better!r}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "higher_is_better": self.higher_is_better, "label": self.label or self.name}


@dataclass(frozen=True)
class TaskContext:
    """What a task is told about the run: the framework values it must honour (and nothing else of the config)."""

    #: the run's seed (``train.seed``): seed every generator of the task from it
    seed: int
    #: number of workers K (ids 0..K-1)
    num_workers: int
    #: minibatch size per gradient (``data.batch_size``)
    batch_size: int
    #: L2 weight decay λ, added to the gradient at the point it is evaluated (``train.weight_decay``)
    weight_decay: float = 0.0
    #: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``train.device``; the Ray driver evaluates on the CPU)
    device: str = "cpu"
    #: false for a tuning run: the test split must not be read (``train.eval_test``)
    eval_test: bool = True


@runtime_checkable
class Task(Protocol):
    """What the engines need from a training problem (see the module docstring for the contract)."""

    #: the metrics :meth:`evaluate` returns, by name, with their directions
    metrics: tuple[Metric, ...]
    #: the initial flat parameter vector w_0
    params0: Tensor
    #: examples per epoch
    train_size: int

    def grad_fn(self, params: Tensor, worker: int, index: int, step: int) -> Tensor: ...

    def message_loss(self) -> float: ...

    def commit_message(self) -> float: ...

    def discard_message(self) -> None: ...

    def reset_worker(self, worker: int) -> None: ...

    def message_state(self) -> Tensor: ...

    def server_state(self) -> Tensor: ...

    def set_server_state(self, state: Tensor) -> None: ...

    def evaluate(self, params: Tensor, split: str) -> Mapping[str, float] | None: ...

    def final_state(self, params: Tensor) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> None: ...


class TaskError(RuntimeError):
    """A task's own code (its batch, loss or evaluation) failed during training; the message names the method and
    the file and line where it failed."""


def _failure(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def primary_metric(task: Any) -> str:
    """The metric a progress bar shows and plots draw: ``task.primary_metric`` if set, else the first declared."""
    name = getattr(task, "primary_metric", None)
    return name if name is not None else task.metrics[0].name


def check_task(task: Any, *, where: str) -> None:
    """A one-line ConfigError when ``task`` (made by ``where``) does not implement :class:`Task` or declares bad
    metrics."""
    if not isinstance(task, Task):
        missing = [n for n in ("metrics", "params0", "train_size", "grad_fn", "commit_message", "discard_message",
                               "message_loss", "reset_worker", "message_state", "server_state", "set_server_state",
                               "evaluate", "final_state", "state_dict", "load_state_dict") if not hasattr(task, n)]
        raise ConfigError(f"{where} returned {type(task).__name__}, not a task (it lacks {', '.join(missing)}); "
                          f"return an ormo.task.ModelTask subclass, or an object with the methods of ormo.task.Task")
    metrics = task.metrics
    if not isinstance(metrics, tuple | list) or not metrics or not all(isinstance(m, Metric) for m in metrics):
        raise ConfigError(f"{where}: the task's metrics must be a non-empty tuple of ormo.task.Metric, got "
                          f"{metrics!r}")
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: the task declares metric {next(n for n in names if names.count(n) > 1)!r} twice")
    primary = primary_metric(task)
    if primary not in names:
        raise ConfigError(f"{where}: primary_metric {primary!r} is not one of the task's metrics: {', '.join(names)}")
    if not isinstance(task.params0, Tensor) or task.params0.dim() != 1 or not task.params0.is_floating_point():
        raise ConfigError(f"{where}: params0 must be a 1-D floating-point tensor")
    if isinstance(task.train_size, bool) or not isinstance(task.train_size, int) or task.train_size < 1:
        raise ConfigError(f"{where}: train_size must be an integer >= 1 (examples per epoch), got "
                          f"{task.train_size!r}")


def evaluate_all(task: Task, params: Tensor, *, eval_test: bool) -> dict[str, float | None]:
    """``{"test_<metric>": value, ..., "val_<metric>": value, ...}`` of the server parameters; None where the task has
    no such split, and for the test split when ``eval_test`` is false (it is then never evaluated)."""
    out: dict[str, float | None] = {}
    for split in SPLITS:
        values = task.evaluate(params, split) if (split != "test" or eval_test) else None
        if values is not None and not isinstance(values, Mapping):
            raise ValueError(f"the task's evaluate(params, {split!r}) returned {type(values).__name__}, not a mapping "
                             f"of its metrics (did evaluate_model forget to return them?)")
        for m in task.metrics:
            if values is None:
                out[f"{split}_{m.name}"] = None
                continue
            if m.name not in values:
                raise ValueError(f"the task's evaluate(params, {split!r}) returned no {m.name!r} (it returned: "
                                 f"{', '.join(values) or 'nothing'}); return every declared metric")
            out[f"{split}_{m.name}"] = _metric_value(values[m.name], split, m.name)
    return out


def _metric_value(value: Any, split: str, name: str) -> float:
    """A metric's value as a float: a real number, or a tensor or array of one element."""
    try:
        if isinstance(value, bool | str | bytes) or value is None:
            raise TypeError
        return float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
        raise ValueError(f"the task's evaluate(params, {split!r}) returned {name!r} = {shown}, not a number; return "
                         f"a float (or a one-element tensor) for every declared metric") from None


def describe_task(task: Task, *, entry: str | None) -> dict[str, Any]:
    """What run.json records about the task: its entry, metrics with directions, primary metric, and its own
    ``describe()`` (e.g. what it read, with a hash), so reports read the metric directions from files."""
    out: dict[str, Any] = {"entry": entry or "image-classification",
                           "metrics": [m.describe() for m in task.metrics], "primary": primary_metric(task)}
    describe = getattr(task, "describe", None)
    if callable(describe):
        out["details"] = describe()
    return out


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def seeded(seed: int, build: Callable[[], ModuleT]) -> ModuleT:
    """``build()`` with torch's CPU generator seeded from ``seed`` inside ``torch.random.fork_rng``: the default
    ``nn`` initialisers become deterministic and the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.random.default_generator.manual_seed(seed)
        return build()


def _unreferenced(t: Tensor) -> bool:
    """Whether ``t`` is held only by its owner's attribute: no other Python reference (the attribute, this argument and
    getrefcount's own make 3) and no other tensor (a view, a numpy array's base) on its storage (the tensor and the
    storage object made here make 2). Trusted only where :data:`_REUSE` says the accounting holds."""
    import sys

    return sys.getrefcount(t) == 3 and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2


def _reuse_is_safe() -> bool:
    """Reuse needs (1) a torch whose C++ holders (autograd's saved tensors, DLPack) count as references, checked on
    the pinned 2.13, and (2) the reference counts above on this interpreter, calibrated here on a held and an
    unheld tensor exactly as ModelTask asks (a newer interpreter may count borrowed references differently)."""
    try:
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    except ValueError:
        return False
    if (major, minor) < (2, 13) or not hasattr(torch._C, "_storage_Use_Count"):
        return False

    class Owner:
        def __init__(self) -> None:
            self.spare = torch.zeros(2)

        def free(self) -> bool:
            return _unreferenced(self.spare)

    owner = Owner()
    unheld = owner.free()
    holder = owner.spare
    held = owner.free()
    view = holder[:1]
    del holder
    viewed = owner.free()
    del view
    return unheld and not held and not viewed


_REUSE = _reuse_is_safe()


class ModelTask:
    """A :class:`Task` for a ``torch.nn.Module``: flat parameters, gradients, per-worker buffers, checkpoints.

    A subclass builds its data and model, calls ``super().__init__(model, context, train_size=..., splits=...)`` and
    implements :meth:`batch`, :meth:`loss` and :meth:`evaluate_model`, and sets the class attribute ``metrics``
    (``primary_metric``: the one progress bars and plots show; default the first).

    The module's floating buffers (BatchNorm running statistics) are per worker (spec A14): a gradient runs the
    model in training mode on the worker's committed buffers; the updated buffers are staged until the engine commits
    the message, and then become the worker's and, as the latest consumed, the server's, with which evaluation runs
    in eval mode. The training loss of a message is the mean of its minibatch losses (A16).
    """

    metrics: tuple[Metric, ...] = ()
    primary_metric: str | None = None
    #: whether the simulator may compute a message from the server's own parameters (large models, one-step
    #: methods; bit-identical): set it False in a task whose loss writes into the model's parameters (e.g. clamps
    #: them through ``.data``), which would then write into the server's
    compute_ahead: bool = True

    def __init__(self, model: nn.Module, context: TaskContext, *, train_size: int,
                 splits: Sequence[str] = SPLITS) -> None:
        self.context = context
        self.device = torch.device(context.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"invalid train.device: {context.device!r} (CUDA is not available on this machine); set "
                              f"train.device = \"cpu\", or run where torch sees a GPU")
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise ConfigError(f"unknown split {unknown[0]!r}: a task evaluates 'test' and/or 'val'")
        #: the splits :meth:`evaluate` answers (the test split only when the run may read it)
        self.splits = tuple(s for s in splits if s != "test" or context.eval_test)
        self.model = model.to(self.device)
        self.flat = FlatModel(self.model)
        self.train_size = int(train_size)
        self.batch_size, self.seed = context.batch_size, context.seed
        self.weight_decay = context.weight_decay
        self.params0 = self.flat.params.detach().clone()
        k = context.num_workers
        self.initial_buffers = self.flat.buffers.clone()
        self.initial_int_buffers = self.flat.int_buffers.clone()
        self.worker_buffers = [self.flat.buffers.clone() for _ in range(k)]
        self.worker_int_buffers = [self.flat.int_buffers.clone() for _ in range(k)]
        self.server_buffers = self.flat.buffers.clone()
        self.server_int_buffers = self.flat.int_buffers.clone()
        self._staged: int | None = None  # the worker whose message is being computed (its buffers are in the model)
        self._loss_sum: float | Tensor = 0.0
        self._loss_count = 0
        #: deferred host reads (``train.deferred_checks``): the loss accumulates on the device (in float64, the same
        #: sum as the Python floats otherwise) and :meth:`commit_message` returns it as a 0-d tensor; a diverged
        #: BatchNorm statistic is folded into the gradient without reading it
        self.defer_sync = False
        self._grad_pool: list[Tensor] = []  # the gradients handed out, each reused once nobody holds it
        self._pool_size = k + 2  # one per message computed ahead, the one being consumed and the one being computed
        # batched mode: per worker, the message computed ahead and not consumed yet: [index, floating buffers,
        # integer buffers, loss sum, loss count] (its staged state); the consumed one's buffers, until committed
        self._batch_staged: dict[int, list[Any]] = {}
        self._staged_rows: tuple[Tensor, Tensor] | None = None
        self._batched: Any = None

    # -- what a subclass provides ----------------------------------------------------------------------------------
    def batch(self, worker: int, index: int, step: int) -> Any:
        """The minibatch of ``worker`` at parameter ``index``, local step ``step``: a pure function of those and the
        seed (draw from :meth:`generator` or :meth:`minibatch_indices`)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The scalar mean loss of ``model`` (in training mode) on ``batch``; its gradient is the message."""
        raise NotImplementedError

    def evaluate_model(self, model: nn.Module, split: str) -> Mapping[str, float]:
        """Every declared metric of ``model`` (server parameters and buffers loaded, eval mode, no autograd) on
        ``split`` (one of ``self.splits``)."""
        raise NotImplementedError

    # -- keyed randomness ------------------------------------------------------------------------------------------
    def generator(self, worker: int, index: int, step: int, stream: int = 0) -> torch.Generator:
        """A CPU generator for stream ``stream`` of the minibatch keyed ``(seed, worker, index, step)``; streams are
        independent (stream 0 is what :meth:`minibatch_indices` draws from)."""
        return minibatch_generator(self.seed, worker, index, step, stream)

    def minibatch_indices(self, worker: int, index: int, step: int, num_examples: int | None = None) -> Tensor:
        """``batch_size`` indices drawn uniformly with replacement from ``[0, num_examples)`` (default
        ``train_size``), keyed by ``(seed, worker, index, step)``."""
        return _minibatch_indices(self.train_size if num_examples is None else num_examples, self.batch_size,
                                  seed=self.seed, worker=worker, index=index, step=step)

    # -- the engine's view -----------------------------------------------------------------------------------------
    def grad_fn(self, params: Tensor, worker: int, index: int, step: int) -> Tensor:
        """Stochastic gradient at ``params`` (plus ``λ·params``). The worker's buffers move on in the model (staged)
        until :meth:`commit_message`."""
        batch = self._batch_of(worker, index, step)
        flat = self.flat
        flat.load_params(params)
        if self._staged != worker:  # a new message: start from the worker's committed statistics
            flat.buffers.copy_(self.worker_buffers[worker])
            flat.int_buffers.copy_(self.worker_int_buffers[worker])
            self._staged, self._loss_sum, self._loss_count = worker, 0.0, 0
        if not self.model.training:  # only evaluation switches it to eval mode (a recursive walk costs per message)
            self.model.train()
        flat.zero_grad()
        try:
            loss = self.loss(self.model, batch)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise TypeError(f"loss() must return a scalar tensor (a mean over the batch), got "
                                f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}")
            loss.backward()
        except Exception as e:
            raise TaskError(f"{type(self).__name__}.loss() failed: {_failure(e)}") from e
        flat.check_bound()
        if self.defer_sync:
            self._loss_sum = self._loss_sum + loss.detach().double()
        else:
            self._loss_sum += float(loss.detach())  # one host sync per gradient (CPU: free)
        self._loss_count += 1
        g = self._gradient_out(flat.grad)
        if self.weight_decay:
            g.add_(params, alpha=self.weight_decay)
        if flat.buffers.numel():  # diverged statistics: make the engine reject the message
            if self.defer_sync:
                g.masked_fill_(~torch.isfinite(flat.buffers.sum()), float("nan"))
            elif not bool(torch.isfinite(flat.buffers.sum())):
                g.fill_(float("nan"))
        return g

    def grad_batch(self, requests: Sequence[tuple[Tensor, int, int, int]]) -> list[Tensor]:
        """The gradients of several ``(params, worker, index, step)`` requests in one ``torch.func.vmap`` call
        (batched in-flight gradients, ``train.batch_workers``): each with its worker's staged buffers, as
        :meth:`grad_fn` would compute it up to rounding. A step-0 request starts its worker's message from the
        committed buffers; its state stays staged per worker until :meth:`select_message` and the commit. One host
        sync per call (the losses)."""
        from .vmapgrad import stack_batches

        batches = [self._batch_of(worker, index, step) for _, worker, index, step in requests]
        staged = []
        for _, worker, index, step in requests:
            entry = self._batch_staged.get(worker)
            if step == 0 or entry is None or entry[0] != index:  # a new message: from the committed statistics
                entry = [index, self.worker_buffers[worker], self.worker_int_buffers[worker], 0.0, 0]
            staged.append(entry)
        params = torch.stack([r[0] for r in requests])
        buffers = torch.stack([e[1] for e in staged])
        int_buffers = torch.stack([e[2] for e in staged])
        try:
            stacked = stack_batches(batches)
        except Exception as e:
            raise TaskError(f"{type(self).__name__}.batch() gave minibatches that cannot be stacked for a batch of "
                            f"workers ({_failure(e)}): batched gradients need tensors of the same shapes; set "
                            f"train.batch_workers = false to compute one message at a time") from e
        try:
            grads, losses = self._batched_gradient()(params, buffers, int_buffers, stacked)
            if losses.dim() != 1:
                raise TypeError(f"loss() must return a scalar tensor (a mean over the batch), got shape "
                                f"{tuple(losses.shape[1:])}")
        except Exception as e:
            raise TaskError(f"{type(self).__name__}.loss() could not be computed for a batch of workers with "
                            f"torch.func.vmap ({_failure(e)}); set train.batch_workers = false to compute one "
                            f"message at a time") from e
        if self.weight_decay:
            grads.add_(params, alpha=self.weight_decay)
        if buffers.numel():  # diverged statistics: make the engine reject that message (no host sync)
            grads.masked_fill_(~torch.isfinite(buffers.sum(1, keepdim=True)), float("nan"))
        values = losses.double().unbind(0) if self.defer_sync else losses.tolist()
        for row, (entry, value) in enumerate(zip(staged, values, strict=True)):
            worker = requests[row][1]
            self._batch_staged[worker] = [entry[0], buffers[row], int_buffers[row], entry[3] + value, entry[4] + 1]
        return list(grads.unbind(0))

    def batch_problem(self) -> str | None:
        """Why this task's gradients cannot be batched (None when they can): one batched gradient of two requests at
        ``params0`` on the minibatches of workers 0 and 1, touching no state."""
        from .vmapgrad import stack_batches

        try:
            batched = self._batched_gradient()
            batches = stack_batches([self.batch(w, 0, 0) for w in (0, 1)])
            two = torch.stack([self.params0, self.params0])
            grads, losses = batched(two, torch.stack([self.initial_buffers] * 2),
                                    torch.stack([self.initial_int_buffers] * 2), batches)
            if grads.shape != two.shape or losses.shape != (2,):
                return f"the batched gradient has shape {tuple(grads.shape)}, not {tuple(two.shape)}"
        except Exception as e:  # noqa: BLE001 - the reason is reported, the run goes on one message at a time
            return f"{type(self).__name__}.loss() does not run under torch.func.vmap: {_failure(e)}"
        return None

    def _batch_of(self, worker: int, index: int, step: int) -> Any:
        """:meth:`batch`, its failure one line naming the method and where it failed (the task's own code)."""
        try:
            return self.batch(worker, index, step)
        except Exception as e:
            raise TaskError(f"{type(self).__name__}.batch(worker={worker}, index={index}, step={step}) failed: "
                            f"{_failure(e)}") from e

    def _batched_gradient(self) -> Any:
        """The vmapped gradient of this task's loss (built once; it holds no state of its own)."""
        if self._batched is None:
            from .vmapgrad import BatchedGradient

            # self.loss looked up at each call: a task may replace it after the first batch
            self._batched = BatchedGradient(self.model, lambda model, batch: self.loss(model, batch))
        return self._batched

    def select_message(self, worker: int) -> None:
        """Batched mode: the engine consumes ``worker``'s message computed ahead; its staged state becomes the one
        :meth:`commit_message` keeps or :meth:`discard_message` drops."""
        entry = self._batch_staged.pop(worker, None)
        if entry is not None:
            self._staged, self._staged_rows = worker, (entry[1], entry[2])
            self._loss_sum, self._loss_count = entry[3], entry[4]

    def _gradient_out(self, grad: Tensor) -> Tensor:
        """A copy of ``grad`` that the caller owns: the memory of one handed out before when nothing holds it any
        more (no reference, no view, no numpy alias: a fresh 44 MB allocation per message costs ~1.3x a plain SGD
        step at 11M parameters), else a new tensor. The values are the same either way. The gradients handed out are
        kept in a pool: messages computed ahead hold up to one per worker until consumed."""
        pool = self._grad_pool
        # the most recent first: a small model's last gradient may still be in the cache
        free = next((i for i in reversed(range(len(pool))) if _unreferenced(pool[i])), None) if _REUSE else None
        if self.flat.rebinds and grad is self.flat.grad:  # large tensors: hand the buffer out, bind another
            out = self.flat.swap_grad(pool.pop(free) if free is not None else torch.empty_like(grad))
        elif free is not None:
            out = pool.pop(free).copy_(grad)
        else:
            out = grad.clone()
        pool.append(out)
        if len(pool) > self._pool_size:  # forget the oldest (its holder keeps it alive as long as it needs it)
            del pool[0]
        return out

    def stash_message(self, worker: int, index: int | None) -> None:
        """The engine computed ``worker``'s message ahead (``index``: the parameter it was computed from), to be
        consumed later: its staged state waits per worker until :meth:`select_message`. ``index`` None: the
        computation failed and nothing of it is kept (the engine computes it again when consumed)."""
        if index is not None and self._staged == worker:
            self._batch_staged[worker] = [index, self.flat.buffers.clone(), self.flat.int_buffers.clone(),
                                          self._loss_sum, self._loss_count]
        self.discard_message()

    def reset_worker(self, worker: int) -> None:
        """A restarted worker process starts from the model's initial buffers."""
        self.worker_buffers[worker].copy_(self.initial_buffers)
        self.worker_int_buffers[worker].copy_(self.initial_int_buffers)
        self._batch_staged.pop(worker, None)
        if self._staged == worker:
            self.discard_message()

    def message_loss(self) -> float:
        """The loss of the message just computed (mean over its local steps), without committing anything."""
        return float(self._loss_sum / self._loss_count) if self._loss_count else math.nan

    def commit_message(self) -> float | Tensor:
        """The engine accepted the message just computed: its worker keeps the staged buffers and the server keeps
        them as the latest (A14). Returns the message's loss (mean over its local steps): a float, or with
        ``defer_sync`` a 0-d float64 tensor on the device, unread."""
        out = self._loss_sum / self._loss_count if self._loss_count else math.nan
        if self._staged is not None:
            w = self._staged
            buffers, int_buffers = self._staged_rows or (self.flat.buffers, self.flat.int_buffers)
            self.worker_buffers[w].copy_(buffers)
            self.worker_int_buffers[w].copy_(int_buffers)
            self.server_buffers.copy_(buffers)
            self.server_int_buffers.copy_(int_buffers)
        self._staged, self._staged_rows, self._loss_sum, self._loss_count = None, None, 0.0, 0
        return out

    def discard_message(self) -> None:
        """The engine rejected the message just computed: nothing of it is kept."""
        self._staged, self._staged_rows, self._loss_sum, self._loss_count = None, None, 0.0, 0

    def message_state(self) -> Tensor:
        """The floating buffers of the message just computed (staged), which a Ray message carries to the server."""
        return self._staged_rows[0] if self._staged_rows is not None else self.flat.buffers

    def server_state(self) -> Tensor:
        """The server's latest committed floating buffers."""
        return self.server_buffers

    def set_server_state(self, state: Tensor) -> None:
        """Adopt the Ray server's latest buffers (to evaluate its snapshot)."""
        self.server_buffers.copy_(state)

    # -- evaluation ------------------------------------------------------------------------------------------------
    def _load_server(self, params: Tensor) -> None:
        self.flat.load_params(params)
        self.flat.buffers.copy_(self.server_buffers)
        self.flat.int_buffers.copy_(self.server_int_buffers)
        self._staged = None  # the model's buffers are now the server's

    @torch.no_grad()
    def evaluate(self, params: Tensor, split: str) -> Mapping[str, float] | None:
        """The metrics of the server parameters with the server's buffers on ``split``; None without that split."""
        if split not in self.splits:
            return None
        self._load_server(params)
        self.model.eval()
        try:
            values = self.evaluate_model(self.model, split)
        except Exception as e:
            raise TaskError(f"{type(self).__name__}.evaluate_model(model, {split!r}) failed: {_failure(e)}") from e
        if not isinstance(values, Mapping):
            raise ValueError(f"{type(self).__name__}.evaluate_model(model, {split!r}) returned "
                             f"{type(values).__name__}, not a mapping of its metrics (a forgotten return?)")
        return values

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def model_state(self, params: Tensor) -> dict[str, Tensor]:
        """A ``state_dict`` of the model with these parameters and the server's buffers."""
        self._load_server(params)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def final_state(self, params: Tensor) -> dict[str, Any]:
        """What ``final.pt`` keeps besides the parameters: the server's buffers and the model's ``state_dict``."""
        return {"bn_buffers": self.server_buffers.clone(), "model_state": self.model_state(params)}

    def state_dict(self) -> dict[str, Any]:
        """The committed buffers of every worker and of the server (taken between messages)."""
        return {
            "worker_buffers": [b.clone() for b in self.worker_buffers],
            "worker_int_buffers": [b.clone() for b in self.worker_int_buffers],
            "server_buffers": self.server_buffers.clone(),
            "server_int_buffers": self.server_int_buffers.clone(),
            # batched mode: the staged state of the messages computed ahead (saved with them by the simulator)
            "batch_staged": {w: [e[0], e[1].clone(), e[2].clone(), float(e[3]), e[4]]
                             for w, e in self._batch_staged.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for mine, saved in ((self.worker_buffers, sd["worker_buffers"]),
                            (self.worker_int_buffers, sd["worker_int_buffers"])):
            for b, s in zip(mine, saved, strict=True):
                b.copy_(s)
        self.server_buffers.copy_(sd["server_buffers"])
        self.server_int_buffers.copy_(sd["server_int_buffers"])
        self._batch_staged = {int(w): [int(e[0]), e[1].clone(), e[2].clone(), float(e[3]), int(e[4])]
                              for w, e in sd.get("batch_staged", {}).items()}
        self._staged, self._staged_rows = None, None


__all__ = ["SPLITS", "Metric", "ModelTask", "Task", "TaskContext", "check_task", "describe_task", "evaluate_all",
           "primary_metric", "seeded"]
