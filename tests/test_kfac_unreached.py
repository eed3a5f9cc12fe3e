"""K-FAC/EK-FAC with a selected layer whose output never reaches the loss (an unused output, a
layer run under ``torch.no_grad``): no output gradient ``g`` arrives, so every example's gradient
of that layer is zero. Before stop 22 the factor passes and the layer-by-layer score raised
``KeyError``; now the layer gets ``G = 0`` (EK-FAC: ``Lambda = 0``), its block of the inverse is
the damping's alone, and the scores equal those of params without it (the operator is
block-diagonal and the layer's gradient rows are zero). A tied group one of whose uses never
reaches the loss is refused by name (its pooled ``A`` takes both uses' gradients)."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dattri_fn.attribute.influence import influence
from dattri_fn.model import functional_model
from dattri_fn.operators.kfac import ekfac_factors, kfac_factors

DT = torch.float64


class _Silent(nn.Module):
    """``a(x)`` is the output; ``b(x)`` is computed but reaches the loss with no gradient."""

    def __init__(self, mode: str):
        super().__init__()
        self.a, self.b, self.mode = nn.Linear(3, 4), nn.Linear(3, 2), mode

    def forward(self, x):
        if self.mode == "unused":
            self.b(x)
            return self.a(x)
        with torch.no_grad():  # a frozen branch feeding the output
            h = self.b(x)
        return self.a(x) + h.sum(-1, keepdim=True)


def _problem(mode: str):
    g = torch.Generator().manual_seed(0)
    model = _Silent(mode).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (10,), generator=g)
    return model, x, y


@pytest.mark.parametrize("mode", ["unused", "nograd"])
@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_factors_of_a_layer_without_gradient(mode, fit):
    """G_b = 0 (EK-FAC: Lambda_b = 0) and A_b = mean_n [x_n, 1][x_n, 1]^T, the dense sums."""
    model, x, y = _problem(mode)
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = fit(model, F.cross_entropy, params, (x, y))
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
    if fit is kfac_factors:
        assert torch.equal(f.G["b"], torch.zeros(2, 2, dtype=DT))
        torch.testing.assert_close(f.A["b"], xa.T @ xa / len(x), rtol=0, atol=1e-12)
        assert float(f.G["a"].abs().max()) > 1e-3
    else:
        assert torch.equal(f.Lambda["b"], torch.zeros(2, 4, dtype=DT))
        assert float(f.Lambda["a"].abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["unused", "nograd"])
@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_scores_equal_those_without_the_silent_layer(mode, solver):
    """score/self_score with b's params == with a's alone (b's gradient rows are 0 and its
    block is diagonal), at 1e-12; both are nonzero."""
    model, x, y = _problem(mode)
    fm = functional_model(model, F.cross_entropy)
    method = influence(fm, solver=solver, damping=0.1)
    train, test = [(x[:6], y[:6])], (x[6:], y[6:])
    p = fm.params
    pa = {k: v for k, v in p.items() if k.startswith("a.")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        S = method.score(p, method.prepare(p, train), train, test)
        D = method.self_score(p, method.prepare(p, train), train)
    Sa = method.score(pa, method.prepare(pa, train), train, test)
    Da = method.self_score(pa, method.prepare(pa, train), train)
    assert float(Sa.abs().max()) > 1e-2 and float(Da.abs().max()) > 1e-2
    torch.testing.assert_close(S, Sa, rtol=0, atol=1e-12)
    torch.testing.assert_close(D, Da, rtol=0, atol=1e-12)


class _TiedSilentHead(nn.Module):
    """An Embedding tied to a head whose logits never reach the loss."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(7, 4), nn.Linear(4, 3)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = torch.tanh(self.emb(idx)).mean(1)
        self.head(h)
        return self.fc(h)


def test_a_tied_group_with_a_silent_use_is_refused_by_name_or_exact():
    """The pooled A of a tied group takes both uses' (a, g); a use whose g never arrives is
    refused naming the group (not a KeyError). Where the capture engine gives such a use g = 0
    (/work/notes/s22/C_to_A.patch) the group is pooled instead, and EK-FAC's Lambda_emb is
    mean_n (Q_G^T DW_n Q_A)^2 of the autodiff gradients at 1e-12 relative."""
    g = torch.Generator().manual_seed(1)
    model = _TiedSilentHead().double().eval()
    x, y = torch.randint(0, 7, (6, 3), generator=g), torch.randint(0, 3, (6,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    try:
        f = ekfac_factors(model, F.cross_entropy, params, (x, y))
    except ValueError as err:
        assert re.search(r"ekfac_factors\(params=\.\.\.\): .*tied group 'emb'", str(err))
        return

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    dW = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)["emb.weight"]
    ref = (f.QG["emb"].T @ dW @ f.QA["emb"]).square().mean(0)
    torch.testing.assert_close(f.Lambda["emb"], ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


class _FrozenNorm(nn.Module):
    """A LayerNorm run under ``torch.no_grad`` feeding the output: its params (outside the
    Kronecker layers, the diagonal block) get no gradient; the loss reaches no other captured
    layer of that block."""

    def __init__(self):
        super().__init__()
        self.a, self.ln = nn.Linear(3, 4), nn.LayerNorm(3)

    def forward(self, x):
        with torch.no_grad():
            h = self.ln(x)
        return self.a(x) + h.sum(-1, keepdim=True)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_a_diagonal_block_layer_without_gradient(solver):
    """Its diagonal block D = 0 (was a RuntimeError: the capture pass's loss reached no param),
    and the scores equal those of the Linear's params alone at 1e-12."""
    g = torch.Generator().manual_seed(2)
    model = _FrozenNorm().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 4, (10,), generator=g)
    fm = functional_model(model, F.cross_entropy)
    method = influence(fm, solver=solver, damping=0.1, others="diagonal")
    train, test = [(x[:6], y[:6])], (x[6:], y[6:])
    p = fm.params
    pa = {k: v for k, v in p.items() if k.startswith("a.")}
    state = method.prepare(p, train)
    assert all(not d.any() for d in state.factors.diagonal.values())
    assert sorted(state.factors.diagonal) == ["ln.bias", "ln.weight"]
    S = method.score(p, state, train, test)
    Sa = method.score(pa, method.prepare(pa, train), train, test)
    assert float(Sa.abs().max()) > 1e-2
    torch.testing.assert_close(S, Sa, rtol=0, atol=1e-12)
