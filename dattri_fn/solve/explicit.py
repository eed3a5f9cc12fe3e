"""Exact damped inverse by one Cholesky, LU or eigendecomposition; the spectral tools Arnoldi shares.

The drop rule (shared by :func:`ihvp_explicit` and :func:`~dattri_fn.solve.ihvp_arnoldi`):
with eigenvalues ``lam_i`` of the (symmetrised) operator and damped eigenvalues
``mu_i = lam_i + damping``, every direction with ``mu_i <= rtol * max_j |mu_j|`` is DROPPED,
i.e. the inverse is the pseudo-inverse on the positive part of the damped spectrum; ``rtol``
defaults to ``n * eps(dtype)`` where ``n`` is the size of the eigenproblem solved (``P`` for
explicit, the number of Krylov steps for Arnoldi). Dropping warns with the count and says to
raise ``damping``: the curvature of a non-convex model is indefinite, and inverting a negative
or near-zero eigenvalue gives a huge, sign-flipped, meaningless answer.

Fast path: when the drop rule would drop nothing, ``(A + damping*I)^-1`` is the plain inverse,
and a Cholesky factorisation (``P^3 / 3`` flops) gives it for a fraction of ``eigh``'s cost.
:func:`ihvp_explicit` (``method="auto"``) takes it only when a shifted Cholesky proves that
every ``mu_i`` clears the drop threshold, and runs ``eigh`` otherwise.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_dense_fits, check_positive, check_rows_like, check_tensor
from .._types import LinOp, as_linop


class Eigen(NamedTuple):
    """Eigenpairs ``A ~= vectors @ diag(values) @ vectors.T``: values ``[r]``, vectors ``[P, r]``.

    Columns of ``vectors`` are orthonormal; pairs are sorted by ``|value|``, largest first.
    """

    values: Tensor
    vectors: Tensor


class EigenInverse(LinOp):
    """A LinOp ``V -> ((V U) / (lam + damping)) U^T`` that keeps the eigenpairs it inverts.

    Attributes (besides LinOp's): ``eigen`` the undamped eigenpairs the factory selected,
    ``kept`` a bool mask ``[r]`` of those used (the others fell under the drop rule),
    ``damping`` the absolute damping added to every eigenvalue.
    """

    __slots__ = ("eigen", "kept", "damping")


def as_operator(func: str, op) -> LinOp:
    """Return ``op`` (a LinOp or a finite floating ``[P, P]`` matrix) as a LinOp, or raise."""
    if isinstance(op, Tensor):
        check_tensor(func, "op", op, ndim=2, floating=True)
    elif callable(op) and not isinstance(op, LinOp):
        raise TypeError(f"{func}(op=...): expected a LinOp or a [P, P] Tensor, got a bare "
                        f"callable. Wrap it: LinOp(fn, P, dtype, device).")
    A = as_linop(op, name=f"{func}(op=...)")
    if not A.dtype.is_floating_point:
        raise TypeError(f"{func}(op=...): expected a floating-point operator, got {A.dtype}.")
    return A


def check_rhs(func: str, V: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Raise unless the right-hand sides ``V`` are finite and match the operator's dtype/device."""
    check_tensor(func, "V", V)
    check_rows_like(func, V, dtype, device)
    return V


def default_rtol(n: int, dtype: torch.dtype) -> float:
    """Return the default drop threshold ``n * eps(dtype)`` of the drop rule."""
    return n * torch.finfo(dtype).eps


def spectral_inverse(func: str, eigen: Eigen, *, damping: float, rtol: float) -> EigenInverse:
    """Return ``V -> ((V U) / (lam + damping)) U^T`` over the kept pairs (drop rule above).

    Warns once, here in the factory, when directions are dropped.  # [k, P] -> [k, P]
    """
    values, vectors = eigen
    mu = values + damping
    kept = mu > rtol * mu.abs().max()
    num_dropped = int((~kept).sum())  # one sync, at construction
    if num_dropped:
        num_negative = int((mu <= 0).sum())
        warnings.warn(
            f"{func}: dropped {num_dropped} of {mu.numel()} eigen-directions whose damped "
            f"eigenvalue lam + damping <= rtol * max|lam + damping| = "
            f"{rtol:.3g} * {float(mu.abs().max()):.3g} ({num_negative} are <= 0: the operator "
            f"is indefinite or singular); the result is the pseudo-inverse on the positive part. "
            f"Raise damping (now {damping:g}) until every lam + damping is clearly > 0 "
            f"(min lam = {float(values.min()):.3g}) to invert every direction.",
            RuntimeWarning,
            stacklevel=3,
        )
    return eigen_operator(func, eigen, kept, mu, damping)


def eigen_operator(func: str, eigen: Eigen, kept: Tensor, mu: Tensor,
                   damping: float) -> EigenInverse:
    """Return ``V -> ((V U) / mu) U^T`` over the ``kept`` pairs of ``eigen``.  # [k, P] -> [k, P]"""
    vectors = eigen[1]
    every = bool(kept.all())
    U = vectors if every else vectors[:, kept]
    inv_mu = 1.0 / (mu if every else mu[kept])
    dtype, device = vectors.dtype, vectors.device

    def matmat(V: Tensor) -> Tensor:
        check_rhs(func, V, dtype, device)
        return ((V @ U) * inv_mu) @ U.T

    out = EigenInverse(matmat, vectors.shape[0], dtype, device, name=func)
    out.eigen, out.kept, out.damping = eigen, kept, damping
    return out


class CholeskyInverse(LinOp):
    """A LinOp ``V -> (M^-1 V^T)^T`` with ``M = L L^T = (A + A^T) / 2 + damping*I``.

    Attributes (besides LinOp's): ``factor`` the lower-triangular Cholesky factor ``L``
    ``[P, P]`` of the damped, symmetrised operator, ``damping`` the absolute damping in ``M``.
    """

    __slots__ = ("factor", "damping")


class LUInverse(LinOp):
    """A LinOp ``V -> (M^-1 V^T)^T`` with ``M = (A + A^T) / 2 + damping*I`` factored by LU.

    Attributes (besides LinOp's): ``factor`` the ``(LU, pivots)`` of
    ``torch.linalg.lu_factor(M)``, ``damping`` the absolute damping in ``M``.
    """

    __slots__ = ("factor", "damping")


METHODS = ("auto", "eigh", "cholesky", "lu")


def _lu_inverse(func: str, M: Tensor, *, damping: float) -> LUInverse:
    """Return ``V -> (M^-1 V^T)^T`` by LU with partial pivoting; raise if ``M`` is numerically
    singular: a pivot ``|u_ii| <= P * eps * max_j |u_jj|`` (the drop rule's default scale)."""
    LU, pivots, _ = torch.linalg.lu_factor_ex(M)
    with torch.no_grad():
        u = LU.diagonal().abs()
        tiny = u <= M.shape[0] * torch.finfo(M.dtype).eps * u.max()
    if bool(tiny.any()):  # one sync, at construction
        raise ValueError(
            f"{func}(op=..., damping=...): expected A + damping*I non-singular for "
            f"method='lu', got {int(tiny.sum())} pivot(s) <= P * eps * max pivot "
            f"(damping = {damping:g}): the solve would return huge, meaningless values. "
            f"Raise damping or use method='eigh' (drops non-positive directions).")
    dtype, device = LU.dtype, LU.device

    def matmat(V: Tensor) -> Tensor:
        check_rhs(func, V, dtype, device)
        return torch.linalg.lu_solve(LU, pivots, V.T).T

    out = LUInverse(matmat, LU.shape[0], dtype, device, name=func)
    out.factor, out.damping = (LU, pivots), damping
    return out


def _cholesky_inverse(func: str, L: Tensor, *, damping: float) -> CholeskyInverse:
    """Return ``V -> (M^-1 V^T)^T`` with ``M = L L^T`` by cholesky_solve.  # [k, P] -> [k, P]"""
    dtype, device = L.dtype, L.device

    def matmat(V: Tensor) -> Tensor:
        check_rhs(func, V, dtype, device)
        # V.T of a row-major [k, P] is the column-major [P, k] LAPACK wants: no copy either way
        return torch.cholesky_solve(V.T, L).T

    out = CholeskyInverse(matmat, L.shape[0], dtype, device, name=func)
    out.factor, out.damping = L, damping
    return out


def _sorted_eigen(S: Tensor) -> Eigen:
    """Return all eigenpairs of the symmetric ``S`` sorted by ``|lam|``, largest first."""
    values, vectors = torch.linalg.eigh(S)
    order = torch.argsort(values.abs(), descending=True)
    return Eigen(values[order], vectors[:, order])


def _check_pd(func: str, info: Tensor, damping: float) -> None:
    if int(info):  # one sync, at construction
        raise ValueError(
            f"{func}(op=..., damping=...): expected A + damping*I positive definite, got a "
            f"non-positive pivot at row {int(info)} (damping = {damping:g}). "
            f"Raise damping or use method='eigh' (drops non-positive directions).")


def _differentiable(func: str, S: Tensor, damping: float, rtol: float, method: str) -> LinOp:
    """:func:`ihvp_explicit` for an ``S`` that autograd tracks: out-of-place shifts (the
    in-place ones of the main path would invalidate the graph), the decision without grad."""
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    M = S + damping * eye
    if method == "lu":
        return _lu_inverse(func, M, damping=damping)
    if method == "auto":
        with torch.no_grad():
            tau = rtol * torch.linalg.vector_norm(M)
            if int(torch.linalg.cholesky_ex(M - tau * eye).info):
                return spectral_inverse(func, _sorted_eigen(S), damping=damping, rtol=rtol)
    L, info = torch.linalg.cholesky_ex(M)
    if method == "auto" and int(info):  # rounding: M - tau*I factored but M did not
        return spectral_inverse(func, _sorted_eigen(S), damping=damping, rtol=rtol)
    _check_pd(func, info, damping)
    return _cholesky_inverse(func, L, damping=damping)


def ihvp_explicit(op, *, damping: float = 0.0, rtol: float | None = None,
                  method: str = "auto") -> EigenInverse | CholeskyInverse | LUInverse:
    """Return V -> (A + damping*I)^-1 V from one Cholesky, LU or eigendecomposition.  # [k, P] -> [k, P]

    The factory densifies ``op`` (``op.dense()``), symmetrises it as ``A_s = (A + A^T) / 2`` and
    factors ``M = A_s + damping*I`` once; the returned operator applies the inverse to any
    number of rows. ``method`` picks the factorisation:

    - ``"eigh"``: ``torch.linalg.eigh(A_s)``; the operator is ``V -> ((V U) / (lam + damping))
      U^T`` over the directions the drop rule keeps (module docstring). ``O(P^3)``, some
      10x a Cholesky in practice.
    - ``"cholesky"``: ``M = L L^T`` by ``torch.linalg.cholesky_ex`` (``P^3 / 3`` flops); the
      operator is ``V -> (M^-1 V^T)^T`` by ``torch.cholesky_solve``. ``M`` must be positive
      definite; nothing is dropped and ``rtol`` is unused.
    - ``"lu"``: the literal ``M^-1`` by LU with partial pivoting (``2 P^3 / 3`` flops), for an
      indefinite but non-singular ``M`` too: nothing is dropped and ``rtol`` is unused. This
      is what Koh & Liang's explicit influence (and dattri's) computes; a negative damped
      eigenvalue then flips the sign of its direction, which the drop rule exists to avoid.
    - ``"auto"``: Cholesky if a test proves the drop rule drops nothing, else ``"eigh"``. With
      ``u = ||M||_F >= max|lam + damping|`` and ``tau = rtol * u``, a successful Cholesky of
      ``M - tau*I`` proves every ``lam + damping > tau >= rtol * max|lam + damping|``, so
      ``eigh`` would keep (and invert) every direction: ``M`` is then factored a second time
      (``2 P^3 / 3`` flops in all; once when ``rtol = 0``, since then ``tau = 0``). A failed
      test costs ``P^3 / 3`` before ``eigh``.

    An operator that carries its closed-form inverse (``op.inverse``: K-FAC, EK-FAC, see
    :func:`~dattri_fn.operators.kfac.kfac_operator`) is inverted by it: no ``[P, P]`` is formed and
    ``rtol``/``method`` do not apply.

    Args:
        op: the curvature ``A``: a LinOp or a dense ``[P, P]`` tensor (``P`` small enough to
            hold ``P x P``).
        damping: absolute damping ``>= 0`` added to every eigenvalue.
        rtol: relative drop threshold of the drop rule; default ``P * eps(dtype)``.
        method: ``"auto"`` (default), ``"eigh"``, ``"cholesky"`` or ``"lu"``.

    Returns:
        A :class:`LUInverse` for ``method="lu"`` (``.factor`` is ``(LU, pivots)``); a
        :class:`CholeskyInverse` LinOp (``.factor`` is ``L``) for ``method="cholesky"``, and
        for ``"auto"`` when the test above passes (positive definite, not near-singular ``M``);
        otherwise an :class:`EigenInverse` LinOp (``.eigen`` holds all ``P`` eigenpairs of
        ``A_s``, sorted by ``|lam|`` descending; ``.kept`` marks the inverted ones). All have
        ``.damping``, the operator's ``dtype``/``device``, and map ``[k, P] -> [k, P]`` and
        ``[P] -> [P]``.

    Raises:
        TypeError: ``op`` is not a LinOp/tensor, or is not floating point; ``method`` is not a str.
        ValueError: non-square or non-finite ``op``; negative ``damping`` or ``rtol``; unknown
            ``method``; ``method="cholesky"`` and ``A_s + damping*I`` not positive definite;
            ``method="lu"`` and ``A_s + damping*I`` numerically singular (a pivot
            ``<= P * eps * max pivot``).

    Note:
        Drop rule (``"eigh"``, and ``"auto"`` when it falls back): directions with
        ``lam + damping <= rtol * max|lam + damping|`` are dropped with a ``RuntimeWarning``
        ("raise damping"); no NaN is ever returned for an indefinite or singular ``A``.
        ``u = ||M||_F = sqrt(sum_i (lam_i + damping)^2)`` is the bound used: one pass over
        ``M`` and no copy, and it depends on the spectrum only. Gershgorin's
        ``max_i sum_j |M_ij|`` needs ``|M|`` (a copy or a chunked pass) and is tighter only for
        near-diagonal ``M``: for dense eigenvectors it is up to ``sqrt(P)`` looser. Either bound
        exceeds ``max|lam + damping|`` by at most ``sqrt(P)``, so ``"auto"`` falls back to
        ``eigh`` (same answer, slower) only when ``M`` is within ``sqrt(P)`` of the threshold.
        The proof is in exact arithmetic: an eigenvalue within rounding (``~P eps ||M||``) of
        the threshold may go either way, as it may within ``eigh`` itself.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> v = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> x = ihvp_explicit(A, damping=0.5)(v)
        >>> torch.allclose(x, torch.linalg.solve(A + 0.5 * torch.eye(2, dtype=A.dtype), v))
        True
    """
    func = "ihvp_explicit"
    A = as_operator(func, op)
    damping = check_positive(func, "damping", damping, allow_zero=True)
    if getattr(A, "inverse", None) is not None:
        return A.inverse(damping)
    rtol = default_rtol(A.dim, A.dtype) if rtol is None else check_positive(
        func, "rtol", rtol, allow_zero=True)
    if not isinstance(method, str):
        raise TypeError(f"{func}(method=...): expected a str, got {type(method).__name__}.")
    if method not in METHODS:
        raise ValueError(f"{func}(method=...): expected one of {', '.join(map(repr, METHODS))}, "
                         f"got {method!r}.")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{func}(op=...): expected a float32 or float64 operator (the dense "
                        f"factorisations need one), got {A.dtype}. Build it in float32, e.g. "
                        f"from params cast with .float().")
    # The dense matrix and its symmetrised copy live together; the factorisation reuses S.
    check_dense_fits(func, A.dim, A.dtype, A.device, copies=1 if isinstance(op, Tensor) else 2)
    dense = op if isinstance(op, Tensor) else A.dense()
    check_tensor(func, "op", dense)  # a LinOp returning NaN must not reach a factorisation
    S = dense + dense.T  # the one P x P buffer this call owns and shifts in place
    S.mul_(0.5)  # halving is exact: bit-identical to (A + A^T) / 2
    del dense  # frees A.dense() before the factorisations (a caller's tensor stays alive)
    if method == "eigh":
        return spectral_inverse(func, _sorted_eigen(S), damping=damping, rtol=rtol)
    if S.requires_grad:
        return _differentiable(func, S, damping, rtol, method)
    diag = S.diagonal()  # a view: shifting it touches nothing else
    lam_diag = diag.clone()  # to restore A_s bit for bit before an eigh fallback
    diag.add_(damping)
    if method == "cholesky":
        L, info = torch.linalg.cholesky_ex(S)
        _check_pd(func, info, damping)
        return _cholesky_inverse(func, L, damping=damping)
    if method == "lu":
        return _lu_inverse(func, S, damping=damping)
    if rtol > 0:  # with rtol = 0, tau = 0: the test matrix is M and its factor is the answer
        diag.sub_(rtol * torch.linalg.vector_norm(S))  # M - tau*I; tau stays on device
    L, info = torch.linalg.cholesky_ex(S)
    if not int(info):  # one sync: the drop rule provably drops nothing
        if rtol > 0:
            diag.copy_(lam_diag).add_(damping)  # M again, bit for bit
            del L  # (no out=: autograd refuses it for an input that requires grad)
            L, info = torch.linalg.cholesky_ex(S)
        # M - tau*I factored, so M does too unless rounding says otherwise; check, never assume
        if not int(info):
            return _cholesky_inverse(func, L, damping=damping)
    del L  # before eigh allocates its own P x P
    diag.copy_(lam_diag)
    return spectral_inverse(func, _sorted_eigen(S), damping=damping, rtol=rtol)
