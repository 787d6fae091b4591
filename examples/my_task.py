"""Bring your own task: fit y = sin(2x) + noise with a small MLP, scored by mean squared and absolute error.

    ormo train --set task.entry=examples/my_task.py:make_task --set train.num_workers=4 \
        --set method.lr=0.01 --run-dir runs/sine
"""

import torch
from torch import nn

from ormo.task import Metric, ModelTask, seeded


class SineRegression(ModelTask):
    metrics = (Metric("mse", higher_is_better=False), Metric("mae", higher_is_better=False))

    def __init__(self, context, *, train_size=2048, hidden=32):
        g = torch.Generator().manual_seed(context.seed)  # the data: drawn from the run's seed, no global RNG
        x = torch.rand(train_size + 1024, 1, generator=g) * 4 - 2
        y = torch.sin(2 * x) + 0.1 * torch.randn(x.shape, generator=g)
        self.x, self.y = x[:train_size], y[:train_size]
        self.held = {"val": (x[train_size:-512], y[train_size:-512]), "test": (x[-512:], y[-512:])}
        model = seeded(context.seed, lambda: nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1)))
        super().__init__(model, context, train_size=train_size, splits=("val", "test"))

    def batch(self, worker, index, step):  # a pure function of (seed, worker, index, step)
        i = self.minibatch_indices(worker, index, step)
        return self.x[i], self.y[i]

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def evaluate_model(self, model, split):
        x, y = self.held[split]
        error = model(x) - y
        return {"mse": float(error.pow(2).mean()), "mae": float(error.abs().mean())}


def make_task(context, **options):
    return SineRegression(context, **options)
