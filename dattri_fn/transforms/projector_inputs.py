"""Validation of :class:`~dattri_fn.transforms.projector.Projector`'s settings and inputs, and
the columns of a per-sample gradient tree read without forming its ``[B, P]`` concatenation.
Moved out of :mod:`~dattri_fn.transforms.projector` (which re-exports every name) so that module
stays within the house size."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .._checks import _msg, check_int, check_optional_int, check_tensor

KINDS = ("gaussian", "rademacher", "sjlt")


def _check_settings(func: str, *, proj_dim, kind, seed, nnz, chunk_size) -> None:
    check_int(func, "proj_dim", proj_dim, minimum=1)
    if not isinstance(kind, str):
        raise TypeError(_msg(func, "kind", f"a str, one of {KINDS}", type(kind).__name__))
    if kind not in KINDS:
        raise ValueError(_msg(func, "kind", f"one of {KINDS}", repr(kind)))
    check_int(func, "seed", seed, minimum=0)
    check_int(func, "nnz", nnz, minimum=1)
    if kind != "sjlt" and nnz != 1:
        raise ValueError(_msg(func, "nnz", f"nnz=1 for kind={kind!r}", repr(nnz),
                              "nnz only applies to kind='sjlt'."))
    if kind == "sjlt" and nnz > proj_dim:
        raise ValueError(_msg(func, "nnz", f"an int <= proj_dim={proj_dim} for kind='sjlt'",
                              repr(nnz), "Each row of R needs nnz distinct columns."))
    check_optional_int(func, "chunk_size", chunk_size, minimum=1)


def _check_features(func: str, features, dim: int | None) -> Tensor:
    check_tensor(func, "features", features, floating=True, finite=False)
    if features.ndim not in (1, 2) or (dim is not None and features.shape[-1] != dim):
        want = "P" if dim is None else str(dim)
        raise ValueError(_msg(func, "features", f"shape [B, {want}] or [{want}]",
                              f"shape {list(features.shape)}"))
    check_tensor(func, "features", features)
    return features


def _tree_columns(func: str, arg: str, grads, dim: int | None):
    """Return ``(cols, B, P, dtype, device)``: ``cols(a, b)`` = columns ``[a, b)`` of the raveled tree.

    Only the layers overlapping ``[a, b)`` are touched, so the ``[B, P]`` concatenation of all
    layers is never formed.
    """
    if not isinstance(grads, Mapping) or not grads:
        raise TypeError(_msg(func, arg, "a non-empty dict {name: [B, *shape]}",
                             type(grads).__name__))
    flats, offsets, total, lead = [], [], 0, None
    for name, g in grads.items():
        check_tensor(func, f"{arg}[{name!r}]", g, floating=True, finite=False)
        check_tensor(func, f"{arg}[{name!r}]", g)
        if g.ndim == 0:
            raise ValueError(_msg(func, f"{arg}[{name!r}]", "a [B, *shape] tensor", "a 0-d tensor"))
        if lead is None:
            lead = g
        elif g.shape[0] != lead.shape[0] or g.dtype != lead.dtype or g.device != lead.device:
            raise ValueError(_msg(func, f"{arg}[{name!r}]",
                                  f"batch {lead.shape[0]}, {lead.dtype} on {lead.device} "
                                  "like the first leaf",
                                  f"batch {g.shape[0]}, {g.dtype} on {g.device}"))
        flats.append(g.reshape(g.shape[0], math.prod(g.shape[1:])))
        offsets.append(total)
        total += flats[-1].shape[1]
    if dim is not None and total != dim:
        raise ValueError(_msg(func, arg, f"{dim} features per example in total",
                              f"{total}", "The projector's dim must equal the raveled size."))

    def cols(a: int, b: int) -> Tensor:
        i = bisect.bisect_right(offsets, a) - 1
        pieces = []
        while a < b:
            off, flat = offsets[i], flats[i]
            stop = min(b, off + flat.shape[1])
            if stop > a:
                pieces.append(flat[:, a - off:stop - off])
            a, i = stop, i + 1
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    return cols, lead.shape[0], total, lead.dtype, lead.device
