"""Grad-Cos on the factored path: a finite gradient whose squared norm overflows is refused, not scored 0."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_cos


def _model():
    torch.manual_seed(0)
    m = nn.Linear(4, 3).eval()
    with torch.no_grad():
        m.weight.mul_(1e-21)
    return functional_model(m, F.cross_entropy)


def test_an_overflowing_squared_norm_is_refused_by_name():
    """float32: |g| ~ 1e20 is finite, |g|^2 = inf: the cosine cannot come from |g|^2, so score raises."""
    fm = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    x[2] *= 1e20
    test = (torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g))
    with pytest.raises(ValueError, match=r"grad_cos\(train=\.\.\. or test=\.\.\.\): expected per-example "
                                         r"squared gradient norms that fit torch\.float32, got inf"):
        grad_cos(fm).score(fm.params, (), (x, y), test)


def test_the_same_data_in_float64_gives_cosines():
    """float64 holds |g|^2 ~ 1e40: the scores equal brute-force cosines of vmap(grad) rows (1e-10)."""
    fm = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    x[2] *= 1e20
    xt, yt = torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g)
    params = {k: v.double() for k, v in fm.params.items()}

    def rows(X, Y):
        one = lambda p, a, b: fm.loss(p, (a, b))
        G = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, X.double(), Y)
        G = torch.cat([v.reshape(X.shape[0], -1) for v in G.values()], 1)
        return G / G.norm(dim=1, keepdim=True)

    want = rows(x, y) @ rows(xt, yt).T
    got = grad_cos(fm).score(params, (), (x.double(), y), (xt.double(), yt))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert want[2].abs().max() > 0.1
