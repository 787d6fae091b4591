import os

from hypothesis import settings

# CI machines are small and shared: no deadline, a modest number of examples (raise with HYPOTHESIS_PROFILE=thorough).
settings.register_profile("default", deadline=None, max_examples=40)
settings.register_profile("thorough", deadline=None, max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
