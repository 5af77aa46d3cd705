"""Shared test setup: hypothesis profiles and a small thread count (the CI machine has 2 cores)."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "quick", max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

torch.set_num_threads(int(os.environ.get("TSA_TEST_THREADS", "1")))
