"""Representer points' row and score-block helpers: the coefficients ``alpha_i[c_j]``, their
in-place scaling of a score block, a test set's example count, and a state's own copy of a row.

Moved from :mod:`.representer` (stop 25, no behaviour change); it re-exports them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import batch_size, iter_batches


def _coefficients(alpha: Tensor, classes: Tensor) -> Tensor:
    """Return ``alpha_i[c_j]`` for all pairs; with one logit ``(2 c_j - 1) alpha_i[0]``.

    # alpha [n, K], classes [m] -> [n, m]
    """
    if alpha.shape[1] == 1:
        return alpha[:, :1] * (2 * classes - 1).to(alpha.dtype)[None, :]
    return alpha[:, classes]


def _scale(block: Tensor, alpha: Tensor, classes: Tensor, entries: int) -> None:
    """``block[i, j] *= alpha_i[c_j]`` (:func:`_coefficients`) in place, in row chunks of about
    ``entries`` coefficients: never an ``[n, m]`` coefficient temporary.  # [n, m] -> [n, m]"""
    step = max(1, entries // max(1, block.shape[1]))
    for a in range(0, block.shape[0], step):
        block[a:a + step].mul_(_coefficients(alpha[a:a + step], classes))


def _count(func: str, data) -> int | None:
    """The number of examples in a Batch or a list/tuple of Batches; None for a loader."""
    batches = iter_batches(func, "test", data)
    if not isinstance(batches, (list, tuple)):
        return None
    return sum(batch_size(func, "test", b) for b in batches)


def _owned(t: Tensor, sources: list) -> Tensor:
    """``t``, or a contiguous copy where it is a view of one of ``sources`` (the data, the
    params) or not a dense contiguous tensor of its own: a state keeps nothing it shares."""
    ptr = t.untyped_storage().data_ptr()
    if t.is_contiguous() and not any(isinstance(x, Tensor) and x.untyped_storage().data_ptr()
                                     == ptr for x in sources):
        return t
    return t.clone(memory_format=torch.contiguous_format)
