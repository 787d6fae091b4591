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


#: the average elements per parameter tensor from which loading rebinds and gradients swap instead of copying
REBIND_ELEMENTS = 1 << 16


class FlatModel:
    """Binds ``module``'s parameters, gradients and floating buffers (BatchNorm running statistics) to flat tensors.

    ``params`` (1-D) holds every trainable parameter in ``module.parameters()`` order; ``grad`` their gradients;
    ``buffers`` every floating-point buffer (BatchNorm running means and variances) and ``int_buffers`` the integer
    ones (``num_batches_tracked``), so that a worker's whole BatchNorm state is two vectors.
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
        # check_bound reads the first and last parameters that have elements: a zero-element view's address is 0
        sized = [p for p in plist if p.numel()] or plist
        self._first_sized, self._last_sized = sized[0], sized[-1]
        #: parameters this large on average are bound to the caller's vector and gradients handed out by swapping
        #: buffers, instead of copied: rebinding costs a few microseconds per tensor, a copy a pass over the memory
        self.rebinds = total >= REBIND_ELEMENTS * len(plist)
        self._bound: Tensor = self.params

        self.buffers = self._bind_buffers(module, floating=True, dtype=dtype, device=device)
        self.int_buffers = self._bind_buffers(module, floating=False, dtype=torch.int64, device=device)

    @staticmethod
    def _bind_buffers(module: nn.Module, *, floating: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Move the module's floating (or integer) buffers into one flat tensor and make them views of it."""
        blist = [b for b in module.buffers() if b.is_floating_point() == floating]
        flat = torch.empty(sum(b.numel() for b in blist), dtype=dtype, device=device)
        _flatten_into(blist, flat)
        offset = 0
        for mod in module.modules():
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is None or b.is_floating_point() != floating:
                    continue
                n = b.numel()
                mod._buffers[name] = flat[offset : offset + n].view_as(b)  # the module now updates the flat storage
                offset += n
        return flat

    @property
    def num_params(self) -> int:
        return self.params.numel()

    def load_params(self, vector: Tensor) -> None:
        """Put a parameter vector into the module: one copy, or (large parameters, :attr:`rebinds`) no copy, the
        module's parameters becoming views of ``vector`` until the next load. Either way the module computes with
        exactly these values; the module must not write to its parameters (a gradient only reads them)."""
        if self.rebinds and vector.is_contiguous() and vector.shape == self.params.shape and (
            vector.dtype == self.params.dtype and vector.device == self.params.device
        ):
            self._bind(vector)
            return
        if self._bound is not self.params:
            self._bind(self.params)
        self.params.copy_(vector)

    def _views(self, flat: Tensor):
        """Each parameter with its view into ``flat`` (the flat layout)."""
        offset = 0
        for p in self._plist:
            n = p.numel()
            yield p, flat[offset : offset + n].view_as(p)
            offset += n

    def _bind(self, vector: Tensor) -> None:
        for p, view in self._views(vector):
            p.data = view
        self._bound = vector

    def swap_grad(self, fresh: Tensor) -> Tensor:
        """Hand out the flat gradient and make ``fresh`` (same shape) the module's gradient buffer: the gradient
        leaves without a copy. ``fresh`` is zeroed by the next :meth:`zero_grad`."""
        for p, view in self._views(fresh):
            p.grad = view
        out, self.grad = self.grad, fresh
        return out

    def zero_grad(self) -> None:
        self.grad.zero_()

    def check_bound(self) -> None:
        """Raise if something replaced the parameters' ``.grad`` (``module.zero_grad()`` sets them to None): the flat
        gradient would silently stay zero. O(1): the first and last parameters must still view the flat buffer."""
        first, last = self._first_sized, self._last_sized
        end = self.grad.data_ptr() + (self.grad.numel() - last.numel()) * self.grad.element_size()
        if first.grad is None or last.grad is None or first.grad.data_ptr() != self.grad.data_ptr() or (
            last.grad.data_ptr() != end
        ):
            raise RuntimeError(
                "the model's parameter gradients were replaced (e.g. by module.zero_grad()), so gradients no longer "
                "reach the flat buffer; use FlatModel.zero_grad()"
            )
