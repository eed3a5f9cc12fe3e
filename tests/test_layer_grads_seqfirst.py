"""The plan check on layers fed sequence-first ``[T, B, D]`` tensors (review R4 F3, stop 22).

The check narrows the plan on its first ``k = min(n, 3)`` examples. With ``T = k`` a
sequence-first input ``[k, k, D]`` looks batch-first there, so nothing was dropped; the
whole-batch pass then refused the layer and the whole plan went dense, with a warning saying
the factors "do not match vmap(grad)". The same with ``T = n = 3`` and a dense parameter:
``vmap(grad)`` runs the capture per example, a batch of one, where ``[3, 1, D]`` is refused.
Now such a refusal drops the layers it names (once): only they take ``vmap(grad)``, under the
narrowing warning naming them.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan

DT = torch.float64
D = 4


class SeqFirst(nn.Module):
    """x [B, T, D]: ln (and, with ``seq_fc``, fc1) run on x.transpose(0, 1), i.e. [T, B, D]
    (``nn.TransformerEncoderLayer(batch_first=False)``'s layout); the head on [B, T, D]."""

    def __init__(self, seq_fc: bool, bare: bool = False):
        super().__init__()
        self.seq_fc = seq_fc
        self.ln, self.fc1, self.head = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, 3)
        # a parameter no capturable layer reads: it takes vmap(grad) next to the capture
        self.gain = nn.Parameter(torch.ones(D)) if bare else None

    def forward(self, x):
        h = self.ln(x.transpose(0, 1))
        if self.seq_fc:
            h = torch.tanh(self.fc1(h)).transpose(0, 1)
        else:
            h = torch.tanh(self.fc1(h.transpose(0, 1)))
        return self.head(h if self.gain is None else h * self.gain).mean(1)


def _model(seq_fc: bool, bare: bool = False):
    torch.manual_seed(0)
    m = SeqFirst(seq_fc, bare).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
    return functional_model(m, F.cross_entropy)


def _data(n: int, T: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, D, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("n,bare", [(4, False), (5, False), (7, False), (3, True), (5, True)])
@pytest.mark.parametrize("seq_fc", [False, True])
def test_a_sequence_first_layer_with_t_equal_to_the_head_is_narrowed_alone(seq_fc, n, bare):
    """T = 3 = the check's head (or n = 3 with a vmap(grad) parameter): ln (and fc1 if
    sequence-first) narrowed out, the rest captured; the checked rows == vmap(grad) rows (1e-10);
    one warning, naming them, not 'do not match'."""
    fm = _model(seq_fc, bare)
    batch = _data(n, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan = check_plan(layer_plan(fm), fm.params, batch)
    refused = {"ln", "fc1"} if seq_fc else {"ln"}
    assert not plan.dense and set(plan.layers) == {"fc1", "head"} - refused
    assert not refused & set(plan.norms)
    texts = [str(w.message) for w in record]
    assert len(texts) == 1 and "instead of from captured factors" in texts[0]
    assert all(f"{n}: an input" in texts[0] for n in refused) and "do not match" not in texts[0]
    stacked = {k: v[None] for k, v in fm.params.items()}
    for b in (batch, _data(6, 3, seed=3)):  # the checking batch and a later one
        got = layer_grads_stacked(plan, stacked, b).to_dense()[0]
        torch.testing.assert_close(got, per_sample_grad(fm.loss, fm.params, b), rtol=1e-10,
                                   atol=1e-10)


def test_a_mismatch_still_says_so():
    """T = n = 3 (S = B: no refusal can show it): the factors are wrong, the whole plan is dense
    with the 'do not match vmap(grad)' warning, and the rows == vmap(grad) rows (1e-10)."""
    fm = _model(True)
    batch = _data(3, 3)
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        plan = check_plan(layer_plan(fm), fm.params, batch)
    assert plan.dense
    got = layer_grads_stacked(plan, {k: v[None] for k, v in fm.params.items()}, batch)
    torch.testing.assert_close(got.to_dense()[0], per_sample_grad(fm.loss, fm.params, batch),
                               rtol=1e-10, atol=1e-10)
