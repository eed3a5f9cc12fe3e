"""Padding rows (``nn.Embedding(padding_idx=p)``): the curvature operators stay symmetric.

Reverse mode gives row ``p`` no gradient while forward mode's ``jvp`` does; the Gauss-Newton
builder masks the row (or, where a tied head moves it, takes the reverse-only product).
Review RU H1 (stop 26); LiSSA's missing ``scale`` is RU M1.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.operators import gauss_newton
from dattri_fn.operators.curvature import cross_entropy_out_hvp, gnvp, hvp

V, D, C, N = 12, 3, 3, 10


class Bag(nn.Module):
    def __init__(self, pad, tied=False):
        super().__init__()
        self.e = nn.Embedding(V, D, padding_idx=0 if pad else None)
        self.fc = nn.Linear(D, C)
        self.tied = tied

    def forward(self, ids):
        h = torch.tanh(self.e(ids).sum(1))
        out = self.fc(h)
        return out + (h @ self.e.weight[:C].T if self.tied else 0)


def _case(pad, tied=False):
    torch.manual_seed(0)
    model = Bag(pad, tied).double().eval()
    with torch.no_grad():
        model.e.weight[0].normal_()  # a padding row that is not zero: forward mode sees it
    ids = torch.randint(0, V, (N + 3, 4))
    ids[:3, 0] = 0  # the training rows read the padding token
    y = torch.randint(0, C, (N + 3,))
    return model, functional_model(model, F.cross_entropy), (ids[:N], y[:N]), (ids[N:], y[N:])


def _reference(model, fm, ids, y):
    """Dense GN, Hessian and per-example gradients from reverse mode, one example at a time."""
    keys = list(fm.params)
    flat0 = torch.cat([fm.params[k].reshape(-1) for k in keys])

    def unflat(v):
        out, i = {}, 0
        for k in keys:
            n = fm.params[k].numel()
            out[k] = v[i:i + n].view(fm.params[k].shape)
            i += n
        return out

    out = lambda v, i: functional_call(model, unflat(v), (ids[i:i + 1],))[0]
    loss = lambda v, i: F.cross_entropy(out(v, i)[None], y[i:i + 1])
    P = flat0.numel()
    G, H = torch.zeros(P, P, dtype=torch.float64), torch.zeros(P, P, dtype=torch.float64)
    for i in range(N):
        J = jacrev(out)(flat0, i)
        p = torch.softmax(out(flat0, i), 0)
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J / N
        H += jacrev(jacrev(loss))(flat0, i) / N  # reverse mode only
    return G, H


@pytest.mark.parametrize("tied", [False, True])
def test_gauss_newton_padding_row_matches_reverse_mode(tied):
    model, fm, train, _ = _case(pad=True, tied=tied)
    G, _ = _reference(model, fm, *train)
    A = gauss_newton(fm)(fm.params, train).dense()
    assert (A - A.T).abs().max() < 1e-12
    assert (A - G).abs().max() < 1e-12


def test_influence_padding_row_matches_dense_solve():
    model, fm, train, test = _case(pad=True)
    G, H = _reference(model, fm, *train)
    for mode in ("rev-rev", "fwd-rev"):  # rev-rev: influence's; fwd-rev falls back to it
        A = hvp(fm.loss, fm.params, train, mode=mode).dense()
        assert (A - A.T).abs().max() < 1e-12 and (A - H).abs().max() < 1e-12, mode
    g = lambda d: torch.func.vmap(torch.func.grad(fm.loss), in_dims=(None, 0))(fm.params, d)
    flat = lambda gr: torch.cat([gr[k].reshape(gr[k].shape[0], -1) for k in fm.params], 1)
    Gtr, Gte = flat(g(train)), flat(g(test))
    eye = torch.eye(G.shape[0], dtype=torch.float64)
    for curvature, C_, damping in (("gauss_newton", G, 0.5), ("hessian", H, 2.0)):
        ref = Gtr @ torch.linalg.solve(C_ + damping * eye, Gte.T)
        for solver, opts in (("explicit", {}), ("arnoldi", {"rank": G.shape[0]})):
            m = influence(fm, solver=solver, damping=damping, curvature=curvature, **opts)
            S = m.score(fm.params, m.prepare(fm.params, train), train, test)
            rel = (S - ref).abs().max() / ref.abs().max()
            assert rel < 1e-9, (curvature, solver, float(rel))


def test_gauss_newton_without_padding_same_bits():
    _, fm, train, _ = _case(pad=False)
    out_hvp = lambda out, ex, u: cross_entropy_out_hvp(out.movedim(0, -1), ex,
                                                       u.movedim(0, -1)).movedim(-1, 0)
    out_loss = lambda out, ex: F.cross_entropy(out[None], ex[1][None])
    before = gnvp(fm.forward, out_loss, fm.params, train, out_hvp=out_hvp).dense()
    assert torch.equal(gauss_newton(fm)(fm.params, train).dense(), before)


def test_influence_lissa_needs_scale():
    _, fm, _, _ = _case(pad=False)
    with pytest.raises(ValueError, match=r"influence\(scale=\.\.\.\)"):
        influence(fm, solver="lissa", damping=0.1)
    with pytest.raises(ValueError, match=r"influence\(scale=\.\.\.\)"):
        influence(fm.loss, solver="lissa", damping=0.1)
    influence(fm, solver="lissa", damping=0.1, scale=10.0)  # accepted


class _TwoReaders(nn.Module):
    """e (padding 0) and e2 (no padding) hold one weight; e2 reads token 0 only from row 5."""

    def __init__(self):
        super().__init__()
        self.e, self.e2 = nn.Embedding(12, 3, padding_idx=0), nn.Embedding(12, 3)
        self.e2.weight = self.e.weight
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.e(x[:, :4]).sum(1) + self.e2(x[:, 4:]).sum(1)))


def test_a_padding_weight_held_by_another_module_is_not_masked():
    """The padding row is moved by e2's reads, which the first examples need not show (review
    RH MED: masked, the GN was symmetric but 0.028 off reverse mode): the reverse-only product."""
    torch.manual_seed(0)
    model = _TwoReaders().double().eval()
    with torch.no_grad():
        model.e.weight[0].normal_()
    x = torch.randint(1, 12, (N, 6))
    x[:3, 0], x[5:, 4] = 0, 0
    y = torch.randint(0, 3, (N,))
    fm = functional_model(model, F.cross_entropy)
    G, _ = _reference(model, fm, x, y)
    A = gauss_newton(fm)(fm.params, (x, y)).dense()
    assert (A - G).abs().max() < 1e-12
