"""Truth tests of block Arnoldi: arnoldi / ihvp_arnoldi with block_size > 1."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dattri_fn._types import LinOp
from dattri_fn.solve import arnoldi, ihvp_arnoldi
from problems import DTYPE, spd_matrix

seeds = st.integers(0, 2**31 - 1)
dampings = st.sampled_from([0.0, 1e-3, 0.1, 1.0])
conds = st.sampled_from([1.0, 10.0, 1e3])


def _randn(seed, *shape, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE).to(device)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _eye(n, device):
    return torch.eye(n, dtype=DTYPE, device=device)


def _orthonormality_error(vectors):
    return float((vectors.T @ vectors - _eye(vectors.shape[1], vectors.device)).abs().max())


def _with_spectrum(lam, seed, device):
    """Return Q diag(lam) Q^T for a random orthogonal Q drawn from seed."""
    Q, _ = torch.linalg.qr(_randn(seed, len(lam), len(lam)))
    return ((Q * lam) @ Q.T).to(device)


class _Counted:
    """A LinOp around V -> V A recording the shape of every call, opaque to the solvers."""

    def __init__(self, A):
        self.shapes = []
        self.op = LinOp(self._matmat, A.shape[0], A.dtype, A.device, name="counted")
        self.A = A

    def _matmat(self, V):
        self.shapes.append(tuple(V.shape))
        return V @ self.A


@st.composite
def _dim_and_block(draw, lo=2, hi=12):
    dim = draw(st.integers(lo, hi), label="dim")
    return dim, draw(st.integers(2, dim), label="block_size")


@given(db=_dim_and_block(), seed=seeds, cond=conds, damping=dampings, k=st.integers(1, 4))
def test_block_full_dim_is_exact(device, db, seed, cond, damping, k):
    """max_iter = P, any b: Ritz values = eigvalsh(A), ihvp_arnoldi(rank=P) = linalg.solve."""
    dim, b = db
    A = spd_matrix(dim, seed, cond=cond, device=device)
    eig = arnoldi(_Counted(A).op, max_iter=dim, seed=seed, block_size=b)
    assert _rel(torch.sort(eig.values).values, torch.linalg.eigvalsh(A)) < 1e-10
    assert _orthonormality_error(eig.vectors) < 1e-10
    B = _randn(seed + 1, k, dim, device=device)
    op = ihvp_arnoldi(A, rank=dim, max_iter=dim, damping=damping, seed=seed, block_size=b)
    M = A + damping * _eye(dim, device)
    assert bool(op.kept.all())
    assert _rel(op(B), torch.linalg.solve(M, B.T).T) < 1e-10 * cond


@given(db=_dim_and_block(3, 12), seed=seeds, data=st.data(),
       kind=st.sampled_from(["repeated", "low_rank"]),
       damping=st.sampled_from([1e-3, 0.1, 1.0]))
def test_block_invariant_subspaces(device, db, seed, data, kind, damping):
    """<= 3 distinct eigenvalues or rank r < P (Krylov space invariant early): still exact."""
    dim, b = db
    if kind == "repeated":
        distinct = data.draw(st.integers(1, 3), label="distinct")
        lam = torch.tensor([3.0, 1.0, 0.5], dtype=DTYPE)[torch.arange(dim) % distinct]
    else:
        rank = data.draw(st.integers(0, dim - 1), label="rank")
        lam = torch.cat([torch.logspace(0, 1, rank, dtype=DTYPE),
                         torch.zeros(dim - rank, dtype=DTYPE)])
    A = _with_spectrum(lam, seed, device)
    eig = arnoldi(A, max_iter=dim, seed=seed, block_size=b)
    assert torch.isfinite(eig.vectors).all()
    assert _orthonormality_error(eig.vectors) < 1e-10
    ref = torch.sort(lam).values.to(device)
    assert float((torch.sort(eig.values).values - ref).abs().max()) <= 1e-10 * float(lam.abs().max())
    op = ihvp_arnoldi(A, rank=dim, max_iter=dim, damping=damping, seed=seed, block_size=b)
    B = _randn(seed + 1, 2, dim, device=device)
    assert _rel(op(B), torch.linalg.solve(A + damping * _eye(dim, device), B.T).T) < 1e-10


@given(db=_dim_and_block(2, 16), seed=seeds, data=st.data(), cond=conds)
def test_block_basis_is_orthonormal_for_any_max_iter(device, db, seed, data, cond):
    """Any m <= P, any b: the Ritz vectors [P, m] have orthonormal columns, U^T U = I to 1e-10."""
    dim, b = db
    m = data.draw(st.integers(1, dim), label="max_iter")
    A = spd_matrix(dim, seed, cond=cond, device=device)
    eig = arnoldi(A, max_iter=m, seed=seed, block_size=b)
    assert eig.values.shape == (m,) and eig.vectors.shape == (dim, m)
    assert _orthonormality_error(eig.vectors) < 1e-10
    # Rayleigh-Ritz: each Ritz value is the Rayleigh quotient of its own vector.
    assert _rel(((eig.vectors.T @ A) * eig.vectors.T).sum(1), eig.values) < 1e-10


@given(dim=st.integers(20, 40), rank=st.integers(1, 4), b=st.integers(2, 8), seed=seeds)
def test_block_few_steps_find_gapped_top(device, dim, rank, b, seed):
    """Top-r eigenvalues 1e5..1e6 over a bulk in [0, 1]: m = 2r + b finds them to 1e-6.

    Bound: even one block power leaves a relative error ~ tan^2(start angle) / gap^2 <= 1e-6.
    """
    Q, _ = torch.linalg.qr(_randn(seed, dim, dim))
    gen = torch.Generator().manual_seed(seed)
    lam = torch.cat([torch.logspace(5, 6, rank, dtype=DTYPE),
                     torch.rand(dim - rank, generator=gen, dtype=DTYPE)])
    A = ((Q * lam) @ Q.T).to(device)
    eig = arnoldi(A, max_iter=2 * rank + b, seed=seed, block_size=b)
    assert _rel(torch.sort(eig.values[:rank]).values, lam[:rank].to(device)) < 1e-6
    U, Ut = eig.vectors[:, :rank], Q[:, :rank].to(device)
    assert float((U @ U.T - Ut @ Ut.T).norm()) < 1e-2  # eigenvector angle ~ tan(angle) / gap


@given(dim=st.integers(2, 30), b=st.integers(1, 40), seed=seeds, data=st.data())
def test_block_operator_call_count(device, dim, b, seed, data):
    """ceil(m / b') calls with b' = min(b, m) rows each, the last cut to m - (calls - 1) b'."""
    m = data.draw(st.integers(1, 40), label="max_iter")
    A = spd_matrix(dim, seed, device=device)
    counted = _Counted(A)
    arnoldi(counted.op, max_iter=m, seed=seed, block_size=b)
    m, b = min(m, dim), min(b, m, dim)
    calls = math.ceil(m / b)
    assert counted.shapes == [(b, dim)] * (calls - 1) + [(m - (calls - 1) * b, dim)]


@given(db=_dim_and_block(2, 12), seed=seeds, data=st.data())
def test_block_same_seed_same_output(device, db, seed, data):
    """Same seed, same Ritz pairs and the same inverse (bit for bit); another seed, another basis."""
    dim, b = db
    m = data.draw(st.integers(1, dim), label="max_iter")
    A = spd_matrix(dim, seed, cond=10.0, device=device)
    e1, e2 = (arnoldi(A, max_iter=m, seed=seed, block_size=b) for _ in range(2))
    assert torch.equal(e1.values, e2.values) and torch.equal(e1.vectors, e2.vectors)
    V = _randn(seed + 1, 2, dim, device=device)
    r = data.draw(st.integers(1, m), label="rank")
    i1, i2 = (ihvp_arnoldi(A, rank=r, max_iter=m, seed=seed, block_size=b) for _ in range(2))
    assert torch.equal(i1(V), i2(V))
    if m < dim:
        other = arnoldi(A, max_iter=m, seed=seed + 1, block_size=b)
        assert not torch.equal(other.vectors, e1.vectors)


@given(dim=st.integers(2, 12), seed=seeds, data=st.data())
def test_block_size_one_is_the_single_vector_solver(device, dim, seed, data):
    """block_size=1 is the default path bit for bit: arnoldi and ihvp_arnoldi."""
    m = data.draw(st.integers(1, dim), label="max_iter")
    r = data.draw(st.integers(1, m), label="rank")
    A = spd_matrix(dim, seed, cond=10.0, device=device)
    e0, e1 = arnoldi(A, max_iter=m, seed=seed), arnoldi(A, max_iter=m, seed=seed, block_size=1)
    assert torch.equal(e0.values, e1.values) and torch.equal(e0.vectors, e1.vectors)
    V = _randn(seed + 1, 2, dim, device=device)
    i0 = ihvp_arnoldi(A, rank=r, max_iter=m, seed=seed)
    i1 = ihvp_arnoldi(A, rank=r, max_iter=m, seed=seed, block_size=1)
    assert torch.equal(i0(V), i1(V))


def test_block_dtype_and_device_follow_the_operator(device):
    """A float32 operator gives float32 Ritz pairs on its device, exact at max_iter = P."""
    A = spd_matrix(9, 0, cond=10.0, device=device).float()
    eig = arnoldi(A, max_iter=9, block_size=4)
    assert eig.values.dtype == eig.vectors.dtype == torch.float32
    assert eig.vectors.device.type == torch.device(device).type
    assert _rel(torch.sort(eig.values).values, torch.linalg.eigvalsh(A)) < 1e-5


@pytest.mark.parametrize("func, call", [
    ("arnoldi", lambda A, b: arnoldi(A, max_iter=3, block_size=b)),
    ("ihvp_arnoldi", lambda A, b: ihvp_arnoldi(A, rank=2, block_size=b)),
])
def test_bad_block_size(device, func, call):
    """block_size must be an int >= 1; the error names the function and the argument."""
    A = spd_matrix(4, 0, device=device)
    with pytest.raises(ValueError, match=rf"{func}\(block_size=...\): expected an int >= 1, got 0"):
        call(A, 0)
    with pytest.raises(ValueError, match=rf"{func}\(block_size=...\): expected an int >= 1, got -2"):
        call(A, -2)
    for bad in (2.0, True, "4") + ((None,) if func == "arnoldi" else ()):
        with pytest.raises(TypeError, match=rf"{func}\(block_size=...\): expected an int, got"):
            call(A, bad)
    if func == "ihvp_arnoldi":  # None: the default, min(16, max(1, max_iter // 8))
        torch.testing.assert_close(call(A, None).dense(), call(A, 1).dense())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("block_size", [2, 3, 7])
def test_block_non_finite_operator_raises(device, value, block_size):
    """An operator returning NaN/inf is reported (also in a cut block), not turned into NaN pairs."""
    bad_op = LinOp(lambda V: V * value, 7, DTYPE, device, name="bad")
    with pytest.raises(ValueError, match=r"ihvp_arnoldi\(op=...\): expected an operator returning"):
        ihvp_arnoldi(bad_op, rank=2, max_iter=7, block_size=block_size)
