"""TRAK's column-by-column projection (R too large to hold, [b, P] too large to densify) writes
the same rows into the feature cache as the densified path, for every checkpoint."""

import pytest
import torch
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import trak_features as tf
from dattri_fn.attribute.trak import classification_margin_loss, classification_weight_loss, trak
from dattri_fn.transforms.projector import Projector

DT = torch.float64


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("cache", [True, False])
def test_column_path_equals_the_densified_path(C, cache, monkeypatch):
    """scores with holdable=False and _DENSE_ENTRIES=0 (columns) == the default path, 1e-10."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    out = functional_model(net, classification_margin_loss)
    w = functional_model(net, classification_weight_loss)
    params = [{k: v + 0.1 * c * torch.randn(v.shape, generator=g, dtype=DT)
               for k, v in out.params.items()} for c in range(C)]
    x = torch.randn(9, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (9,), generator=g)
    train, test = [(x[:5], y[:5]), (x[5:7], y[5:7])], (x[7:], y[7:])

    def run():
        m = trak(out, weight_fn=w, proj_dim=5, seed=1, damping=0.1, cache_features=cache)
        state = m.prepare(params, train)
        return m.score(params, state, train, test), m.self_score(params, state, train)

    S, d = run()
    with monkeypatch.context() as mp:
        mp.setattr(Projector, "holdable", property(lambda self: False))
        mp.setattr(tf, "_DENSE_ENTRIES", 0)
        S_col, d_col = run()
    scale = float(S.abs().max())
    assert torch.allclose(S_col, S, rtol=1e-10, atol=1e-10 * scale)
    assert torch.allclose(d_col, d, rtol=1e-10, atol=1e-10 * float(d.abs().max()))
