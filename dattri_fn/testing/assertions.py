"""Tolerances and the failure message every contract check shares (``default_rtol``, ``_assert_close``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_positive
from .problems import DTYPE

__all__ = ["default_rtol"]


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of an exact computation in ``dtype``."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return 1e-2


def _fail(check: str, name: str, prop: str, detail: str):
    raise AssertionError(f"{check}({name}): {prop} violated: {detail}")


def _where(index: tuple[int, ...], labels: Sequence[str]) -> str:
    return ", ".join(f"{lab} {i}" for lab, i in zip(labels, index, strict=False))


def _assert_close(check: str, name: str, prop: str, got: Tensor, want: Tensor, rtol: float,
                  labels: Sequence[str] = ("row", "col"), scale: float | None = None) -> None:
    """``|got - want| <= rtol * scale`` entrywise, ``scale`` = the largest magnitude of either."""
    if got.shape != want.shape:
        _fail(check, name, prop, f"shape {list(got.shape)}, expected {list(want.shape)}")
    got64, want64 = got.detach().to(torch.float64), want.detach().to(torch.float64)
    if not bool(torch.isfinite(got64).all()):
        idx = tuple(int(i) for i in (~torch.isfinite(got64)).nonzero()[0])
        _fail(check, name, prop, f"non-finite value at {_where(idx, labels)}")
    if scale is None:
        scale = max(float(want64.abs().max()) if want64.numel() else 0.0,
                    float(got64.abs().max()) if got64.numel() else 0.0)
    err = (got64 - want64).abs()
    tol = rtol * max(scale, 1e-300)
    if err.numel() and float(err.max()) > tol:
        flat = int(err.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        _fail(check, name, prop,
              f"worst at {_where(idx, labels)}: {float(got64[idx]):.6g} vs {float(want64[idx]):.6g} "
              f"(|diff| {float(err[idx]):.2e} > {rtol:.0e} x scale {scale:.3g})")


def _randn(seed: int, *shape, dtype=DTYPE, device="cpu") -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _rtol(func: str, rtol) -> float | None:
    return None if rtol is None else check_positive(func, "rtol", rtol)


def _name(obj, fallback: str) -> str:
    name = getattr(obj, "name", None)
    if isinstance(name, str):
        return name
    return getattr(obj, "__name__", fallback)
