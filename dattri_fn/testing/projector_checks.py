"""Contract check of seeded random projection families (``check_projector``) and the JL ``d_eff``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_int
from .assertions import _assert_close, _fail, _name, _randn

__all__ = ["check_projector", "jl_d_eff"]


# -- projectors -----------------------------------------------------------------------------------
def jl_d_eff(kind: str, proj_dim: int, nnz: int = 1) -> int:
    """The ``d_eff`` in ``Var <R^T u, R^T v> <= (|u|^2 |v|^2 + <u,v>^2) / d_eff``: ``d`` for a
    Gaussian or Rademacher ``R``; ``nnz floor(d / nnz)`` for a sparse JL with ``nnz`` segments."""
    if kind in ("gaussian", "rademacher"):
        return int(proj_dim)
    if kind == "sjlt":
        return int(nnz * (proj_dim // nnz))
    raise ValueError(f"jl_d_eff(kind=...): expected 'gaussian', 'rademacher' or 'sjlt', got "
                     f"{kind!r}.")


def check_projector(make: Callable[[int, int, int], Callable[[Tensor], Tensor]], *,
                    dim: int = 12, proj_dim: int = 256, seeds: int = 100, seed: int = 0,
                    d_eff: int | None = None, device="cpu", name: str | None = None) -> None:
    """Check a seeded random projection family ``make(dim, proj_dim, seed)(X) = X R``.

    Properties: ``[B, P] -> [B, d]`` with the input's dtype and device; rows independent and
    linear (to 1e-10 in float64); the same seed gives bitwise-equal output (twice from one
    projector and from a second one built alike) and the next seed a different one;
    ``E[R R^T] = I``: ``max |mean_s R_s R_s^T - I| <= 10 / sqrt(seeds d)`` with ``R_s`` read as
    ``proj_s(I_P)`` (an entry of ``R_s R_s^T`` has variance ``<= 2 / d``, so the mean's sd is
    ``<= sqrt(2 / (seeds d))``: a 7 sd bound); Johnson-Lindenstrauss: over ``seeds`` seeds the MEDIAN of
    ``|<R^T u, R^T v> - <u, v>|`` is at most ``3 sd``, ``sd = sqrt((|u|^2 |v|^2 + <u,v>^2) /
    d_eff)`` for 15 pairs of 5 unit vectors (one pair correlated), which a projector with that
    variance fails with probability ``<= 15 exp(-seeds KL(1/2 || 1/9))`` (1e-19 at 100 seeds;
    Chebyshev gives ``P(|err| > 3 sd) <= 1/9`` per seed, Chernoff the median).

    Args:
        make: ``(dim, proj_dim, seed) -> projector`` (``[B, P] -> [B, d]``).
        d_eff: the variance bound's effective dimension for the kind (:func:`jl_d_eff`);
            default ``proj_dim`` (a dense Gaussian or Rademacher ``R``).
        device: where the features live.

    Raises:
        AssertionError: naming the violated property and the worst entry or pair.
    """
    check = "check_projector"
    if not callable(make):
        raise TypeError(f"check_projector(make=...): expected a callable (dim, proj_dim, seed) "
                        f"-> projector, got {type(make).__name__}.")
    dim, proj_dim = check_int(check, "dim", dim), check_int(check, "proj_dim", proj_dim)
    seeds = check_int(check, "seeds", seeds, minimum=2)
    seed = check_int(check, "seed", seed, minimum=0)
    if d_eff is not None:
        check_int(check, "d_eff", d_eff)
    name = name or _name(make, "projector")
    P, d = dim, proj_dim
    d_eff = d if d_eff is None else d_eff
    X = _randn(seed, 4, P, device=device)
    Y = _randn(seed + 1, 4, P, device=device)
    proj = make(P, d, seed)
    out = proj(X)
    if not isinstance(out, Tensor) or tuple(out.shape) != (4, d):
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        _fail(check, name, "shape [B, P] -> [B, d]", f"got {got} for [4, {P}] -> d = {d}")
    for dtype in (torch.float64, torch.float32):
        o = proj(X.to(dtype))
        if o.dtype != dtype or o.device != X.device:
            _fail(check, name, "dtype/device follow the input", f"got {o.dtype} for {dtype}")
    rows = torch.cat([proj(X[i : i + 1]) for i in range(4)])
    _assert_close(check, name, "row batching proj(X)[i] == proj(X[i:i+1])[0]", rows, out, 1e-10)
    _assert_close(check, name, "linearity proj(aX + bY) == a proj(X) + b proj(Y)",
                  proj(0.7 * X - 1.3 * Y), 0.7 * out - 1.3 * proj(Y), 1e-10)
    if not torch.equal(proj(X), out):
        _fail(check, name, "determinism (a second call is bitwise equal)", "outputs differ")
    if not torch.equal(make(P, d, seed)(X), out):
        _fail(check, name, "same seed, same output (a second projector built alike)",
              "outputs differ")
    if torch.equal(make(P, d, seed + 1)(X), out):
        _fail(check, name, "another seed, another projection", f"seeds {seed} and {seed + 1} "
              "give the same output (is the seed used?)")
    eye = torch.eye(P, dtype=torch.float64, device=device)
    U = _randn(seed + 2, 5, P, device=device)
    U = U / U.norm(dim=1, keepdim=True)
    U[1] = (U[0] + U[1]) / (U[0] + U[1]).norm()
    acc = torch.zeros(P, P, dtype=torch.float64, device=device)
    errs = []
    for s in range(seed, seed + seeds):
        p = make(P, d, s)
        R = p(eye)
        acc += R @ R.T
        Z = p(U)
        errs.append((Z @ Z.T - U @ U.T).abs())
    G = U @ U.T
    sq = G.diagonal()
    sd = ((sq[:, None] * sq[None, :] + G**2) / d_eff).sqrt()
    med = torch.stack(errs).median(0).values
    ratio = med / (3 * sd)
    if float(ratio.max()) > 1:
        i, j = (int(t) for t in torch.unravel_index(ratio.argmax(), ratio.shape))
        _fail(check, name, f"Johnson-Lindenstrauss: median over {seeds} seeds of "
              f"|<R^T u, R^T v> - <u, v>| <= 3 sqrt((|u|^2|v|^2 + <u,v>^2) / d_eff), "
              f"d_eff = {d_eff}",
              f"worst pair ({i}, {j}): median error {float(med[i, j]):.3g} = "
              f"{float(ratio[i, j]):.2f} x the bound {float(3 * sd[i, j]):.3g}")
    _assert_close(check, name, f"E[R R^T] = I over {seeds} seeds (|mean - I| <= 10/sqrt(n d))",
                  acc / seeds, eye, 10 / math.sqrt(seeds * d), labels=("row", "col"), scale=1.0)
