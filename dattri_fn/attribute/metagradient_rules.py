"""The horizon and early-exit rules of :func:`~dattri_fn.attribute.metagradient.metagradient`:
``"band"``'s per-(step, target) weights (:func:`band_weights`), the recipes' early exit
(:data:`EARLY_EXIT`), the params-cotangent norms the rules compare, and the checks of
``horizon=``/``early_exit=``. Split out of :mod:`.metagradient` (stop 26, no behaviour change);
every name stays importable from there."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import _msg, check_optional_int


def _check_horizon(func: str, horizon) -> int | str | None:
    if isinstance(horizon, str):
        if horizon in ("auto", "band"):
            return horizon
        raise ValueError(_msg(func, "horizon", "None, an int >= 1, 'auto' or 'band'", repr(horizon)))
    return check_optional_int(func, "horizon", horizon)


# The band rule's constants, fixed (stop 18, benchmarks/magic_rules.py "auto-band") before any
# LDS was seen: horizons whose params cotangent is within 10% of the smallest, at least half
# the argmin's length.
BAND_TOLERANCE = 1.1
RECORD_LIMIT = 2**24


def band_weights(norms: Tensor) -> tuple[Tensor, Tensor]:
    """Return each step's weight in the band mean and the argmin horizons.  # [T, k] -> [T, k], [k]

    ``norms[K-1, j] = |thetabar^j_{T-K}|``. With ``K_j = argmin_K`` (first minimum over the
    finite norms) the band is ``{K >= K_j / 2 : norms[K-1, j] <= 1.1 norms[K_j-1, j]}`` and the
    band metagradient is ``(1/|band_j|) sum_{K in band_j} W_j[K]``, ``W[K] = sum_{t >= T-K} c_t``
    (``c_t`` step ``t``'s weight cotangents). Step ``t`` enters every ``W[K]`` with ``K >= T - t``,
    so the mean is ``sum_t a[T-t-1, j] c_t`` with ``a[K-1, j] = |{K' in band_j : K' >= K}| /
    |band_j|``: a per-(step, target) weight, no ``[T, k, n]`` record. A target with no finite
    norm gets the full pass (``band = {T}``, ``K_j = T``), as ``"auto"`` does.
    """
    T = norms.shape[0]
    finite = torch.isfinite(norms)
    masked = torch.where(finite, norms, torch.full_like(norms, math.inf))
    low = masked.min(0).values  # [k]
    # The first minimum (ties to the shorter horizon, as "auto"): torch.min's index among equal
    # values is not documented to be the first, argmax of a 0/1 column is.
    anchor = (masked == low[None]).to(torch.long).argmax(0) + 1
    never = ~finite.any(0)
    anchor[never] = T
    K = torch.arange(1, T + 1, device=norms.device)[:, None]  # [T, 1]
    band = finite & (norms <= BAND_TOLERANCE * low[None]) & (2 * K >= anchor[None])  # [T, k]
    band[:, never] = False
    band[T - 1, never] = True
    per_K = band.to(norms.dtype) / band.sum(0).to(norms.dtype)  # [T, k], each column sums to 1
    # a[K-1] = sum_{K' >= K} per_K[K'-1]: a reversed cumulative sum down the horizons.
    return per_K.flip(0).cumsum(0).flip(0), anchor


def _check_early_exit(func: str, early_exit, horizon) -> tuple[float, int] | None:
    if early_exit is None:
        return None
    want = f"None or a pair (ratio >= {BAND_TOLERANCE}, steps >= 1)"
    # Any pair (a tuple, a list from a config file); numpy/torch scalars count as numbers.
    if isinstance(early_exit, (str, bytes, Tensor)) or not isinstance(early_exit, Sequence) \
            or len(early_exit) != 2:
        raise ValueError(_msg(func, "early_exit", want, repr(early_exit)))
    ratio, steps = _as_real(early_exit[0]), _as_int(early_exit[1])
    if ratio is None or steps is None or not math.isfinite(ratio) or ratio < BAND_TOLERANCE \
            or steps < 1:
        raise ValueError(_msg(func, "early_exit", want, repr(early_exit)))
    if horizon not in ("auto", "band"):
        raise ValueError(_msg(func, "early_exit", "None unless horizon is 'auto' or 'band'",
                              f"{early_exit!r} with horizon={horizon!r}"))
    return ratio, steps


def _as_real(x) -> float | None:
    """``x`` as a float if it is a real number (not a bool; a one-element real tensor too)."""
    if isinstance(x, (bool, str, bytes)) or (isinstance(x, Tensor) and (x.numel() != 1
                                                                       or x.dtype == torch.bool
                                                                       or x.is_complex())):
        return None
    if isinstance(x, (numbers.Real, Tensor)):
        return float(x)
    return None


def _as_int(x) -> int | None:
    """``x`` as an int if it is an integer (``operator.index``: int, numpy or torch integer
    scalars; not a bool, not a float)."""
    if isinstance(x, bool) or (isinstance(x, Tensor) and x.dtype == torch.bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


# The recipes' early exit (text-lm's: recipes.MAGIC_EXIT) (stop 23, benchmarks/magic_exit.py):
# chosen on the VALIDATION LDS of the runs recorded at stop 22 (benchmarks/magic_rules.py
# --records) as the rule with the fewest steps walked among those whose validation LDS did not
# move; on those runs (in sample: the recipes' own seeds) it changed no target's band.
EARLY_EXIT = (1.2, 8)


def _row_norms(parts: Sequence[Tensor], k: int) -> Tensor:
    """The Euclidean norm of each of ``k`` rows across ``parts`` ``[k, ...]``.  # -> [k]

    A row whose sum of squares overflows (a float32 cotangent ~1e20) is recomputed after
    dividing it by a power of two that brings its largest magnitude into ``[0.5, 1)``, the norm
    multiplied back: exact scaling, so the horizon rules compare true norms (engineer H, stop
    25); rows that did not overflow, and every call without such a row, keep the same bits."""
    out = torch.sqrt(sum((b.reshape(k, -1) ** 2).sum(1) for b in parts))
    inf = torch.isinf(out)
    if not bool(inf.any()):
        return out
    amax = torch.stack([b.reshape(k, -1).abs().amax(1) if b[0].numel() else b.new_zeros(k)
                        for b in parts]).amax(0)  # [k]
    e = torch.where(inf & torch.isfinite(amax), torch.frexp(amax)[1], 0)
    scaled = torch.sqrt(sum((torch.ldexp(b.reshape(k, -1), -e[:, None]).to(b.dtype) ** 2).sum(1)
                            for b in parts))
    return torch.where(inf, torch.ldexp(scaled, e).to(out.dtype), out)


__all__ = ["BAND_TOLERANCE", "EARLY_EXIT", "RECORD_LIMIT", "band_weights"]
