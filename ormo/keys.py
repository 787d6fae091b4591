"""Keys for random draws that must not depend on arrival order.

A worker's minibatch is a pure function of ``(seed, worker, index, step)``: two methods fed the same arrival order
see the same data, and any run can be replayed.
"""

from __future__ import annotations

import numpy as np


def minibatch_seed(seed: int, worker: int, index: int, step: int) -> int:
    """A 63-bit seed for the minibatch of ``worker`` at parameter ``index``, local step ``step``."""
    hi, lo = np.random.SeedSequence([seed, worker, index, step]).generate_state(2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)
