"""A non-finite per-example gradient is refused, not scored as NaN, where the features are
structured captured rows (never scanned themselves): their score blocks are checked."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_cos, grad_dot, tracin


class _Log(nn.Module):
    def forward(self, x):
        return x.abs().log()  # -inf where x == 0: that example's gradient is NaN/inf


class _Reiterable:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(_Log(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return functional_model(net, F.cross_entropy), x, y


@pytest.mark.parametrize("build", [grad_dot, grad_cos, lambda fm: tracin(fm, lrs=[0.1])])
@pytest.mark.parametrize("wrap", [list, _Reiterable], ids=["in-memory", "streamed"])
def test_a_bad_train_example_raises_naming_train(build, wrap):
    """Train example 5 has x_0 = 0 (its gradient is NaN): score raises naming train=...; the
    clean set scores finite."""
    fm, x, y = _problem()
    m = build(fm)
    state = m.prepare(fm.params, [(x[:4], y[:4])])
    bad = x.clone()
    bad[5, 0] = 0.0
    with pytest.raises(ValueError, match=r"\(train=\.\.\.\): expected examples whose per-example"):
        m.score(fm.params, state, wrap([(bad[:4], y[:4]), (bad[4:], y[4:])]), (x[:2], y[:2]))
    good = m.score(fm.params, state, wrap([(x[:4], y[:4]), (x[4:], y[4:])]), (x[:2], y[:2]))
    assert torch.isfinite(good).all()
