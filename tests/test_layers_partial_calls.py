"""A layer only some of whose calls reach the loss, in the streamed per-call pass (review R4 F4).

``b`` is called on ``x[:, 0]`` ([B, 3]) and on ``x`` ([B, T, 3]); one call's output is unused,
so no gradient arrives for it and its ``g`` is zero. The pass filled it with zeros shaped like
the *other* call's ``g`` (K-FAC/EK-FAC then crashed in an einsum, influence with EK-FAC raised a
misleading data error); it now uses that call's own probe shape. The reference is the twin that
adds ``0 * output`` of the unused call, where autograd itself delivers that exact zero ``g``.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from dattri_fn.attribute.influence import influence
from dattri_fn.model import functional_model
from dattri_fn.operators.kfac import ekfac_factors, kfac_factors

DT = torch.float64


class TwoShapes(nn.Module):
    """``b`` called flat and over positions; ``first`` says which call feeds the output, the
    other is unused (``zero=False``) or added times 0 (``zero=True``: the reference)."""

    def __init__(self, first: str, zero: bool):
        super().__init__()
        self.first, self.zero = first, zero
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 3)

    def forward(self, x):  # x [B, T, 3]
        flat, seq = self.b(x[:, 0]), self.b(x)
        used, other = (flat, seq) if self.first == "flat" else (seq.mean(1), flat)
        if self.zero:
            used = used + 0 * other.reshape(other.shape[0], -1)[:, :3]
        return self.a(torch.tanh(used) + x.mean(1))


def _problem(first: str, zero: bool):
    torch.manual_seed(1)
    model = TwoShapes(first, zero).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 3, generator=g, dtype=DT)
    return model, x, torch.randint(0, 4, (6,), generator=g)


@pytest.mark.parametrize("first", ["flat", "seq"])
@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_factors_equal_those_of_the_zero_gradient_twin(first, fit):
    """K-FAC (A, G) / EK-FAC (Q_A, Q_G, Lambda) of every layer == the twin's, exactly (same a, g = 0)."""
    model, x, y = _problem(first, zero=False)
    twin, _, _ = _problem(first, zero=True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = fit(model, F.cross_entropy, params, (x, y))
    want = fit(twin, F.cross_entropy, params, (x, y))
    leaves, spec = pytree.tree_flatten(got)
    ref, ref_spec = pytree.tree_flatten(want)
    assert spec == ref_spec
    for u, v in zip(leaves, ref, strict=True):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v)
        else:
            assert u == v
    if fit is kfac_factors:  # the unused call adds positions to A but nothing to G
        assert float(got.G["b"].abs().max()) > 1e-6 and float(got.A["b"].abs().max()) > 1e-3


@pytest.mark.parametrize("first", ["flat", "seq"])
def test_ekfac_influence_equals_the_twin(first):
    """influence(solver="ekfac") scores == the twin's (1e-12): the same factors and gradient rows."""
    model, x, y = _problem(first, zero=False)
    twin, _, _ = _problem(first, zero=True)
    fm, ft = functional_model(model, F.cross_entropy), functional_model(twin, F.cross_entropy)
    train, test = [(x[:4], y[:4])], (x[4:], y[4:])
    m, t = influence(fm, solver="ekfac", damping=0.1), influence(ft, solver="ekfac", damping=0.1)
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    want = t.score(ft.params, t.prepare(ft.params, train), train, test)
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(S, want, rtol=1e-12, atol=1e-12)
