"""Random symmetric matrices with a known spectrum, for solver and operator tests.

:func:`spd_matrix`, :func:`psd_matrix` (a null space), :func:`indefinite_matrix`,
:func:`low_rank_plus_diagonal`; :data:`MATRICES` names them for the checks and strategies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .problems import DTYPE, _check_cond, _gen, _int, _sizes


def _orthogonal(dim: int, g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def _from_spectrum(eig: Tensor, g: torch.Generator, dtype, device) -> Tensor:
    q = _orthogonal(eig.numel(), g)
    A = (q * eig) @ q.T
    return ((A + A.T) / 2).to(dtype=dtype, device=device)


def spd_matrix(dim: int, seed: int, cond: float = 10.0, dtype: torch.dtype = DTYPE,
               device="cpu") -> Tensor:
    """Return a random SPD matrix with eigenvalues ``logspace(0, log10 cond)``.  # [P, P]"""
    _sizes("spd_matrix", seed, dim=dim)
    _check_cond("spd_matrix", cond)
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DTYPE))
    # log10 in float32 as the suite's draws always were: the same seed, the same matrix.
    eig = torch.logspace(0, float(torch.log10(torch.tensor(cond))), dim, dtype=DTYPE)
    return ((q * eig) @ q.T).to(dtype=dtype, device=device)


def psd_matrix(dim: int, seed: int, rank: int | None = None, cond: float = 10.0,
               dtype: torch.dtype = DTYPE, device="cpu") -> Tensor:
    """Return a random PSD matrix of ``rank`` (default ``max(1, dim // 2)``): a null space of
    ``dim - rank`` directions, the other eigenvalues in ``[1, cond]``.  # [P, P]"""
    _sizes("psd_matrix", seed, dim=dim)
    _check_cond("psd_matrix", cond)
    rank = max(1, dim // 2) if rank is None else _int("psd_matrix", "rank", rank, minimum=0)
    if rank > dim:
        raise ValueError(f"psd_matrix(rank=...): expected a rank <= dim = {dim}, got {rank}.")
    g = _gen(seed)
    eig = torch.zeros(dim, dtype=DTYPE)
    if rank:
        eig[:rank] = torch.logspace(0, float(math.log10(cond)), rank, dtype=DTYPE)
    return _from_spectrum(eig, g, dtype, device)


def indefinite_matrix(dim: int, seed: int, negative: int | None = None, cond: float = 10.0,
                      dtype: torch.dtype = DTYPE, device="cpu") -> Tensor:
    """Return a random symmetric matrix with ``negative`` (default ``max(1, dim // 3)``)
    eigenvalues in ``[-cond, -1]`` and the rest in ``[1, cond]``: non-singular, indefinite
    (negative definite for ``P = 1``).  # [P, P]"""
    _sizes("indefinite_matrix", seed, dim=dim)
    _check_cond("indefinite_matrix", cond)
    negative = (max(1, dim // 3) if negative is None
                else _int("indefinite_matrix", "negative", negative, minimum=0))
    if negative > dim:
        raise ValueError(f"indefinite_matrix(negative=...): expected at most dim = {dim} "
                         f"negative eigenvalues, got {negative}.")
    g = _gen(seed)
    mags = torch.logspace(0, float(math.log10(cond)), dim, dtype=DTYPE)
    signs = torch.ones(dim, dtype=DTYPE)
    signs[torch.randperm(dim, generator=g)[:negative]] = -1
    return _from_spectrum(mags * signs, g, dtype, device)


def low_rank_plus_diagonal(dim: int, seed: int, rank: int = 2, dtype: torch.dtype = DTYPE,
                           device="cpu") -> Tensor:
    """Return ``U U^T + diag(d)`` with ``U`` ``[P, rank]`` Gaussian and ``d`` in ``[0.1, 1]``:
    SPD, the shape of K-FAC damping and DataInf's per-layer blocks.  # [P, P]"""
    _sizes("low_rank_plus_diagonal", seed, dim=dim)
    rank = _int("low_rank_plus_diagonal", "rank", rank, minimum=0)
    g = _gen(seed)
    U = torch.randn(dim, rank, generator=g, dtype=DTYPE)
    d = 0.1 + 0.9 * torch.rand(dim, generator=g, dtype=DTYPE)
    return (U @ U.T + torch.diag(d)).to(dtype=dtype, device=device)


MATRICES: dict[str, Callable[..., Tensor]] = {
    "spd": spd_matrix,
    "psd": psd_matrix,
    "indefinite": indefinite_matrix,
    "low_rank_diag": low_rank_plus_diagonal,
}
