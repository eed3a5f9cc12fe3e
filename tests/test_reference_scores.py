"""Every recipe and README-level method keeps the scores saved before the capture-engine redesign."""

import pytest
import torch
from reference_scores import PATH, TASKS, compute


@pytest.fixture(scope="module")
def reference():
    return torch.load(PATH, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("task_name", list(TASKS))
def test_scores_unchanged(reference, task_name):
    """|S_now - S_saved| <= 1e-4 max|S_saved| per method (float32 models: reordered sums only)."""
    now, saved = compute(task_name), reference[task_name]
    assert set(now) == set(saved)
    for name, S in saved.items():
        err = float((now[name] - S).abs().max())
        assert err <= 1e-4 * float(S.abs().max()) + 1e-12, (name, err)
