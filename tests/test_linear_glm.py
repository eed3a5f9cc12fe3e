"""The Hessian of a model affine in its parameters from Gauss-Newton factors (operators.linear_glm)
and influence's use of it for CG and LiSSA on ``curvature="hessian"``."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.attribute.influence_config import influence_config
from dattri_fn.attribute.influence_inverse import affine_hessian, build_inverse, lissa_batches
from dattri_fn.operators.curvature import cross_entropy_out_hessian, hvp
from dattri_fn.operators.linear_gauss_newton import FactoredOperator, linear_gnvp
from dattri_fn.operators.linear_glm import glm_hessian
from dattri_fn.operators.linear_mlp import MLPHessian
from dattri_fn.solve import ihvp_lissa
from dattri_fn.tree import ravel

D = torch.float64


def _data(n: int, d: int, c: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D), torch.randint(0, c, (n,), generator=g)


def _linear(d: int, c: int, seed: int, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(d, c, bias=bias).double().eval()


def _dense_hessian(module, params, x, y) -> torch.Tensor:
    flat0, unravel = ravel(params)
    loss = lambda f: F.cross_entropy(torch.func.functional_call(module, unravel(f), (x,)), y)  # noqa: E731
    return torch.func.hessian(loss)(flat0)


class _Curved(nn.Module):
    """A Linear layer whose output Jacobian is exactly I but whose output is curved in it:
    ``out = z + (z - stop(z))^2`` (value z, slope 1, second derivative 2)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x):
        z = self.lin(x)
        return z + (z - z.detach()) ** 2


@settings(max_examples=15, deadline=None)
@given(st.integers(5, 40), st.integers(1, 6), st.integers(2, 5), st.booleans(),
       st.integers(0, 2**16))
def test_glm_hessian_equals_autodiff_hessian(n, d, c, bias, seed):
    """Softmax regression: H = G exactly; the factored operator's dense() and its product on
    V equal torch.func.hessian of the mean loss to 1e-10."""
    module = _linear(d, c, seed, bias)
    params = {k: v.detach() for k, v in module.named_parameters()}
    x, y = _data(n, d, c, seed + 1)
    cut = max(1, n // 3)
    data = [(x[:cut], y[:cut]), (x[cut:], y[cut:])]
    op = glm_hessian(module, F.cross_entropy, params, data)
    assert isinstance(op, FactoredOperator)
    H = _dense_hessian(module, params, x, y)
    V = torch.randn(4, H.shape[0], generator=torch.Generator().manual_seed(seed), dtype=D)
    torch.testing.assert_close(op.dense(), H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op(V), V @ H, rtol=1e-10, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(st.integers(6, 30), st.integers(0, 2**16))
def test_on_rows_is_the_subset_hessian(n, seed):
    """on_rows(idx) = Hessian of the mean loss over the examples idx (data order across
    batches), to 1e-10."""
    module = _linear(3, 4, seed)
    params = {k: v.detach() for k, v in module.named_parameters()}
    x, y = _data(n, 3, 4, seed + 1)
    data = [(x[:n // 2], y[:n // 2]), (x[n // 2:], y[n // 2:])]
    op = glm_hessian(module, F.cross_entropy, params, data, out_hessian=cross_entropy_out_hessian)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max(1, n // 3)]
    H = _dense_hessian(module, params, x[idx], y[idx])
    torch.testing.assert_close(op.on_rows(idx).dense(), H, rtol=1e-10, atol=1e-12)


def test_glm_hessian_none_where_it_is_not_the_hessian():
    """None for a two-layer MLP (H = G + activation terms), a Linear + tanh (J != I), and a
    curved output whose Jacobian is exactly I (caught by the autodiff check)."""
    x, y = _data(12, 4, 3, 0)
    torch.manual_seed(0)
    for module in (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval(),
                   nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double().eval(), _Curved().eval()):
        params = {k: v.detach() for k, v in module.named_parameters()}
        assert glm_hessian(module, F.cross_entropy, params, (x, y)) is None, module
    # the curved one: its Gauss-Newton is still factored, so only the Hessian check refuses it
    curved = _Curved().eval()
    params = {k: v.detach() for k, v in curved.named_parameters()}
    G = linear_gnvp(curved, F.cross_entropy, params, (x, y))
    assert all(j is None for _, J, _ in G.factors for j in J.values())


def test_on_rows_needs_kept_factors():
    """on_rows of an operator that rebuilds its factors per call is refused by name."""
    module = _linear(3, 2, 0)
    params = {k: v.detach() for k, v in module.named_parameters()}
    op = linear_gnvp(module, F.cross_entropy, params, _data(5, 3, 2, 1), cache=False)
    with pytest.raises(ValueError, match=r"FactoredOperator.on_rows\(idx=...\): expected an "
                       "operator that keeps its factors"):
        op.on_rows(torch.arange(2))


def _setup(l2: float):
    module = _linear(5, 3, 4)
    fm = functional_model(module, F.cross_entropy)
    x, y = _data(36, 5, 3, 5)
    train = [(x[i:i + 12], y[i:i + 12]) for i in range(0, 36, 12)]
    test = _data(7, 5, 3, 6)
    return fm, train, test, x, y


@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_influence_cg_hessian_takes_the_factored_path(l2):
    """influence(solver='cg', curvature='hessian') on softmax regression: C is the factored
    operator (+ 2 l2 I) and the scores equal IF-explicit's dense solve g_i^T (H + 2 l2 I +
    damping I)^-1 g_j to 1e-9."""
    fm, train, test, x, y = _setup(l2)
    m = influence(fm, solver="cg", curvature="hessian", damping=0.1, l2=l2, rtol=1e-12,
                  max_iter=200)
    cfg = influence_config(fm, solver="cg", damping=0.1, curvature="hessian", target=None,
                           model=None, l2=l2, chunk_size=None, batch_rows=None, relatif=None,
                           per_layer=False, solver_options={})
    assert isinstance(affine_hessian(cfg, fm.params, train), FactoredOperator)
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    ex = influence(fm, solver="explicit", curvature="hessian", damping=0.1, l2=l2)
    # explicit's own dense Hessian (linear_hessian) is an independent reference here
    ref = ex.score(fm.params, ex.prepare(fm.params, train), train, test)
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_influence_lissa_hessian_factored_equals_autodiff_minibatches(l2):
    """LiSSA with mini-batches on softmax regression: the factored mini-batch Hessians drawn by
    row index give the autodiff hvp path's iterates (same draws) to 1e-10."""
    fm, train, test, x, y = _setup(l2)
    opts = dict(scale=10.0, depth=60, batch_size=8, seed=3)
    cfg = influence_config(fm, solver="lissa", damping=0.1, curvature="hessian", target=None,
                           model=None, l2=l2, chunk_size=None, batch_rows=None, relatif=None,
                           per_layer=False, solver_options=opts)
    data = (x, y)
    fast, _ = build_inverse(cfg, fm.params, train, None)
    slow = ihvp_lissa(lissa_batches(cfg, fm.params, data), data, damping=0.1, **opts)
    V = torch.randn(5, 18, generator=torch.Generator().manual_seed(0), dtype=D)
    torch.testing.assert_close(fast(V), slow(V), rtol=1e-10, atol=1e-13)
    assert fast(V).abs().max() > 0


class _Centred(nn.Module):
    """One Linear layer on batch-centred inputs: its examples interact (per-example loss !=
    the batched forward's row)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.lin(x - x.mean(0, keepdim=True) + 0.3)


def test_affine_hessian_off_for_an_mlp_a_plain_loss_and_interacting_examples():
    """The factored Gauss-Newton is not used for an MLP (H != G: it takes the R-operator's
    exact Hessian, equal to torch.func.hessian at 1e-12), a plain loss, nor a one-layer
    model whose batched forward mixes examples (the per-example losses differ from it)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    fm = functional_model(mlp, F.cross_entropy)
    data = _data(10, 4, 3, 0)
    centred = functional_model(_Centred().eval(), F.cross_entropy)
    cfg = influence_config(centred, solver="cg", damping=0.1, curvature="hessian", target=None,
                           model=None, l2=0.0, chunk_size=None, batch_rows=None, relatif=None,
                           per_layer=False, solver_options={})
    assert affine_hessian(cfg, centred.params, data) is None
    for loss in (fm, fm.loss):
        cfg = influence_config(loss, solver="cg", damping=0.1, curvature="hessian", target=None,
                               model=None, l2=0.0, chunk_size=None, batch_rows=None,
                               relatif=None, per_layer=False, solver_options={})
        H = affine_hessian(cfg, fm.params, data)
        if loss is fm.loss:
            assert H is None
            continue
        assert isinstance(H, MLPHessian) and not isinstance(H, FactoredOperator)
        flat0, unravel = ravel(fm.params)
        x, y = data
        dense = torch.func.hessian(lambda f: F.cross_entropy(
            torch.func.functional_call(mlp, unravel(f), (x,)), y))(flat0)
        V = torch.randn(3, flat0.numel(), generator=torch.Generator().manual_seed(4),
                        dtype=torch.float64)
        assert torch.allclose(H(V), V @ dense, rtol=0, atol=1e-12 * float(dense.abs().max()))
    H = hvp(fm.loss, fm.params, data)
    assert not isinstance(H, FactoredOperator)


@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_influence_lissa_gauss_newton_draws_rows_of_one_factored_operator(l2):
    """LiSSA on an MLP's Gauss-Newton (the builder keeps its factors): the mini-batch
    Gauss-Newtons drawn as row subsets of one operator on all the data give the per-mini-batch
    builder's iterates (same draws) to 1e-10."""
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    fm = functional_model(mlp, F.cross_entropy)
    x, y = _data(30, 4, 3, 2)
    train = [(x[:16], y[:16]), (x[16:], y[16:])]
    opts = dict(scale=10.0, depth=50, batch_size=7, seed=5)
    cfg = influence_config(fm, solver="lissa", damping=0.1, curvature=None, target=None,
                           model=None, l2=l2, chunk_size=None, batch_rows=None, relatif=None,
                           per_layer=False, solver_options=opts)
    assert cfg.curvature.keeps_factors
    assert isinstance(cfg.curvature(fm.params, (x, y)), FactoredOperator)
    fast, _ = build_inverse(cfg, fm.params, train, None)
    slow = ihvp_lissa(lissa_batches(cfg, fm.params, (x, y)), (x, y), damping=cfg.damping, **opts)
    V = torch.randn(4, fast.dim, generator=torch.Generator().manual_seed(0), dtype=D)
    torch.testing.assert_close(fast(V), slow(V), rtol=1e-10, atol=1e-13)
    assert fast(V).abs().max() > 0


@pytest.mark.parametrize("solver", ["lissa", "cg"])
@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_influence_exact_hessian_of_an_mlp_equals_autodiff(solver, l2):
    """influence(curvature='hessian') on a softmax cross-entropy MLP (the R-operator of
    operators.linear_mlp, LiSSA's mini-batches as row subsets of it) == the same method on the
    plain loss (autodiff's double backward, the same draws), float64, to 1e-10."""
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    fm = functional_model(mlp, F.cross_entropy)
    x, y = _data(30, 4, 3, 3)
    train = [(x[:16], y[:16]), (x[16:], y[16:])]
    test = _data(5, 4, 3, 4)
    opts = (dict(scale=20.0, depth=60, batch_size=7, seed=5) if solver == "lissa"
            else dict(max_iter=200, rtol=1e-12))
    cfg = influence_config(fm, solver=solver, damping=0.5, curvature="hessian", target=None,
                           model=None, l2=l2, chunk_size=None, batch_rows=None, relatif=None,
                           per_layer=False, solver_options=opts)
    assert isinstance(affine_hessian(cfg, fm.params, train), MLPHessian)
    scores = {}
    for loss in (fm, fm.loss):
        m = influence(loss, solver=solver, damping=0.5, curvature="hessian", l2=l2, **opts)
        scores[loss is fm] = m.score(fm.params, m.prepare(fm.params, train), train, test)
    torch.testing.assert_close(scores[True], scores[False], rtol=1e-10, atol=1e-12)
    assert scores[True].abs().max() > 0
