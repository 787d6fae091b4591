"""A module's parameters (and floating buffers) as views into one flat tensor.

Loading the parameter vector a worker received is then a single copy, and because every ``p.grad`` is a view into
one flat gradient buffer, ``backward()`` accumulates the whole gradient there: no per-parameter gather. Autograd adds
into an existing ``.grad`` in place, so the views survive as long as nothing sets ``p.grad`` to a new tensor or to
None (use :meth:`FlatModel.zero_grad`, never ``module.zero_grad()``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _flatten_into(tensors: list[Tensor], flat: Tensor) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        flat[offset : offset + n].copy_(t.detach().reshape(-1))
        offset += n


class FlatModel:
    """Binds ``module``'s parameters, gradients and floating buffers (BatchNorm running statistics) to flat tensors.

    ``params`` (1-D) holds every trainable parameter in ``module.parameters()`` order; ``grad`` their gradients;
    ``buffers`` every floating-point buffer (integer ones such as ``num_batches_tracked`` stay as they are).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        plist = [p for p in module.parameters() if p.requires_grad]
        if not plist:
            raise ValueError("the module has no trainable parameters")
        dtype, device = plist[0].dtype, plist[0].device
        total = sum(p.numel() for p in plist)
        self.params = torch.empty(total, dtype=dtype, device=device)
        self.grad = torch.zeros(total, dtype=dtype, device=device)
        _flatten_into(plist, self.params)
        offset = 0
        for p in plist:
            n = p.numel()
            p.data = self.params[offset : offset + n].view_as(p)
            p.grad = self.grad[offset : offset + n].view_as(p)
            offset += n
        self._plist = plist

        blist = [b for b in module.buffers() if b.is_floating_point()]
        self.buffers = torch.empty(sum(b.numel() for b in blist), dtype=dtype, device=device)
        _flatten_into(blist, self.buffers)
        offset = 0
        for mod in module.modules():
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is None or not b.is_floating_point():
                    continue
                n = b.numel()
                view = self.buffers[offset : offset + n].view_as(b)
                mod._buffers[name] = view  # the module now reads and updates the flat storage
                offset += n

    @property
    def num_params(self) -> int:
        return self.params.numel()

    def load_params(self, vector: Tensor) -> None:
        """Copy a parameter vector into the module (one copy)."""
        self.params.copy_(vector)

    def zero_grad(self) -> None:
        self.grad.zero_()

    def check_bound(self) -> None:
        """Raise if something replaced a parameter's ``.grad`` (the flat gradient would silently stop filling)."""
        for p in self._plist:
            if p.grad is None or p.grad.data_ptr() < self.grad.data_ptr() or (
                p.grad.data_ptr() >= self.grad.data_ptr() + self.grad.numel() * self.grad.element_size()
            ):
                raise RuntimeError(
                    "a parameter's .grad was replaced; use FlatModel.zero_grad(), not module.zero_grad()"
                )
