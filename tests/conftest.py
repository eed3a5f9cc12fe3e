"""Shared fixtures. Set DATTRI_FN_TEST_DEVICE=cuda to run every problem on a GPU.

Hypothesis profiles (``HYPOTHESIS_PROFILE=default|ci``, default ``default``; ``.ci/run`` picks
``ci``): both derandomized, with no example database, so every run of one checkout draws the
same examples; a statistical bound can then not fail by chance from one run to the next.

Derandomized is not enough on its own: Hypothesis (>= 6.131) mixes into its draws the literal
constants of every local module loaded so far (``dattri_fn.*``, ``benchmarks.*``; test files
excluded), so one test drew other examples depending on which test files ran before it (shown
by ``tests/test_hardening.py::test_hypothesis_draws_do_not_depend_on_loaded_modules``). The pool
of local constants is emptied here; the built-in pool of edge values (0, -1, 2**63...) stays.
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


def _without_local_constants() -> None:
    """Make Hypothesis's pool of local-module constants empty (a private hook: guarded, so a
    Hypothesis without it, older or newer, is left as it is)."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:
        return
    if callable(getattr(providers, "_get_local_constants", None)) and hasattr(providers, "Constants"):
        providers._get_local_constants = providers.Constants


_without_local_constants()

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

DEVICE = torch.device(os.environ.get("DATTRI_FN_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Seed torch's global RNG per test: unseeded draws then do not depend on test order or -k."""
    torch.manual_seed(0)


@pytest.fixture
def device():
    return DEVICE
