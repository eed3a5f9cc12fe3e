"""FactGraSS with inputs that require grad (review RD F2): its scores are no differentiable
output of the method, so the features are formed from detached sides. Before, a plain MLP's
flat path raised torch's "mul(): functions with out=... arguments don't support automatic
differentiation" (naming no argument). Now score, top-k and self_score equal (torch.equal) those
of the same inputs without grad, in float64, on the plain MLP (mlp_io) and on a custom forward
(the capture engine), cached or streamed."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.factgrass import factgrass


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _run(fm, x, y, kw):
    m = factgrass(fm, **kw)
    train = [(x[:6], y[:6]), (x[6:], y[6:])]
    st = m.prepare(fm.params, train)
    tr = None if kw.get("cache_features", True) else train
    return (m.score(fm.params, st, tr, (x[:3], y[:3])), m.self_score(fm.params, st, tr))


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("kw", [dict(proj_dim=4, mask_dim=2), dict(proj_dim=8, mask_dim=16),
                                dict(proj_dim=4, mask_dim=2, cache_features=False),
                                dict(proj_dim=4, mask_dim=2, curvature="identity", chunk_size=5)])
def test_inputs_that_require_grad_score_as_detached(plain, kw):
    torch.manual_seed(0)
    net = (nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)) if plain
           else _Net()).double()
    fm = functional_model(net.eval(), F.cross_entropy)
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(12) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _run(fm, x, y, kw)
        xg = x.clone().requires_grad_()
        got = _run(fm, xg, y, kw)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g) and not g.requires_grad
    assert xg.grad is None and torch.equal(xg.detach(), x)  # the input is left as it was
