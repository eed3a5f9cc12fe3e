"""Exact damped inverse by one eigendecomposition, and the spectral machinery Arnoldi shares.

The drop rule (shared by :func:`ihvp_explicit` and :func:`~dattri_fn.solve.ihvp_arnoldi`):
with eigenvalues ``lam_i`` of the (symmetrised) operator and damped eigenvalues
``mu_i = lam_i + damping``, every direction with ``mu_i <= rtol * max_j |mu_j|`` is DROPPED,
i.e. the inverse is the pseudo-inverse on the positive part of the damped spectrum; ``rtol``
defaults to ``n * eps(dtype)`` where ``n`` is the size of the eigenproblem solved (``P`` for
explicit, the number of Krylov steps for Arnoldi). Dropping warns with the count and says to
raise ``damping``: the curvature of a non-convex model is indefinite, and inverting a negative
or near-zero eigenvalue gives a huge, sign-flipped, meaningless answer.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_positive, check_tensor
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
    """Return ``op`` (a LinOp or a finite floating ``[P, P]`` tensor) as a LinOp; raise naming ``func``."""
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
    if V.dtype != dtype:
        raise TypeError(f"{func}(V=...): expected dtype {dtype} (the operator's), got {V.dtype}. "
                        f"Cast V with .to({dtype}).")
    if V.device != device:
        raise ValueError(f"{func}(V=...): expected device {device} (the operator's), "
                         f"got {V.device}. Move V with .to('{device}').")
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
    U = vectors if num_dropped == 0 else vectors[:, kept]
    inv_mu = (1.0 / mu[kept]) if num_dropped else 1.0 / mu
    dtype, device = vectors.dtype, vectors.device

    def matmat(V: Tensor) -> Tensor:
        check_rhs(func, V, dtype, device)
        return ((V @ U) * inv_mu) @ U.T

    out = EigenInverse(matmat, vectors.shape[0], dtype, device, name=func)
    out.eigen, out.kept, out.damping = eigen, kept, damping
    return out


def ihvp_explicit(op, *, damping: float = 0.0, rtol: float | None = None) -> EigenInverse:
    """Return V -> (A + damping*I)^-1 V from one eigendecomposition of A.  # [k, P] -> [k, P]

    The factory densifies ``op`` (``op.dense()``, symmetrised as ``(A + A^T) / 2``), runs
    ``torch.linalg.eigh`` once, and the returned operator applies the inverse in the eigenbasis:
    ``V -> ((V U) / (lam + damping)) U^T``. Cost: ``O(P^3)`` once, ``O(k P^2)`` per call.

    Args:
        op: the curvature ``A``: a LinOp or a dense ``[P, P]`` tensor (``P`` small enough to
            hold ``P x P``).
        damping: absolute damping ``>= 0`` added to every eigenvalue.
        rtol: relative drop threshold of the drop rule; default ``P * eps(dtype)``.

    Returns:
        An :class:`EigenInverse` LinOp (``.eigen`` holds all ``P`` eigenpairs of ``A``, sorted
        by ``|lam|`` descending; ``.kept`` marks the inverted ones).

    Raises:
        TypeError: ``op`` is not a LinOp/tensor, or is not floating point.
        ValueError: non-square or non-finite ``op``; negative ``damping`` or ``rtol``.

    Note:
        Drop rule: directions with ``lam + damping <= rtol * max|lam + damping|`` are dropped
        with a ``RuntimeWarning`` ("raise damping"); no NaN is ever returned for an indefinite
        or singular ``A``.

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
    rtol = default_rtol(A.dim, A.dtype) if rtol is None else check_positive(
        func, "rtol", rtol, allow_zero=True)
    dense = op if isinstance(op, Tensor) else A.dense()
    check_tensor(func, "op", dense)  # a LinOp returning NaN must not reach eigh
    values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
    order = torch.argsort(values.abs(), descending=True)
    return spectral_inverse(func, Eigen(values[order], vectors[:, order]),
                            damping=damping, rtol=rtol)
