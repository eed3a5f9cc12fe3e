"""outputs' class-label check (one aminmax, the elementwise test on the error path only) accepts
and refuses exactly what the elementwise test does, naming the same first bad label."""

import pytest
import torch

from dattri_fn.attribute.outputs import classification_margin_loss, margins

DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
          torch.uint64]  # the last three have no CPU comparisons: converted first (review R6 F4)


def _first_bad(y, K):
    """The first label outside [0, K), by a Python scan (None: every label is fine)."""
    return next((v for v in y if not 0 <= v < K), None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_labels_out_of_range_are_named_as_by_a_scan(dtype):
    """For labels in [lo, hi] over K = 4 classes, margins raises iff some label is outside
    [0, 4), naming the first one in order (a Python scan), and otherwise equals the formula."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    signed = dtype not in (torch.uint8, torch.uint16, torch.uint32, torch.uint64)
    cases = [[0, 1, 2, 3, 3, 0], [0, 4, 2, 9, 1, 1], [3, 3, 3, 3, 3, 7]]
    if signed:
        cases += [[1, -1, 5, 0, 0, 0], [0, 0, 0, 0, 0, -3]]
    for labels in cases:
        y = torch.tensor(labels).to(dtype)
        bad = _first_bad(labels, 4)
        if bad is None:
            own = logits.gather(1, torch.tensor(labels)[:, None]).squeeze(1)
            rest = logits.clone()
            rest[torch.arange(6), torch.tensor(labels)] = float("-inf")
            assert torch.equal(margins("f", logits, y), own - rest.logsumexp(1))
        else:
            with pytest.raises(ValueError, match=rf"^f\(labels=\.\.\.\): expected class labels in "
                                                 rf"\[0, 4\) for 4 logits, got label {bad}\.$"):
                margins("f", logits, y)


def test_empty_labels_and_the_loss_form():
    """No labels: nothing to check (an empty margin); the loss form names its own function."""
    assert margins("f", torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError, match=r"^classification_margin_loss\(labels=\.\.\.\): .*got "
                                         r"label 3\.$"):
        classification_margin_loss(torch.zeros(2, 3), torch.tensor([0, 3]))
