"""The per-example forms of TRAK's batch losses equal a vmap of the batch-mean form (bit for bit)."""

import pytest
import torch

from dattri_fn.attribute.outputs import classification_margin_loss, classification_weight_loss
from dattri_fn.transforms.layers import per_example_losses


@pytest.mark.parametrize("loss", [classification_margin_loss, classification_weight_loss])
@pytest.mark.parametrize("K", [1, 2, 7])
def test_rows_equal_vmapped_mean(loss, K):
    """loss.per_example(logits, y)_i == loss(logits[i:i+1], y[i:i+1]) for every row (torch.equal)."""
    g = torch.Generator().manual_seed(K)
    logits = torch.randn(9, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, max(K, 2), (9,), generator=g)
    rows = per_example_losses(loss, logits, y)  # the batched form (one call)
    want = torch.func.vmap(lambda o, t: loss(o[None], t[None]))(logits, y)
    assert torch.equal(rows, want)
    assert torch.equal(rows, loss.per_example(logits, y))


def test_rows_check_labels():
    """A label outside [0, K) raises naming the loss, as the batch-mean form does."""
    with pytest.raises(ValueError, match=r"classification_margin_loss\(labels=...\)"):
        classification_margin_loss.per_example(torch.zeros(2, 3), torch.tensor([0, 3]))
