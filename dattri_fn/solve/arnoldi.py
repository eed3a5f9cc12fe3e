"""Top eigenpairs by Arnoldi (symmetric Lanczos, fully re-orthogonalised) and the low-rank inverse."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int, check_optional_int, check_positive
from .._types import LinOp
from .explicit import Eigen, EigenInverse, as_operator, default_rtol, spectral_inverse


def _orthogonalise(Q: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(W - (W Q^T) Q, W Q^T)`` for rows W, Gram-Schmidt done twice ("twice is enough")."""
    H = W @ Q.T
    W = W - H @ Q
    return W - (W @ Q.T) @ Q, H


def _arnoldi(func: str, A: LinOp, m: int, seed: int) -> Eigen:
    """Arnoldi core: ``m <= P`` steps from a seeded start; returns all ``m`` Ritz pairs."""
    P, dtype, device = A.dim, A.dtype, A.device
    gen = torch.Generator(device=device).manual_seed(seed)
    tiny = torch.finfo(dtype).tiny
    Q = torch.zeros(m, P, dtype=dtype, device=device)
    T = torch.zeros(m, m, dtype=dtype, device=device)
    z = torch.randn(P, generator=gen, dtype=dtype, device=device)
    Q[0] = z / z.norm()
    anorm = torch.zeros((), dtype=dtype, device=device)
    breakdown = math.sqrt(torch.finfo(dtype).eps)
    for j in range(m):
        w = A.matmat(Q[j : j + 1])
        if j + 1 == m:
            T[:, j] = (w @ Q.T)[0]
            break
        # A fresh random direction z rides along with w: if w is numerically in span Q (an
        # invariant subspace, "breakdown"), the basis continues from z instead. Orthogonalising
        # both in one pass costs the same memory traffic as w alone and torch.where avoids a
        # sync per step. Rayleigh-Ritz stays exact either way: T holds the computed q_i . A q_j.
        z = torch.randn(1, P, generator=gen, dtype=dtype, device=device)
        (w, z), H = _orthogonalise(Q[: j + 1], torch.cat([w, z]))
        T[: j + 1, j] = H[0]  # q_i . A q_j for i <= j: the upper triangle of Q^T A Q
        beta = w.norm()
        anorm = torch.maximum(anorm, torch.hypot(H[0].norm(), beta))
        restart = beta <= breakdown * anorm
        Q[j + 1] = torch.where(restart, z / z.norm().clamp_min(tiny), w / beta.clamp_min(tiny))
    if not bool(torch.isfinite(T).all()):
        raise ValueError(f"{func}(op=...): expected an operator returning finite values, got "
                         f"NaN or inf in the Krylov basis. Check the curvature operator.")
    T = torch.triu(T) + torch.triu(T, 1).T
    theta, S = torch.linalg.eigh(T)
    order = torch.argsort(theta.abs(), descending=True)
    return Eigen(theta[order], Q.T @ S[:, order])


def arnoldi(op, *, max_iter: int, seed: int = 0) -> Eigen:
    """Return the Ritz pairs of symmetric A on an m-step Krylov space, m = min(max_iter, P).  # [m], [P, m]

    Symmetric Arnoldi (Lanczos with full re-orthogonalisation): from a start drawn from
    ``seed``, builds an orthonormal basis ``Q`` of ``span{q, Aq, A^2 q, ...}`` with one operator
    call per step, projects ``T = Q^T A Q`` and returns ``eigh(T)`` lifted back to ``P``
    dimensions, sorted by ``|value|`` descending. The extreme (largest-magnitude) eigenvalues
    converge first. If the Krylov space becomes invariant (breakdown), the basis continues
    from a fresh random direction orthogonal to it, so ``max_iter = P`` recovers all of
    ``eigh(A)``.

    Args:
        op: the symmetric operator ``A``: a LinOp or a dense ``[P, P]`` tensor.
        max_iter: Krylov steps (operator calls), capped at ``P``.
        seed: seed of the random start vector.

    Returns:
        ``Eigen(values [m], vectors [P, m])`` with orthonormal columns.

    Raises:
        TypeError: wrong kind of ``op``, ``max_iter`` or ``seed``.
        ValueError: non-square or non-finite ``op``; ``max_iter < 1``; ``seed < 0``; an operator
            that produced non-finite values.

    References:
        Lanczos (1950); Schioppa, Zablotskaia, Vilar & Sokolov (2022), Scaling up influence
        functions, arXiv 2112.03052.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64))
        >>> torch.allclose(arnoldi(A, max_iter=3).values, torch.tensor([3.0, -2.0, 1.0],
        ...                dtype=torch.float64))
        True
    """
    func = "arnoldi"
    A = as_operator(func, op)
    max_iter = check_int(func, "max_iter", max_iter)
    seed = check_int(func, "seed", seed, minimum=0)
    return _arnoldi(func, A, min(max_iter, A.dim), seed)


def ihvp_arnoldi(op, *, rank: int, damping: float = 0.0, max_iter: int | None = None,
                 seed: int = 0, rtol: float | None = None) -> EigenInverse:
    """Return V -> ((V U) / (lam + damping)) U^T on A's top-rank eigenpairs (lam, U).  # [k, P] -> [k, P]

    The projected inverse of ``A + damping*I`` on the span of its ``rank`` largest-magnitude
    Ritz vectors, as in Schioppa et al. (2022): the eigenpairs are computed ONCE here by
    :func:`arnoldi` (``max_iter`` operator calls), then each call costs two ``[k, P] x [P, rank]``
    products. With ``rank = max_iter = P`` it is the exact damped inverse.

    Args:
        op: the symmetric curvature ``A``: a LinOp or a dense ``[P, P]`` tensor.
        rank: eigenpairs kept, ``1 <= rank <= min(max_iter, P)``.
        damping: absolute damping ``>= 0`` added to every kept eigenvalue.
        max_iter: Krylov steps; default ``min(P, 2 * rank)``. More steps, more accurate pairs.
        seed: seed of the Arnoldi start vector.
        rtol: relative drop threshold of the drop rule; default ``max_iter * eps(dtype)``.

    Returns:
        An :class:`~dattri_fn.solve.explicit.EigenInverse`: ``.eigen`` holds the ``rank``
        selected (undamped) Ritz pairs, ``.kept`` marks those inverted.

    Raises:
        TypeError: wrong kind of ``op`` or of an int setting.
        ValueError: non-square/non-finite ``op``, ``rank > P``, ``rank > max_iter``, negative
            ``damping``/``rtol``.

    Note:
        Drop rule (identical to :func:`ihvp_explicit`): of the selected pairs, directions with
        ``lam + damping <= rtol * max|lam + damping|`` are dropped with a ``RuntimeWarning``
        ("raise damping"); the dropped ones are not replaced by smaller pairs. Directions
        outside the top-``rank`` span are mapped to zero, not to ``v / damping``.

    References:
        Schioppa, Zablotskaia, Vilar & Sokolov (2022), Scaling up influence functions,
        arXiv 2112.03052.

    Example:
        >>> A = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
        >>> v = torch.ones(3, dtype=torch.float64)
        >>> x = ihvp_arnoldi(A, rank=2, max_iter=3)(v)  # the eigenvalue-1 direction is cut
        >>> torch.allclose(x, torch.tensor([0.25, 0.5, 0.0], dtype=torch.float64))
        True
    """
    func = "ihvp_arnoldi"
    A = as_operator(func, op)
    rank = check_int(func, "rank", rank)
    if rank > A.dim:
        raise ValueError(f"{func}(rank=...): expected rank <= P = {A.dim}, got {rank}. "
                         f"Lower rank (rank = P is the exact inverse).")
    damping = check_positive(func, "damping", damping, allow_zero=True)
    max_iter = check_optional_int(func, "max_iter", max_iter)
    m = min(A.dim, 2 * rank if max_iter is None else max_iter)
    if m < rank:
        raise ValueError(f"{func}(max_iter=...): expected max_iter >= rank = {rank}, got "
                         f"{max_iter}. Raise max_iter (each step gives one Ritz pair).")
    seed = check_int(func, "seed", seed, minimum=0)
    rtol = default_rtol(m, A.dtype) if rtol is None else check_positive(
        func, "rtol", rtol, allow_zero=True)
    values, vectors = _arnoldi(func, A, m, seed)
    top = Eigen(values[:rank], vectors[:, :rank])
    return spectral_inverse(func, top, damping=damping, rtol=rtol)


def ihvp_arnoldi_full_rank(op, *, damping: float = 0.0, rank: int | None = None,
                           **kwargs) -> EigenInverse:
    """Return :func:`ihvp_arnoldi` with ``rank`` defaulting to ``P`` (then it is exact).  # [k, P] -> [k, P]

    The ``SOLVERS`` registry entry, callable as ``factory(op, damping=...)``.
    """
    A = as_operator("ihvp_arnoldi", op)
    return ihvp_arnoldi(A, rank=A.dim if rank is None else rank, damping=damping, **kwargs)
