"""The training problem of a config: image classification (the default), or the task its ``[task] entry`` names.

Image classification is one :class:`ormo.task.ModelTask`: a registered model on a registered dataset, cross-entropy
loss, and the metrics ``loss`` and ``acc`` (in %) on the test split and on an optional validation hold-out (spec §9):

* A13, weight decay: the worker adds ``λ·x`` to its gradient, at the point it evaluates.
* A14, BatchNorm running statistics: every worker keeps its own (updated by its training-mode forward passes and
  kept across its messages); each message carries them to the server, which keeps the latest it consumed and
  evaluates the server parameters with those. A message's statistics are staged while it is computed and committed
  only once the engine accepted it, so a rejected or diverged message never reaches the worker's or the server's
  statistics.
* A16, training loss: the mean of the workers' minibatch losses (for a local method, the mean over its H steps is
  the message's loss); the run loop averages it over the last epoch of messages.
* The minibatch is a pure function of (seed, worker, parameter index, local step), and so is its augmentation.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Dataset, load_dataset
from ..data.augment import Augment, normalize
from ..data.base import balanced_subset, seeded_generator
from ..data.sampler import minibatch_generator, minibatch_indices, to_device
from ..models import build_model
from ..rules.base import ConfigError
from ..task import Metric, ModelTask, Task, TaskContext, check_task
from .config import ExperimentConfig
from .plugins import describe_failure, import_modules, resolve_entry

#: evaluation batch per device type: on a CPU a batch of 128 keeps the activations in cache (measured on ResNet20:
#: evaluation took 20–29 % of a run at 1000 and 6 % at 128); a GPU wants large batches
EVAL_BATCH = {"cpu": 128}
EVAL_BATCH_DEFAULT = 1000
#: the validation hold-out's generator: seed 0 of its own stream, so every seed and method holds out the same examples
_STREAM_VALIDATION = 0x7A11D
#: image classification's metrics: the columns test_loss, test_acc, val_loss, val_acc
IMAGE_METRICS = (Metric("loss", higher_is_better=False, label="loss"),
                 Metric("acc", higher_is_better=True, label="acc. (%)"))


def task_context(cfg: ExperimentConfig) -> TaskContext:
    """The values of ``cfg`` a task must honour."""
    return TaskContext(seed=cfg.train.seed, num_workers=cfg.train.num_workers, batch_size=cfg.data.batch_size,
                       weight_decay=cfg.train.weight_decay, device=cfg.train.device, eval_test=cfg.train.eval_test)


def build_task(cfg: ExperimentConfig, *, base_dir: str | None = None) -> Task:
    """The task of ``cfg``: ``task.entry(context, **task.options)`` after importing ``task.imports``, or image
    classification of ``[model]`` on ``[data]`` without an entry. ``base_dir``: where a relative file path in the
    entry or the imports is also looked for (a Ray worker gets the driver's working directory)."""
    t = cfg.task
    import_modules(t.imports, field="task.imports", base_dir=base_dir)  # registered models, datasets, rules
    if t.entry is None:
        return ImageClassification(cfg)
    factory = resolve_entry(t.entry, base_dir=base_dir)
    try:
        task = factory(task_context(cfg), **t.options)
    except ConfigError:  # the task's own validation: its message names the option
        raise
    except Exception as e:  # noqa: BLE001 - the user's constructor: one line with where it failed (chained)
        raise ConfigError(f"task.entry = {t.entry!r}: building the task failed: {describe_failure(e)}") from e
    check_task(task, where=f"task.entry = {t.entry!r}")
    return task


class ImageClassification(ModelTask):
    """Builds the dataset and the model of ``cfg`` and serves gradients to an engine (cross-entropy, accuracy)."""

    metrics = IMAGE_METRICS
    primary_metric = "acc"

    def __init__(self, cfg: ExperimentConfig, *, dataset: Dataset | None = None) -> None:
        self.cfg = cfg
        if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():  # before any data is read
            raise ConfigError(f"invalid train.device: {cfg.train.device!r} (CUDA is not available on this machine); "
                              f"set train.device = \"cpu\", or run where torch sees a GPU")
        device = torch.device(cfg.train.device)
        d = cfg.data
        ds = dataset or load_dataset(
            d.name, data_dir=d.data_dir, download=d.download, subset=d.subset, seed=cfg.train.seed, **d.options
        )
        c, h, _ = ds.image_shape
        model = build_model(cfg.model.name, num_classes=ds.num_classes, in_channels=c, image_size=h,
                            seed=cfg.train.seed)
        # Data lives on the device once; a minibatch is one gather.
        train_x, train_y = ds.train_x, ds.train_y
        self.val_x = self.val_y = None
        splits = ["test"]
        if d.validation is not None:
            n = int(train_y.shape[0])
            if d.validation >= n:
                raise ConfigError(f"invalid data.validation: {d.validation} (must be < the {n} training examples; "
                                  f"a validation split is held out of the training set)")
            held = torch.zeros(n, dtype=torch.bool)
            held[balanced_subset(train_y, d.validation, num_classes=ds.num_classes,
                                 generator=seeded_generator(0, _STREAM_VALIDATION))] = True
            self.val_x, self.val_y = train_x[held].to(device), train_y[held].to(device)
            train_x, train_y = train_x[~held], train_y[~held]
            splits.append("val")
        self.train_x, self.train_y = train_x.to(device), train_y.to(device)
        self.test_x: Tensor | None = None
        self.test_y: Tensor | None = None
        if cfg.train.eval_test:  # otherwise the test split is never kept, so nothing can read it
            self.test_x, self.test_y = ds.test_x.to(device), ds.test_y.to(device)
        self.mean, self.std = ds.mean, ds.std
        self.augment = Augment(crop_padding=4, flip=True, mean=ds.mean, std=ds.std) if d.augment else None
        super().__init__(model, task_context(cfg), train_size=int(self.train_x.shape[0]), splits=splits)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.cfg.data.name, "model": self.cfg.model.name, "train_examples": self.train_size}

    def batch(self, worker: int, index: int, step: int) -> tuple[Tensor, Tensor]:
        """The (augmented, normalized) minibatch of ``worker`` at parameter ``index``, local step ``step``."""
        idx = to_device(minibatch_indices(self.train_size, self.batch_size, seed=self.seed, worker=worker,
                                          index=index, step=step), self.device)
        x, y = self.train_x[idx], self.train_y[idx]
        if self.augment is not None:
            x = self.augment(x, minibatch_generator(self.seed, worker, index, step, stream=1))
        else:
            x = normalize(x, self.mean, self.std)
        if self.cfg.train.channels_last:  # NHWC: oneDNN's faster convolutions on a CPU (the values are the same)
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate_model(self, model: nn.Module, split: str) -> dict[str, float]:
        xs, ys = (self.test_x, self.test_y) if split == "test" else (self.val_x, self.val_y)
        assert xs is not None and ys is not None
        total_loss, correct, n = 0.0, 0, int(xs.shape[0])
        step = EVAL_BATCH.get(xs.device.type, EVAL_BATCH_DEFAULT)
        for start in range(0, n, step):
            x = normalize(xs[start : start + step], self.mean, self.std)
            if self.cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = ys[start : start + step]
            out = model(x)
            total_loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        return {"loss": total_loss / n, "acc": 100.0 * correct / n}

    # -- the accessors of the image-classification problem before tasks (kept for callers and tests) --------------
    def evaluate(self, params: Tensor, split: str | None = None) -> Any:
        """The metrics on ``split`` (see :meth:`ModelTask.evaluate`); without a split, as before tasks: (test loss,
        test accuracy in %)."""
        if split is None:
            return self.evaluate_test(params)
        return super().evaluate(params, split)

    def evaluate_test(self, params: Tensor) -> tuple[float | None, float | None]:
        """(test loss, test accuracy in %); (None, None) with ``train.eval_test = false``."""
        out = self.evaluate(params, "test")
        return (None, None) if out is None else (out["loss"], out["acc"])

    def evaluate_validation(self, params: Tensor) -> tuple[float | None, float | None]:
        """(validation loss, accuracy in %) on the held-out split; (None, None) without one."""
        out = self.evaluate(params, "val")
        return (None, None) if out is None else (out["loss"], out["acc"])


#: the name image classification had before tasks
TrainProblem = ImageClassification


def driver_base_dir() -> str:
    """The directory relative file paths of ``task.entry`` and ``task.imports`` are read from (the driver's)."""
    return os.getcwd()
