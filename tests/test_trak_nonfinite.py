"""TRAK refuses a non-finite per-example gradient at the projection, on every path (review fix:
the densified row blocks are projected with no scan of their own, so the [b, d] rows are checked)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.trak import trak
from dattri_fn.model import functional_model


class _Log(nn.Module):
    def forward(self, x):
        return x.abs().log()  # -inf where x == 0: that example's gradient is NaN/inf


def _problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(_Log(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return functional_model(net, F.cross_entropy), x, y


@pytest.mark.parametrize("cache", [True, False])
def test_bad_train_example_is_refused_in_prepare(cache):
    """A train example with x_0 = 0 has a non-finite gradient: prepare names the features."""
    fm, x, y = _problem()
    x[2, 0] = 0.0
    with pytest.raises(ValueError, match=r"features=\.\.\.\): expected finite values"):
        trak(fm, damping=0.1, proj_dim=2, cache_features=cache).prepare(fm.params, (x, y))


@pytest.mark.parametrize("cache", [True, False])
def test_bad_example_is_refused_in_score_and_self_score(cache):
    """Test rows / self-score rows with a non-finite gradient raise instead of NaN scores."""
    fm, x, y = _problem()
    m = trak(fm, damping=0.1, proj_dim=2, cache_features=cache)
    st = m.prepare(fm.params, (x, y))
    bad = x[:3].clone()
    bad[1, 0] = 0.0
    with pytest.raises(ValueError, match="finite"):
        m.score(fm.params, st, (x, y), (bad, y[:3]))
    if not cache:  # a cached state self-scores its own training set only
        with pytest.raises(ValueError, match="finite"):
            m.self_score(fm.params, st, (bad, y[:3]))
        assert torch.isfinite(m.self_score(fm.params, st, (x[:3], y[:3]))).all()
