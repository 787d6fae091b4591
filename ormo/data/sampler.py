"""Order-independent minibatches: a worker's data is a pure function of ``(seed, worker, index, step)``.

``index`` is the server iteration of the parameter the worker computes at and ``step`` its local step, so two
methods fed the same arrival order draw the same examples, and a run replays exactly. Each key
:func:`ormo.keys.minibatch_seed` gives is split into numbered streams (indices, augmentation, ...), so drawing one
more augmentation number never moves the examples drawn, and none of them reuses the generator state that
``minibatch_seed`` seeds directly (e.g. the demo's noise).
"""

from __future__ import annotations

import torch

from ..keys import minibatch_seed
from ..rules.base import check_int_at_least
from .base import seeded_generator

#: Stream of the example indices.
INDICES_STREAM = 0
#: Stream of the augmentation draws (:class:`ormo.data.augment.Augment`).
AUGMENT_STREAM = 1


def minibatch_generator(seed: int, worker: int, index: int, step: int, stream: int = AUGMENT_STREAM
                        ) -> torch.Generator:
    """A fresh CPU generator for stream ``stream`` of the minibatch keyed ``(seed, worker, index, step)``.

    Its seed is ``SeedSequence([minibatch_seed(seed, worker, index, step), stream])``: streams of one key, and
    keys of one stream, are independent.
    """
    for field, value in (("seed", seed), ("worker", worker), ("index", index), ("step", step), ("stream", stream)):
        check_int_at_least(field, value, 0)
    return seeded_generator(minibatch_seed(seed, worker, index, step), stream)


def minibatch_indices(num_examples: int, batch_size: int, *, seed: int, worker: int, index: int, step: int
                      ) -> torch.Tensor:
    """``batch_size`` example indices drawn i.i.d. uniformly from ``[0, num_examples)`` (with replacement).

    A pure function of its arguments (stream :data:`INDICES_STREAM` of the key). Sampling with replacement from the
    whole training set makes every worker's gradient an unbiased estimate of the full gradient, whatever the
    arrival order, the i.i.d. setting of the asynchronous-SGD analyses.
    """
    check_int_at_least("num_examples", num_examples, 1)
    check_int_at_least("batch_size", batch_size, 1)
    g = minibatch_generator(seed, worker, index, step, INDICES_STREAM)
    return torch.randint(0, num_examples, (batch_size,), generator=g)


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` moved to ``device``. From the CPU to a CUDA device the copy goes through pinned memory without waiting:
    a plain (pageable) copy makes the host wait for everything queued on the device, a host sync per minibatch."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
