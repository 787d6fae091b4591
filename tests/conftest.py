import os

import pytest
from hypothesis import settings

# CI machines are small and shared: no deadline, a modest number of examples (raise with HYPOTHESIS_PROFILE=thorough).
settings.register_profile("default", deadline=None, max_examples=40)
settings.register_profile("thorough", deadline=None, max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Each test starts with the process's torch thread count: a test (or a script it imports) that changes it must
    not change the arithmetic of later tests that compare bits with a subprocess."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
