"""The Gauss-Newton builder (dattri_fn.operators) against dense J^T A J, and influence's default."""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian, jacrev

import dattri_fn.operators.linear_curvature as linear_curvature
from dattri_fn import functional_model, gnvp, per_sample_grad
from dattri_fn.attribute import influence
from dattri_fn.eval.tasks import classification_loss
from dattri_fn.operators import gauss_newton, memory_budget
from dattri_fn.tree import ravel

DT = torch.float64
gn_module = importlib.import_module("dattri_fn.operators.gauss_newton")  # the function shadows it


def _dense_gn(fm, batch):
    """``mean_i J_i^T A_i J_i`` with ``J_i = jacrev`` of the output, ``A_i = hessian`` of the loss."""
    flat, unravel = ravel(fm.params)
    x, y = batch
    G = 0
    for i in range(len(x)):
        f = lambda p: functional_call(fm.module, {**fm.fixed, **unravel(p)}, (x[i:i + 1],))[0]
        J = jacrev(f)(flat)
        A = hessian(lambda o: fm.loss_fn(o[None], y[i:i + 1]))(f(flat))
        G = G + J.T @ A @ J
    return G / len(x)


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _model(kind, seed):
    torch.manual_seed(seed)
    if kind == "cnn":
        return Cnn().to(DT).eval()
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT).eval()


def _batch(kind, seed, n, loss):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((n, 1, 4, 4) if kind == "cnn" else (n, 4)), generator=g, dtype=DT)
    y = (torch.randn(n, 3, generator=g, dtype=DT) if loss is F.mse_loss
         else torch.randint(0, 3, (n,), generator=g))
    return x, y


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), kind=st.sampled_from(["mlp", "cnn"]),
       loss=st.sampled_from([F.cross_entropy, classification_loss, F.mse_loss]))
def test_gauss_newton_equals_dense(seed, n, kind, loss):
    """G V == (mean_i J_i^T A_i J_i) V for Linear-only (factored) and other models (autodiff),
    closed-form and autodiff output Hessians, a batch of one and split batches."""
    fm = functional_model(_model(kind, seed), loss)
    x, y = _batch(kind, seed, n, loss)
    want = _dense_gn(fm, (x, y))
    data = [(x[:2], y[:2]), (x[2:], y[2:])] if n > 2 else (x, y)
    op = gauss_newton(fm)(fm.params, data)
    torch.testing.assert_close(op.dense(), want, rtol=1e-10, atol=1e-12)


def test_fast_path_is_chosen_by_the_builder(monkeypatch):
    """A Linear-only model takes linear_gnvp with cached factors, never gnvp, silently; a CNN
    takes gnvp after one warning naming why."""
    calls = []
    real = linear_curvature.linear_gnvp
    monkeypatch.setattr(gn_module, "linear_gnvp",
                        lambda *a, **k: calls.append(("factored", k["cache"])) or real(*a, **k))
    real_gnvp = gn_module.gnvp
    monkeypatch.setattr(gn_module, "gnvp",
                        lambda *a, **k: calls.append(("autodiff", k["out_hvp"] is not None))
                        or real_gnvp(*a, **k))
    fm = functional_model(_model("mlp", 0), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path applies: no warning
        gauss_newton(fm, memory="1M")(fm.params, _batch("mlp", 0, 4, F.cross_entropy))
    fm = functional_model(_model("cnn", 0), F.cross_entropy)
    build = gauss_newton(fm, memory="1M")
    with pytest.warns(RuntimeWarning, match=r"gauss_newton: the factored Gauss-Newton does not "
                                            r"apply to Cnn .*conv.weight"):
        build(fm.params, _batch("cnn", 0, 4, F.cross_entropy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per params selection
        build(fm.params, _batch("cnn", 0, 4, F.cross_entropy))
    assert calls == [("factored", 2**20), ("autodiff", True), ("autodiff", True)]


def test_memory_budget():
    """Bytes, suffixes and the environment variable; anything else is refused by name."""
    assert memory_budget(123) == 123 and memory_budget("2K") == 2048
    assert memory_budget("1.5GiB") == 3 * 2**29 and memory_budget("256MB") == 2**28
    with pytest.raises(ValueError, match=r"memory_budget\(memory=...\): expected a positive"):
        memory_budget("lots")
    with pytest.raises(ValueError, match=r"memory_budget\(memory=...\)"):
        memory_budget(-1)


def test_memory_budget_from_environment(monkeypatch):
    monkeypatch.setenv("DATTRI_FN_MEMORY", "64M")
    assert memory_budget() == 2**26
    monkeypatch.setenv("DATTRI_FN_MEMORY", "zero")
    with pytest.raises(ValueError, match=r"memory_budget\(DATTRI_FN_MEMORY=...\)"):
        memory_budget()


@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_influence_defaults_to_gauss_newton_for_a_model(solver):
    """influence(fm) scores are g_train^T (G + (damping + 2 l2) I)^-1 g_test with the dense G
    (train gradients with the l2 term, test gradients without)."""
    fm = functional_model(_model("mlp", 1), F.cross_entropy)
    x, y = _batch("mlp", 1, 12, F.cross_entropy)
    damping, l2 = 0.1, 0.05
    m = influence(fm, solver=solver, damping=damping, l2=l2, **(
        {"max_iter": 200, "rtol": 1e-12} if solver == "cg" else {}))
    S = m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (x[:3], y[:3]))
    G = _dense_gn(fm, (x, y))
    flat = ravel(fm.params)[0]
    g_train = per_sample_grad(fm.loss, fm.params, (x, y)) + 2 * l2 * flat
    g_test = per_sample_grad(fm.loss, fm.params, (x[:3], y[:3]))
    want = g_train @ torch.linalg.solve(G + (damping + 2 * l2) * torch.eye(len(flat), dtype=DT),
                                        g_test.T)
    torch.testing.assert_close(S, want, rtol=1e-8, atol=1e-10)


def test_gauss_newton_needs_a_model():
    """A plain loss keeps the Hessian by default and cannot ask for the Gauss-Newton."""
    fm = functional_model(_model("mlp", 0), F.cross_entropy)
    with pytest.raises(ValueError, match=r"influence\(curvature=...\): expected 'hessian'.*"
                                         r"got 'gauss_newton'"):
        influence(fm.loss, curvature="gauss_newton")
    with pytest.raises(TypeError, match=r"gauss_newton\(fm=...\): expected a FunctionalModel"):
        gauss_newton(fm.loss)


@pytest.mark.parametrize("M", ["kfac", "ekfac", "nystrom", "ekfac-expected", "kfac-expected"])
def test_cg_preconditioned_by_kfac_solves_the_same_system(M):
    """influence(fm, solver='cg', M='ekfac') solves (G + damping I) x = g_test exactly as plain
    CG (the preconditioner changes the iterations, not the solution)."""
    fm = functional_model(_model("mlp", 2), F.cross_entropy)
    x, y = _batch("mlp", 2, 10, F.cross_entropy)
    opts = dict(solver="cg", damping=0.05, max_iter=300, rtol=1e-12)
    if M.endswith("-expected"):  # a solver value carries the factors' settings
        from dattri_fn import solvers

        M = getattr(solvers, M.split("-")[0])(fisher="expected")
    S_plain = influence(fm, **opts)
    S_pre = influence(fm, M=M, **opts)
    got = S_pre.score(fm.params, S_pre.prepare(fm.params, (x, y)), (x, y), (x[:3], y[:3]))
    want = S_plain.score(fm.params, S_plain.prepare(fm.params, (x, y)), (x, y), (x[:3], y[:3]))
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_preconditioner_option_errors():
    fm = functional_model(_model("mlp", 0), F.cross_entropy)
    with pytest.raises(ValueError, match=r"influence\(M=...\): expected 'nystrom', 'kfac' or "
                                         r"'ekfac' with solver='cg'"):
        influence(fm, solver="arnoldi", M="ekfac", rank=2)
    with pytest.raises(ValueError, match=r"influence\(M=...\): 'ekfac' needs the FunctionalModel"):
        influence(fm.loss, solver="cg", M="ekfac")


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_batch_gnvp_is_the_gauss_newton_without_vmap_over_examples(kind):
    """batch_gnvp (one forward per batch, J v by reverse-over-reverse) = gnvp (vmap over
    examples) as dense matrices, float64, over two batches."""
    from dattri_fn.operators.curvature import batch_gnvp
    from problems import SeqNet

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
        x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    else:
        net = SeqNet(3, 4, 4, True).double()
        x = torch.randn(7, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=g)
    fm = functional_model(net.eval(), F.cross_entropy)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    out_loss = lambda o, ex: F.cross_entropy(o[None], ex[1][None])
    ref = gnvp(fm.forward, out_loss, fm.params, data).dense()
    torch.testing.assert_close(batch_gnvp(fm, fm.params, data).dense(), ref, rtol=1e-12,
                               atol=1e-14)
