"""Shared fixtures. Set DATTRI_FN_TEST_DEVICE=cuda to run every problem on a GPU."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", parent=settings.get_profile("default"), max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

DEVICE = torch.device(os.environ.get("DATTRI_FN_TEST_DEVICE", "cpu"))


@pytest.fixture
def device():
    return DEVICE
