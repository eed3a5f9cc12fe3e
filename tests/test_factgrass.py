"""FactGraSS: masked factors, Kronecker product, sparse projection, per-block Fisher, by brute force."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.factgrass import FactGraSSState, factgrass
from dattri_fn.attribute.pipeline import TopK
from dattri_fn.model import functional_model
from dattri_fn.transforms.grad import per_sample_grad
from dattri_fn.transforms.layer_grads import PlanDecisions
from dattri_fn.transforms.project import make_projector
from problems import SeqNet

DT = torch.float64


def _problem(kind: str, n: int = 30, seed: int = 0):
    """(FunctionalModel with CE, (x, y)): an MLP (biases) or SeqNet on [n, 3, 10] (LayerNorm rest)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 4))
        x = torch.randn(n, 12, generator=g, dtype=DT)
    else:
        net = SeqNet(10, 20, 4, True)
        x = torch.randn(n, 3, 10, generator=g, dtype=DT)
    y = torch.randint(0, 4, (n,), generator=g)
    return functional_model(net.to(DT).eval(), F.cross_entropy), (x, y)


def _mask(rows: int, k: int, seed: int) -> torch.Tensor:
    """A [rows, k] mask matrix drawn the documented way: k sorted distinct rows, sqrt(rows/k)."""
    from dattri_fn.transforms.project import _block_seed

    if rows <= k:
        return torch.eye(rows, dtype=DT)
    gen = torch.Generator().manual_seed(_block_seed(seed, 0))
    idx = torch.randperm(rows, generator=gen)[:k].sort().values
    M = torch.zeros(rows, k, dtype=DT)
    M[idx, torch.arange(k)] = (rows / k) ** 0.5
    return M


def _brute_features(fm, batch, proj_dim, k1, seed):
    """Per block: autograd [W | b] -> kron(M_out, M_in) -> count-sketch R (from the state seeds)."""
    from dattri_fn.transforms.kronecker import _factor_seed

    G = per_sample_grad(fm.loss, fm.params, batch)
    offs, o = {}, 0
    for k, v in fm.params.items():
        offs[k] = (o, o + v.numel())
        o += v.numel()
    cols = lambda k: G[:, offs[k][0]:offs[k][1]]
    layers = [n[:-len(".weight")] for n in fm.params if n.endswith(".weight")
              and not n.startswith("norm.")]
    blocks = []
    for i, n in enumerate(layers):
        W = fm.params[f"{n}.weight"]
        block = torch.cat([cols(f"{n}.weight").reshape(-1, *W.shape), cols(f"{n}.bias")[..., None]],
                          -1)
        M_in = _mask(block.shape[-1], k1, _factor_seed(seed, i, 0))
        M_out = _mask(block.shape[-2], k1, _factor_seed(seed, i, 1))
        blocks.append(block.flatten(1) @ torch.kron(M_out, M_in))
    rest = [k for k in fm.params if k.startswith("norm.")]
    if rest:
        R = torch.cat([cols(k) for k in rest], 1)
        blocks.append(R @ _mask(R.shape[1], k1 * k1, _factor_seed(seed, len(layers), 2)))
    out = []
    for i, S in enumerate(blocks):
        if S.shape[1] > proj_dim:
            S = S @ make_projector(S.shape[1], proj_dim=proj_dim, kind="sjlt",
                                   seed=seed + 1 + i).matrix(DT)
        out.append(S)
    return out


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_scores_equal_the_brute_force_sketch_and_fisher(kind):
    """s_ij = sum_b phi_ib^T (F_b + 0.1 tr(F_b)/d_b I)^-1 phi_jb with phi from autograd gradients."""
    fm, (x, y) = _problem(kind)
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2)
    state = m.prepare(fm.params, [(x[:16], y[:16]), (x[16:], y[16:])])
    S = m.score(fm.params, state, (x, y), (x[:5], y[:5]))
    feats = _brute_features(fm, (x, y), 16, 5, 2)
    ref = 0
    for phi in feats:
        Fb = phi.T @ phi / x.shape[0]
        A = Fb + 0.1 * Fb.diagonal().mean() * torch.eye(phi.shape[1], dtype=DT)
        ref = ref + phi @ torch.linalg.solve(A, phi[:5].T)
    assert S.shape == (30, 5)
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    self_s = m.self_score(fm.params, state, (x, y))
    torch.testing.assert_close(self_s, m.score(fm.params, state, (x, y), (x, y)).diagonal(),
                               rtol=1e-10, atol=1e-10)
    one = m.prepare(fm.params, (x, y))
    assert torch.equal(m.prepare.feature_rows(fm.params, state),
                       m.prepare.feature_rows(fm.params, one))


def test_identity_curvature_is_the_sketched_grad_dot():
    """curvature='identity': s_ij = <phi_i, phi_j>; no cache and chunked calls change nothing."""
    fm, (x, y) = _problem("mlp")
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2, curvature="identity",
                  cache_features=False, chunk_size=7)
    S = m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (x[:4], y[:4]))
    phi = torch.cat(_brute_features(fm, (x, y), 16, 5, 2), 1)
    torch.testing.assert_close(S, phi @ phi[:4].T, rtol=1e-10, atol=1e-12)


def test_default_mask_dim_blowup_and_top_k():
    """k' = round(sqrt(blowup d)); top_k = torch.topk of the full scores per test column."""
    fm, (x, y) = _problem("mlp")
    m = factgrass(fm, proj_dim=8, blowup=2, damping=1e-2)  # k' = 4
    state = m.prepare(fm.params, (x, y))
    assert isinstance(state, FactGraSSState)
    assert [b for b, _, _ in state.blocks] == ["0", "2"]
    assert m.prepare.feature_rows(fm.params, state).shape == (30, 16)
    feats = _brute_features(fm, (x, y), 8, 4, 0)
    full = m.score(fm.params, state, (x, y), (x[:3], y[:3]))
    ref = sum(phi @ torch.linalg.solve(phi.T @ phi / 30 + 1e-2 * torch.eye(8, dtype=DT), phi[:3].T)
              for phi in feats)
    torch.testing.assert_close(full, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    top = m.score(fm.params, state, (x, y), (x[:3], y[:3]), top_k=4)
    assert isinstance(top, TopK)
    torch.testing.assert_close(top.values, full.topk(4, dim=0).values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cache_features", [True, False])
def test_state_holds_the_checked_plan(cache_features):
    """score(state) == score(state without its plan), bit for bit; with the held plan a test batch
    costs one forward (the factored pass), not the check's narrowing pass + 3 autodiff rows."""
    fm, (x, y) = _problem("mlp")
    calls = []
    fm.module.register_forward_pre_hook(lambda mod, args: calls.append(1))
    m = factgrass(fm, proj_dim=8, cache_features=cache_features)
    train, test = [(x[:16], y[:16]), (x[16:], y[16:])], (x[:5], y[:5])
    state = m.prepare(fm.params, train)
    assert isinstance(state.plan, PlanDecisions) and not state.plan.dense
    calls.clear()
    S = m.score(fm.params, state, train, test)
    assert len(calls) == (1 if cache_features else 3)
    unheld = state._replace(plan=None)
    assert torch.equal(S, m.score(fm.params, unheld, train, test))
    assert torch.equal(m.self_score(fm.params, state, train),
                       m.self_score(fm.params, unheld, train))


def test_errors_name_the_argument():
    """Bad model / curvature / kind / params: errors that name the call and the argument."""
    fm, (x, y) = _problem("mlp", n=6)
    with pytest.raises(TypeError, match=r"factgrass\(model=...\): expected a FunctionalModel"):
        factgrass(fm.loss)
    with pytest.raises(ValueError, match=r"factgrass\(curvature=...\): expected one of"):
        factgrass(fm, curvature="hessian")
    with pytest.raises(ValueError, match=r"factgrass\(kind=...\): expected one of"):
        factgrass(fm, kind="mask")
    m = factgrass(fm, proj_dim=4)
    with pytest.raises(TypeError, match=r"factgrass.prepare\(params=...\): expected one params dict"):
        m.prepare([fm.params, fm.params], (x, y))
    with pytest.raises(TypeError, match=r"factgrass.score\(state=...\): expected the FactGraSSState"):
        m.score(fm.params, (), (x, y), (x, y))


def test_bfloat16_fisher_is_factored_in_float32():
    """LAPACK has no bfloat16 Cholesky: a bfloat16 model's damped Fisher blocks are inverted in
    float32 (was torch's raw NotImplementedError); the scores track the float32 model's within
    bfloat16's rounding of the features."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        fm = functional_model(copy.deepcopy(net).to(dt), F.cross_entropy)
        m = factgrass(fm, proj_dim=16, mask_dim=4)
        data = (x.to(dt), y)
        out[dt] = m.score(fm.params, m.prepare(fm.params, data), data, (x[:5].to(dt), y[:5]))
    assert out[torch.bfloat16].dtype == torch.bfloat16
    ref, got = out[torch.float32], out[torch.bfloat16].float()
    assert torch.isfinite(got).all()
    assert float((got - ref).abs().max()) <= 0.1 * float(ref.abs().max())
