"""Gradients of one loss at many parameter vectors in one call: ``torch.func.vmap`` over ``grad_and_value``.

The module's parameters and floating/integer buffers are passed as stacked inputs (one row per request, in the flat
layout of :class:`~ormo.flat.FlatModel`), so every request has its own parameters and its own BatchNorm running
statistics, which the training-mode forward pass updates in place in its own row. The minibatches are stacked too:
every request's batch must have the same structure and shapes.

The result equals a per-request ``loss.backward()`` up to floating-point rounding (a batched matrix product may sum
in another order), not bit for bit; within batched mode the same requests give the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class _LossModule(nn.Module):
    """``loss(model, batch)`` as a module, so that ``functional_call`` can swap the model's tensors for a request's."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.m = model
        self._loss = loss

    def forward(self, batch: Any) -> Tensor:
        return self._loss(self.m, batch)


def stack_batches(batches: Sequence[Any]) -> Any:
    """Stack the requests' minibatches along a new first dimension: tensors, or tuples/lists/dicts of them."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.stack(batches)
    if isinstance(first, tuple | list):
        return type(first)(stack_batches([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: stack_batches([b[k] for b in batches]) for k in first}
    raise TypeError(f"a batched gradient needs minibatches made of tensors (tuples, lists or dicts of them), got a "
                    f"{type(first).__name__}")


class BatchedGradient:
    """``(params [N, P], buffers [N, B], int_buffers [N, I], batch) -> (grads [N, P], losses [N])`` for a module
    bound by a :class:`~ormo.flat.FlatModel`. The buffer rows are updated in place (training-mode statistics)."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, Any], Tensor]) -> None:
        from torch.func import functional_call, grad_and_value, vmap

        self.wrapper = wrapper = _LossModule(model, loss)
        self.params = [(f"m.{n}", p.shape, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
        self.buffers: list[tuple[str, torch.Size, int]] = []
        self.int_buffers: list[tuple[str, torch.Size, int]] = []
        for prefix, mod in model.named_modules():  # FlatModel's order: modules, then each one's own buffers
            for name, b in mod.named_buffers(recurse=False):
                if b is None:
                    continue
                entry = (f"m.{prefix + '.' if prefix else ''}{name}", b.shape, b.numel())
                (self.buffers if b.is_floating_point() else self.int_buffers).append(entry)

        def one(p: dict[str, Tensor], b: dict[str, Tensor], batch: Any) -> Tensor:
            return functional_call(wrapper, (p, b), (batch,), strict=False)

        # randomness='different': a model with random ops draws independently per request (tasks must not use any)
        self._fn = vmap(grad_and_value(one), in_dims=(0, 0, 0), randomness="different")

    @staticmethod
    def _split(flat: Tensor, layout: list[tuple[str, torch.Size, int]]) -> dict[str, Tensor]:
        n, out, offset = flat.shape[0], {}, 0
        for name, shape, size in layout:
            out[name] = flat[:, offset : offset + size].view(n, *shape)
            offset += size
        return out

    def __call__(self, params: Tensor, buffers: Tensor, int_buffers: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        n = params.shape[0]
        # Each buffer as its own contiguous tensor: BatchNorm's batching rule updates a strided slice in a copy,
        # which would lose the running statistics. Written back into the flat rows after the call.
        split = {**self._split(buffers, self.buffers), **self._split(int_buffers, self.int_buffers)}
        tensors = {name: t.contiguous() for name, t in split.items()}
        self.wrapper.train()
        grads, losses = self._fn(self._split(params, self.params), tensors, batch)
        for name, t in tensors.items():
            if t is not split[name]:
                split[name].copy_(t)
        flat = torch.cat([grads[name].reshape(n, -1) for name, _, _ in self.params], dim=1)
        return flat, losses
