"""DataInf against its dense closed form (1/n) sum_i (g_i g_i^T + lam I)^-1 per block; the
empirical-Fisher curvature value against G_l^T G_l / n and against the old gradient call form."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dattri_fn import solvers
from dattri_fn._types import LinOp
from dattri_fn.operators.curvature import fvp
from dattri_fn.operators.datainf import EmpiricalFisher, datainf_damping, empirical_fisher, ihvp_datainf
from dattri_fn.solve import ihvp_cg, ihvp_explicit
from dattri_fn.transforms.grad import per_sample_grad
from dattri_fn.tree import block_slices
from problems import mlp

DT = torch.float64


def _grads(seed, n, sizes, device):
    g = torch.Generator().manual_seed(seed)
    return {f"b{i}": torch.randn(n, *s, generator=g, dtype=DT).to(device)
            for i, s in enumerate(sizes)}


def _dense(grads, lam):
    """blockdiag_l (1/n) sum_i inv(g_il g_il^T + lam_l I), by torch.linalg.inv."""
    mats = []
    for k, g in grads.items():
        g = g.reshape(g.shape[0], -1)
        eye = torch.eye(g.shape[1], dtype=DT, device=g.device)
        mats.append(sum(torch.linalg.inv(torch.outer(gi, gi) + lam[k] * eye) for gi in g)
                    / g.shape[0])
    return torch.block_diag(*mats)


SHAPES = st.lists(st.sampled_from([(1,), (3,), (2, 2), (4,), (2, 3)]), min_size=1, max_size=3)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), shapes=SHAPES,
       damping=st.sampled_from([None, 1e-2, 0.1, 1.0]))
def test_datainf_equals_closed_form(device, seed, n, shapes, damping):
    """op = blockdiag (1/n) sum_i (g_i g_i^T + lam I)^-1, lam the float or 0.1 mean|g|^2/P_l."""
    grads = _grads(seed, n, shapes, device)
    op = ihvp_datainf(grads, damping=damping)
    lam = ({k: 0.1 * (g.reshape(n, -1) ** 2).sum(1).mean() / g[0].numel()
            for k, g in grads.items()} if damping is None else dict.fromkeys(grads, damping))
    ref = _dense(grads, lam)
    scale = 1.0 / min(float(v) for v in lam.values())
    assert op.dim == ref.shape[0] and op.dtype == DT and op.device.type == device.type
    torch.testing.assert_close(op.dense(), ref, atol=1e-10 * scale, rtol=0)
    V = torch.randn(4, op.dim, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    V = V.to(device)
    torch.testing.assert_close(op(V), V @ ref, atol=1e-10 * scale * float(V.abs().max()),
                               rtol=0)
    torch.testing.assert_close(op(V[2]), op(V[2:3])[0], atol=1e-13 * scale, rtol=0)
    if damping is None:
        got = datainf_damping(grads)
        for k in grads:
            torch.testing.assert_close(got[k], torch.as_tensor(lam[k]), atol=1e-15, rtol=0)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), shapes=SHAPES,
       damping=st.sampled_from([None, 0.5]))
def test_flat_with_blocks_equals_dict(device, seed, n, shapes, damping):
    """ihvp_datainf([n, P], blocks=block_slices) == ihvp_datainf({name: [n, ...]})."""
    grads = _grads(seed, n, shapes, device)
    flat = torch.cat([g.reshape(n, -1) for g in grads.values()], 1)
    blocks = block_slices({k: g[0] for k, g in grads.items()})
    a = ihvp_datainf(flat, damping=damping, blocks=blocks).dense()
    b = ihvp_datainf(grads, damping=damping).dense()
    torch.testing.assert_close(a, b, atol=1e-12 * float(b.abs().max()), rtol=0)


@given(seed=st.integers(0, 2**16), P=st.integers(1, 6), damping=st.sampled_from([0.01, 1.0]))
def test_single_example_is_exact_inverse(device, seed, P, damping):
    """n = 1: DataInf equals (g g^T + lam I)^-1 = (G + lam I)^-1 exactly (one block)."""
    g = torch.randn(1, P, generator=torch.Generator().manual_seed(seed), dtype=DT).to(device)
    eye = torch.eye(P, dtype=DT, device=device)
    ref = torch.linalg.solve(g.T @ g + damping * eye, eye)
    torch.testing.assert_close(ihvp_datainf(g, damping=damping).dense(), ref,
                               atol=1e-10 / damping, rtol=0)


def test_datainf_errors(device):
    """Bad damping, non-finite grads, bad blocks and mismatched n raise named errors."""
    grads = _grads(0, 3, [(2,), (3,)], device)
    flat = torch.cat(list(grads.values()), 1)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"ihvp_datainf\(damping=...\): expected a finite "
                                             r"number > 0"):
            ihvp_datainf(grads, damping=bad)
    with pytest.raises(TypeError, match=r"ihvp_datainf\(damping=...\): expected a real"):
        ihvp_datainf(grads, damping="1")
    nan = {**grads, "b0": grads["b0"] * float("nan")}
    with pytest.raises(ValueError, match=r"ihvp_datainf\(op=...\): expected finite"):
        ihvp_datainf(nan)
    with pytest.raises(ValueError, match=r"all-zero blocks \['b1'\].*damping=<float>"):
        ihvp_datainf({**grads, "b1": torch.zeros_like(grads["b1"])})
    with pytest.raises(ValueError, match=r"same number of examples n.*'b1': 2"):
        ihvp_datainf({**grads, "b1": grads["b1"][:2]})
    with pytest.raises(ValueError, match=r"ihvp_datainf\(blocks=...\): expected contiguous"):
        ihvp_datainf(flat, blocks={"a": slice(0, 2), "b": slice(3, 5)})
    with pytest.raises(ValueError, match=r"ihvp_datainf\(blocks=...\): expected slices "
                                         r"covering \[0, 5\)"):
        ihvp_datainf(flat, blocks={"a": slice(0, 2)})
    with pytest.raises(ValueError, match=r"ihvp_datainf\(blocks=...\): expected None when"):
        ihvp_datainf(grads, blocks={"a": slice(0, 5)})
    with pytest.raises(ValueError, match=r"ihvp_datainf\(op=...\): expected a 2-d"):
        ihvp_datainf(flat[0])
    with pytest.raises(TypeError, match=r"ihvp_datainf\(op=...\): expected "
                                        r"operators.empirical_fisher\(grads, blocks=...\), or its "
                                        r"gradients: a dict .* got list"):
        ihvp_datainf([flat])
    with pytest.raises(TypeError, match=r"ihvp_datainf\(op=...\): expected "
                                        r"operators.empirical_fisher.* got a LinOp 'I'"):
        ihvp_datainf(LinOp.identity(5, DT, device))
    with pytest.raises(ValueError, match=r"ihvp_datainf\(blocks=...\): expected None with an "
                                         r"empirical_fisher operator"):
        ihvp_datainf(empirical_fisher(flat), blocks={"a": slice(0, 5)})
    with pytest.raises(ValueError, match=r"empirical_fisher\(grads=...\): expected finite"):
        empirical_fisher(nan)
    with pytest.raises(ValueError, match=r"empirical_fisher\(blocks=...\): expected contiguous"):
        empirical_fisher(flat, blocks={"a": slice(0, 2), "b": slice(3, 5)})
    with pytest.raises(TypeError, match=r"empirical_fisher\(grads=...\): expected a dict"):
        empirical_fisher(LinOp.identity(5, DT, device))
    with pytest.raises(ValueError, match=r"datainf\(op=...\): expected "
                                         r"operators.empirical_fisher\(grads, blocks=...\)"):
        solvers.datainf()(torch.eye(5, dtype=DT, device=device), 0.1)


def _blocked_gram(grads):
    """blockdiag_l G_l^T G_l / n, formed densely."""
    return torch.block_diag(*[g.reshape(g.shape[0], -1).T @ g.reshape(g.shape[0], -1) / g.shape[0]
                              for g in grads.values()])


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), shapes=SHAPES)
def test_empirical_fisher_is_the_blocked_gram(device, seed, n, shapes):
    """empirical_fisher(grads) = blockdiag_l G_l^T G_l / n (dict or flat with blocks), dense
    and per row; one block is the whole G^T G / n."""
    grads = _grads(seed, n, shapes, device)
    flat = torch.cat([g.reshape(n, -1) for g in grads.values()], 1)
    ref = _blocked_gram(grads)
    tol = 1e-12 * float(ref.abs().max()) + 1e-300
    for op in (empirical_fisher(grads),
               empirical_fisher(flat, blocks=block_slices({k: g[0] for k, g in grads.items()}))):
        assert isinstance(op, EmpiricalFisher) and (op.dim, op.dtype, op.n) == (ref.shape[0], DT, n)
        torch.testing.assert_close(op.dense(), ref, rtol=0, atol=tol)
        V = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
        V = V.to(device)
        torch.testing.assert_close(op(V), V @ ref, rtol=0, atol=tol * float(V.abs().max()) * 4)
    torch.testing.assert_close(empirical_fisher(flat).dense(), flat.T @ flat / n, rtol=0, atol=tol)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), shapes=SHAPES,
       damping=st.sampled_from([None, 1e-2, 1.0]))
def test_datainf_value_equals_the_gradient_form_bit_for_bit(device, seed, n, shapes, damping):
    """ihvp_datainf(empirical_fisher(g, blocks)) == ihvp_datainf(g, blocks) == solvers.datainf()
    (empirical_fisher(g)), bit for bit; datainf_damping reads either form alike."""
    grads = _grads(seed, n, shapes, device)
    flat = torch.cat([g.reshape(n, -1) for g in grads.values()], 1)
    blocks = block_slices({k: g[0] for k, g in grads.items()})
    V = torch.randn(4, flat.shape[1], generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    V = V.to(device)
    value = empirical_fisher(grads)
    old = ihvp_datainf(grads, damping=damping)(V)
    assert torch.equal(ihvp_datainf(value, damping=damping)(V), old)
    assert torch.equal(solvers.datainf()(value, damping)(V), old)
    assert torch.equal(ihvp_datainf(empirical_fisher(flat, blocks=blocks), damping=damping)(V),
                       ihvp_datainf(flat, damping=damping, blocks=blocks)(V))
    for k, lam in datainf_damping(grads).items():
        assert torch.equal(datainf_damping(value)[k], lam)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), shapes=SHAPES,
       damping=st.sampled_from([0.05, 1.0]))
def test_other_solvers_invert_the_value_exactly(device, seed, n, shapes, damping):
    """ihvp_explicit / ihvp_cg(empirical_fisher(g)) = (blockdiag G_l^T G_l / n + damping I)^-1
    = linalg.solve; DataInf equals it when n = 1 (one block per example's outer product)."""
    grads = _grads(seed, n, shapes, device)
    op = empirical_fisher(grads)
    eye = torch.eye(op.dim, dtype=DT, device=device)
    exact = torch.linalg.solve(_blocked_gram(grads) + damping * eye, eye)
    tol = 1e-10 / damping
    torch.testing.assert_close(ihvp_explicit(op, damping=damping).dense(), exact, rtol=0, atol=tol)
    torch.testing.assert_close(ihvp_cg(op, damping=damping, rtol=1e-14, max_iter=4 * op.dim)
                               .dense(), exact, rtol=0, atol=tol)
    if n == 1:
        torch.testing.assert_close(ihvp_datainf(op, damping=damping).dense(), exact, rtol=0,
                                   atol=tol)


def test_one_block_is_the_fisher_vector_product(device):
    """empirical_fisher(per_sample_grad [n, P]) = fvp(loss, params, batch) = G^T G / n."""
    params, loss, batch = mlp(n=8, device=device)
    G = per_sample_grad(loss, params, batch)
    V = torch.randn(3, G.shape[1], generator=torch.Generator().manual_seed(0), dtype=DT).to(device)
    want = fvp(loss, params, batch)(V)
    torch.testing.assert_close(empirical_fisher(G)(V), want, rtol=1e-12,
                               atol=1e-13 * float(want.abs().max()))
