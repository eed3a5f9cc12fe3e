"""Hypothesis strategies drawing the kit's problems and random operators by sizes and seeds.

    from hypothesis import given
    from dattri_fn.testing.strategies import problems, operators

    @given(problem=problems(kinds=("ridge", "logistic")))
    def test_my_method(problem):
        check_method(my_method(problem.loss), problem)

Strategies draw sizes, seeds, damping and conditioning, never raw float arrays: every tensor is
built from ``torch.Generator(seed)``, so a failing example is reproduced from its printed draw.
Needs hypothesis (``pip install 'dattri_fn[testing]'``).
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("dattri_fn.testing.strategies needs hypothesis, an optional extra: "
                      "pip install 'dattri_fn[testing]' (or pip install hypothesis).") from e

import torch
from torch import Tensor

from .._types import LinOp
from .matrices import MATRICES
from .problems import BUILDERS, DTYPE

__all__ = ["dampings", "linops", "operators", "problems", "seeds"]

KINDS = tuple(BUILDERS)
CONVEX = ("linear", "ridge", "logistic")


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator``: ``0 <= seed < 2**31``."""
    return st.integers(0, 2**31 - 1)


def dampings(low: float = 1e-3, high: float = 1.0, *, zero: bool = False) -> st.SearchStrategy[float]:
    """Damping values, log-uniform-ish over ``[low, high]`` (and 0 when ``zero``)."""
    values = st.sampled_from([low, (low * high) ** 0.5, high]) | st.floats(low, high)
    return (st.just(0.0) | values) if zero else values


def _sizes(kind: str, draw, fitted: bool) -> dict:
    if kind in ("linear", "ridge"):
        # With LOO checked, 8 rows per parameter: a high-leverage row's LOO is its influence
        # times 1 / (1 - h_i), which drags the correlation of the two down on fewer rows.
        dim = draw(st.integers(1, 4))
        low = (8 if fitted or kind == "ridge" else 2) * (dim + 1)
        return {"dim": dim, "n": draw(st.integers(low, max(low, 40)))}
    if kind == "logistic":
        dim, classes = draw(st.integers(1, 3)), draw(st.integers(2, 3))
        low = max(16, 3 * classes * (dim + 1)) if fitted else 6
        return {"n": draw(st.integers(low, low + 12)), "dim": dim, "classes": classes}
    if kind == "mlp":
        return {"n": draw(st.integers(6, 16)), "dim": draw(st.integers(1, 4)),
                "hidden": draw(st.integers(1, 5)), "classes": draw(st.integers(2, 3))}
    if kind == "conv":
        return {"n": draw(st.integers(4, 10)), "size": draw(st.integers(3, 5)),
                "channels": draw(st.integers(1, 2)), "classes": draw(st.integers(2, 3))}
    return {"n": draw(st.integers(4, 10)), "length": draw(st.integers(1, 4)),
            "vocab": draw(st.integers(2, 6)), "hidden": draw(st.integers(1, 4))}


@st.composite
def problems(draw, kinds: tuple[str, ...] = KINDS, *, fitted: bool | None = None,
             dtype: torch.dtype = DTYPE, device="cpu"):
    """Draw a :class:`~dattri_fn.testing.Problem`: a kind from ``kinds``, its sizes, a seed.

    ``fitted=True`` draws only the convex problems fitted at their minimiser, the ones with an
    exact leave-one-out: ridge (``l2`` in ``[0.01, 1]``) and least squares with
    ``n >= 8 (dim + 1)``, logistic regression with ``l2`` in ``[0.05, 0.5]`` and
    ``n >= max(16, 3 P)``; convex problems draw a feature conditioning ``cond`` in
    ``{1, 10, 30}``. On such draws the exact influence (damping 1e-3) correlated with the exact
    LOO at >= 0.918 (the smallest sizes, l2 and every cond, 25 seeds each), so
    ``check_method``'s default ``min_loo_corr=0.85`` holds for a correct influence method.
    """
    if isinstance(kinds, str) or not kinds or any(k not in BUILDERS for k in kinds):
        raise ValueError(f"problems(kinds=...): expected a non-empty tuple of names in "
                         f"{list(BUILDERS)}, got {kinds!r}.")
    if fitted:
        kinds = tuple(k for k in kinds if k in CONVEX)
        if not kinds:
            raise ValueError(f"problems(kinds=...): expected a convex kind {list(CONVEX)} with "
                             f"fitted=True, got none.")
    kind = draw(st.sampled_from(kinds))
    sizes = _sizes(kind, draw, bool(fitted))
    seed = draw(seeds())
    kw = {"dtype": dtype, "device": device}
    if kind in CONVEX:
        kw["cond"] = draw(st.sampled_from([1.0, 10.0, 30.0]))
    if kind == "ridge":
        return BUILDERS[kind](seed=seed, l2=draw(st.floats(0.01, 1.0)), **sizes, **kw)
    if kind == "linear":
        return BUILDERS[kind](seed=seed, fit=bool(fitted), **sizes, **kw)
    if kind == "logistic":
        if fitted:
            return BUILDERS[kind](seed=seed, l2=draw(st.floats(0.05, 0.5)), fit=True, **sizes,
                                  **kw)
        return BUILDERS[kind](seed=seed, **sizes, **kw)
    return BUILDERS[kind](seed=seed, **sizes, **kw)


@st.composite
def operators(draw, kinds: tuple[str, ...] = tuple(MATRICES), *, dims=None,
              conds=None, dtype: torch.dtype = DTYPE, device="cpu") -> Tensor:
    """Draw a dense random ``[P, P]`` operator with a known spectrum: ``"spd"`` (condition
    number from ``conds``, default 1..1e3), ``"psd"`` (a null space), ``"indefinite"``,
    ``"low_rank_diag"`` (see :data:`~dattri_fn.testing.problems.MATRICES`)."""
    if isinstance(kinds, str) or not kinds or any(k not in MATRICES for k in kinds):
        raise ValueError(f"operators(kinds=...): expected a non-empty tuple of names in "
                         f"{list(MATRICES)}, got {kinds!r}.")
    kind = draw(st.sampled_from(kinds))
    dim = draw(dims if dims is not None else st.integers(1, 8))
    seed = draw(seeds())
    cond = draw(conds if conds is not None else st.sampled_from([1.0, 10.0, 100.0, 1000.0]))
    if kind == "low_rank_diag":
        return MATRICES[kind](dim, seed, rank=draw(st.integers(1, max(1, dim))), dtype=dtype,
                              device=device)
    return MATRICES[kind](dim, seed, cond=cond, dtype=dtype, device=device)


@st.composite
def linops(draw, kinds: tuple[str, ...] = tuple(MATRICES), **kwargs) -> LinOp:
    """Draw :func:`operators` wrapped in a LinOp that only multiplies (no dense form to read)."""
    A = draw(operators(kinds, **kwargs))
    return LinOp(lambda V: V @ A.T, A.shape[0], A.dtype, A.device, name="drawn")
