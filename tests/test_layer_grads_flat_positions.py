"""A plan checked at one position per example refuses a later batch with positions (was: position 0 kept)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.model import functional_model
from dattri_fn.transforms.grad import per_sample_grad


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):  # [b, 5] or [b, T, 5] (summed over T)
        h = self.l2(torch.tanh(self.l1(x)))
        return h.sum(1) if h.ndim == 3 else h


def _case():
    torch.manual_seed(0)
    fm = functional_model(_Net().double().eval(), F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    flat = (torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
    seq = (torch.randn(6, 3, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    return fm, flat, seq


@pytest.mark.parametrize("make", [lambda fm: factgrass(fm, proj_dim=64, mask_dim=100, curvature="identity"),
                                  lambda fm: grad_dot(fm)])
def test_a_batch_with_positions_after_a_flat_check_is_refused(make):
    """Checked on [b, 5], then given [b, 3, 5]: an error naming the layer, not rows of position 0 only."""
    fm, flat, seq = _case()
    m = make(fm)
    with pytest.raises(ValueError, match=r"layer 'l1' at one position per example\), got a batch with 3 "
                                         r"positions"):
        m.score(fm.params, m.prepare(fm.params, [flat, seq]), [flat, seq], flat)


def test_batches_of_one_shape_stay_exact():
    """Grad-Dot on two [b, 3, 5] batches equals vmap(grad) inner products (1e-10)."""
    fm, _, seq = _case()
    m = grad_dot(fm)
    got = m.score(fm.params, m.prepare(fm.params, [seq, seq]), [seq, seq], seq)
    G = per_sample_grad(fm.loss, fm.params, seq)
    G = torch.cat([G, G])
    want = G @ per_sample_grad(fm.loss, fm.params, seq).T
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
