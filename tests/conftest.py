"""Shared fixtures. Set DATTRI_FN_TEST_DEVICE=cuda to run every problem on a GPU.

Hypothesis profiles (``HYPOTHESIS_PROFILE=default|ci``, default ``default``; ``.ci/run`` picks
``ci``): both derandomized, with no example database, so every run of one checkout draws the
same examples; a statistical bound can then not fail by chance from one run to the next.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", parent=settings.get_profile("default"), print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

DEVICE = torch.device(os.environ.get("DATTRI_FN_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Seed torch's global RNG per test: unseeded draws then do not depend on test order or -k."""
    torch.manual_seed(0)


@pytest.fixture
def device():
    return DEVICE
