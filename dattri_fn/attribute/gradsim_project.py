"""Gradient similarity's feature maps: the dense and Kronecker projections, the unit norm.

:func:`~dattri_fn.attribute.gradsim.grad_dot` and its kin project each gradient with one dense
``[P, d]`` projector (``projection="dense"``) or, from a FunctionalModel's captured factors, per
layer as ``P_out^T G P_in`` (``projection="kronecker"``,
:class:`~dattri_fn.transforms.kronecker.KroneckerProjector`), and Grad-Cos / TracIn-Cos scale
each gradient by ``1/|g|`` (0 for a zero gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_optional_int
from .._types import Params

PROJECTIONS = ("dense", "kronecker")


def check_projection(name: str, projection: str, proj_dim) -> bool:
    """Validate ``projection`` and ``proj_dim`` at ``name``'s boundary; return whether the
    projection is Kronecker."""
    if projection not in PROJECTIONS:
        raise ValueError(f"{name}(projection=...): expected 'dense' or 'kronecker', got "
                         f"{projection!r}.")
    kron = projection == "kronecker"
    if kron:
        if proj_dim is None:
            raise ValueError(f"{name}(proj_dim=...): expected k (or (k_in, k_out)) per layer "
                             "side with projection='kronecker', got None.")
        for k in proj_dim if isinstance(proj_dim, tuple) else (proj_dim,):
            check_optional_int(name, "proj_dim", k)
    else:
        check_optional_int(name, "proj_dim", proj_dim)
    return kron


def _kronecker(plan, stacked: Params, proj_dim, kind, seed, kept: dict):
    """The KroneckerProjector of ``plan``'s layers at these shapes, built once per method."""
    from ..transforms.kronecker import kronecker_layers, make_kronecker_projector

    like = next(iter(stacked.values()))
    key = (tuple((k, tuple(v.shape[1:])) for k, v in stacked.items()), like.dtype, like.device)
    if key not in kept:
        layers, rest = kronecker_layers(plan, {k: v[0] for k, v in stacked.items()})
        # its factors are drawn once, in the dtype and on the device of these params
        kept[key] = make_kronecker_projector(layers, proj_dim=proj_dim, kind=kind, seed=seed,
                                             rest=rest, dtype=like.dtype, device=like.device)
    return kept[key]


def _projector(stacked: Params, proj_dim, kind, seed):
    if proj_dim is None:
        return None
    from ..transforms.project import make_projector

    P = sum(v[0].numel() for v in stacked.values())
    v0 = next(iter(stacked.values()))
    return make_projector(P, proj_dim=proj_dim, kind=kind, seed=seed, dtype=v0.dtype,
                          device=v0.device, packed=False)  # one per call: a dense R is reused


def _inverse_norms(sq_norms: Tensor, name: str) -> Tensor:
    """Return ``1/|g|`` where ``|g|^2 > 0`` and 0 elsewhere: a zero gradient scores 0.

    A factored zero gradient can have one nonzero factor (e.g. ``a = 0``, ``g != 0``), so a
    huge ``1/clamp_min(|g|, tiny)`` on the other factor overflows and ``0 * inf`` gives NaN.
    An infinite ``|g|^2`` of a finite gradient would score 0 silently, so it is refused.
    """
    if torch.isinf(sq_norms).any():
        top = torch.finfo(sq_norms.dtype).max ** 0.5
        raise ValueError(f"{name}(train=... or test=...): expected per-example squared gradient norms "
                         f"that fit {sq_norms.dtype}, got inf (|g| above ~{top:.1e}); compute in "
                         f"float64 or rescale the loss.")
    # rsqrt(0) = inf and rsqrt(NaN) = NaN are never selected: the same values as rsqrt of a
    # tensor with 1 written there, one op fewer
    return torch.where(sq_norms > 0, sq_norms.rsqrt(), 0)
