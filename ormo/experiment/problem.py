"""A model on a dataset, seen by the engine as ``grad_fn(params, worker, index, step)``.

Conventions (spec §9):

* A13, weight decay: the worker adds ``λ·x`` to its gradient, at the point it evaluates.
* A14, BatchNorm running statistics: every worker keeps its own (updated by its training-mode forward passes and
  kept across its messages); each message carries them to the server, which keeps the latest it consumed and
  evaluates the server parameters with those. A message's statistics are staged while it is computed and committed
  (:meth:`TrainProblem.commit_message`) only once the engine accepted it, so a rejected or diverged message never
  reaches the worker's or the server's statistics.
* A16, training loss: the mean of the workers' minibatch losses (for a local method, the mean over its H steps is
  the message's loss); the run loop averages it over the last epoch of messages.
* The minibatch is a pure function of (seed, worker, parameter index, local step), and so is its augmentation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import Dataset, load_dataset
from ..data.augment import Augment, normalize
from ..data.base import balanced_subset, seeded_generator
from ..data.sampler import minibatch_generator, minibatch_indices
from ..flat import FlatModel
from ..models import build_model
from ..rules.base import ConfigError
from .config import ExperimentConfig

EVAL_BATCH = 1000
#: the validation hold-out's generator: seed 0 of its own stream, so every seed and method holds out the same examples
_STREAM_VALIDATION = 0x7A11D


class TrainProblem:
    """Builds the dataset and the model of ``cfg`` and serves gradients to an engine."""

    def __init__(self, cfg: ExperimentConfig, *, dataset: Dataset | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.train.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"train.device={cfg.train.device!r} but CUDA is not available on this machine")
        d = cfg.data
        ds = dataset or load_dataset(
            d.name, data_dir=d.data_dir, download=d.download, subset=d.subset, seed=cfg.train.seed, **d.options
        )
        c, h, _ = ds.image_shape
        model = build_model(cfg.model.name, num_classes=ds.num_classes, in_channels=c, image_size=h,
                            seed=cfg.train.seed)
        self.model = model.to(self.device)
        self.flat = FlatModel(self.model)
        # Data lives on the device once; a minibatch is one gather.
        train_x, train_y = ds.train_x, ds.train_y
        self.val_x = self.val_y = None
        if d.validation is not None:
            n = int(train_y.shape[0])
            if d.validation >= n:
                raise ConfigError(f"invalid data.validation: {d.validation} (must be < the {n} training examples; "
                                  f"a validation split is held out of the training set)")
            held = torch.zeros(n, dtype=torch.bool)
            held[balanced_subset(train_y, d.validation, num_classes=ds.num_classes,
                                 generator=seeded_generator(0, _STREAM_VALIDATION))] = True
            self.val_x, self.val_y = train_x[held].to(self.device), train_y[held].to(self.device)
            train_x, train_y = train_x[~held], train_y[~held]
        self.train_x, self.train_y = train_x.to(self.device), train_y.to(self.device)
        self.test_x: Tensor | None = None
        self.test_y: Tensor | None = None
        if cfg.train.eval_test:  # otherwise the test split is never kept, so nothing can read it
            self.test_x, self.test_y = ds.test_x.to(self.device), ds.test_y.to(self.device)
        self.mean, self.std = ds.mean, ds.std
        self.augment = Augment(crop_padding=4, flip=True, mean=ds.mean, std=ds.std) if d.augment else None
        self.batch_size, self.seed = d.batch_size, cfg.train.seed
        self.weight_decay = cfg.train.weight_decay
        self.params0 = self.flat.params.detach().clone()
        k = cfg.train.num_workers
        self.initial_buffers = self.flat.buffers.clone()
        self.initial_int_buffers = self.flat.int_buffers.clone()
        self.worker_buffers = [self.flat.buffers.clone() for _ in range(k)]
        self.worker_int_buffers = [self.flat.int_buffers.clone() for _ in range(k)]
        self.server_buffers = self.flat.buffers.clone()
        self.server_int_buffers = self.flat.int_buffers.clone()
        self._staged: int | None = None  # the worker whose message is being computed (its statistics are in the model)
        self._loss_sum, self._loss_count = 0.0, 0

    @property
    def train_size(self) -> int:
        return int(self.train_x.shape[0])

    # -- the engine's view ----------------------------------------------------------------------------------
    def batch(self, worker: int, index: int, step: int) -> tuple[Tensor, Tensor]:
        """The (augmented, normalized) minibatch of ``worker`` at parameter ``index``, local step ``step``."""
        idx = minibatch_indices(self.train_size, self.batch_size, seed=self.seed, worker=worker, index=index,
                                step=step).to(self.device)
        x, y = self.train_x[idx], self.train_y[idx]
        if self.augment is not None:
            x = self.augment(x, minibatch_generator(self.seed, worker, index, step, stream=1))
        else:
            x = normalize(x, self.mean, self.std)
        return x, y

    def grad_fn(self, params: Tensor, worker: int, index: int, step: int) -> Tensor:
        """Stochastic gradient at ``params`` (plus ``λ·params``). The worker's BN statistics move on in the model
        (staged) until :meth:`commit_message`."""
        x, y = self.batch(worker, index, step)
        flat = self.flat
        flat.load_params(params)
        if self._staged != worker:  # a new message: start from the worker's committed statistics
            flat.buffers.copy_(self.worker_buffers[worker])
            flat.int_buffers.copy_(self.worker_int_buffers[worker])
            self._staged, self._loss_sum, self._loss_count = worker, 0.0, 0
        self.model.train()
        flat.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        flat.check_bound()
        self._loss_sum += float(loss.detach())  # one host sync per gradient (CPU: free)
        self._loss_count += 1
        g = flat.grad.clone()  # the engine may hold it past the next gradient (local loops)
        if self.weight_decay:
            g.add_(params, alpha=self.weight_decay)
        if not bool(torch.isfinite(flat.buffers.sum())):  # diverged statistics: make the engine reject the message
            g.fill_(float("nan"))
        return g

    def reset_worker(self, worker: int) -> None:
        """A restarted worker process starts from the model's initial BatchNorm statistics."""
        self.worker_buffers[worker].copy_(self.initial_buffers)
        self.worker_int_buffers[worker].copy_(self.initial_int_buffers)
        if self._staged == worker:
            self.discard_message()

    def message_loss(self) -> float:
        """The loss of the message just computed (mean over its local steps), without committing anything."""
        return self._loss_sum / self._loss_count if self._loss_count else float("nan")

    def commit_message(self) -> float:
        """The engine accepted the message just computed: its worker keeps the staged BatchNorm statistics and the
        server keeps them as the latest (A14). Returns the message's loss (mean over its local steps)."""
        out = self._loss_sum / self._loss_count if self._loss_count else float("nan")
        if self._staged is not None:
            w = self._staged
            self.worker_buffers[w].copy_(self.flat.buffers)
            self.worker_int_buffers[w].copy_(self.flat.int_buffers)
            self.server_buffers.copy_(self.flat.buffers)
            self.server_int_buffers.copy_(self.flat.int_buffers)
        self._staged, self._loss_sum, self._loss_count = None, 0.0, 0
        return out

    def discard_message(self) -> None:
        """The engine rejected the message just computed: nothing of it is kept."""
        self._staged, self._loss_sum, self._loss_count = None, 0.0, 0

    # -- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, params: Tensor) -> tuple[float | None, float | None]:
        """(test loss, test accuracy in %) of the server parameters with the server's BN statistics; (None, None)
        with ``train.eval_test = false``."""
        if self.test_x is None or self.test_y is None:
            return None, None
        return self._evaluate(params, self.test_x, self.test_y)

    def evaluate_validation(self, params: Tensor) -> tuple[float | None, float | None]:
        """(validation loss, accuracy in %) like :meth:`evaluate`, on the held-out split; (None, None) without one."""
        if self.val_x is None or self.val_y is None:
            return None, None
        return self._evaluate(params, self.val_x, self.val_y)

    @torch.no_grad()
    def _evaluate(self, params: Tensor, xs: Tensor, ys: Tensor) -> tuple[float, float]:
        self.flat.load_params(params)
        self.flat.buffers.copy_(self.server_buffers)
        self.flat.int_buffers.copy_(self.server_int_buffers)
        self._staged = None  # the model's statistics are now the server's
        self.model.eval()
        total_loss, correct, n = 0.0, 0, int(xs.shape[0])
        for start in range(0, n, EVAL_BATCH):
            x = normalize(xs[start : start + EVAL_BATCH], self.mean, self.std)
            y = ys[start : start + EVAL_BATCH]
            out = self.model(x)
            total_loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        return total_loss / n, 100.0 * correct / n

    # -- checkpoints ------------------------------------------------------------------------------------------
    def model_state(self, params: Tensor) -> dict[str, Tensor]:
        """A ``state_dict`` of the model with these parameters and the server's BatchNorm statistics (loadable into
        ``build_model(...)``)."""
        self.flat.load_params(params)
        self.flat.buffers.copy_(self.server_buffers)
        self.flat.int_buffers.copy_(self.server_int_buffers)
        self._staged = None
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """The committed BatchNorm state of every worker and of the server (taken between messages)."""
        return {
            "worker_buffers": [b.clone() for b in self.worker_buffers],
            "worker_int_buffers": [b.clone() for b in self.worker_int_buffers],
            "server_buffers": self.server_buffers.clone(),
            "server_int_buffers": self.server_int_buffers.clone(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for mine, saved in ((self.worker_buffers, sd["worker_buffers"]),
                            (self.worker_int_buffers, sd["worker_int_buffers"])):
            for b, s in zip(mine, saved, strict=True):
                b.copy_(s)
        self.server_buffers.copy_(sd["server_buffers"])
        self.server_int_buffers.copy_(sd["server_int_buffers"])
        self._staged = None
