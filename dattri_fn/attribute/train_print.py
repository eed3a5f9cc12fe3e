"""A print of the training rows ``prepare`` saw, checked where ``score`` relies on their order.

States that cache per-row results (TRAK, LoGra, FactGraSS, representer points, KNN-Shapley
features; RelatIF's ``1 / n_i``) are only right for the rows ``prepare`` saw, in its order. The
print is one ``int64`` per row: ``sum_j w_j bits(x_ij)`` over every leaf's raw bits (float
values by their bit pattern, integer labels and token ids as they are), with fixed odd weights
``w_j``, wrapping mod 2^64. Integer arithmetic is exact and associative, so the print of a row
does not depend on how the rows are batched ([24] and [8, 8, 8] give the same ``[24]``), and a
row that differs from the saved one in a single entry always gives another value (``w_j`` odd,
the difference of two bit patterns nonzero mod 2^64). There is no tolerance to state: equal
bits pass, other bits fail (so the same values in another dtype or ``-0.0`` for ``0.0`` count
as other rows). A permutation fails unless it only swaps equal rows (whose scores are equal).

The same live leaf tensors at the same ``_version`` (what ``prepare`` read, untouched since)
pass without a tensor op: they are tracked by weak references, so a freed tensor whose memory a
new one reuses never passes on its address.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .._checks import _msg, _Regrouped, batch_leaves, is_batch

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_LEAF = 1000003  # mixes the leaves of a row: acc * _LEAF + leaf print (wrapping)
# id(print) -> (weakref to the print, [(weakref to a leaf, its _version)] in batch order)
_SEEN: dict[int, tuple] = {}
_WEIGHTS: dict[tuple, Tensor] = {}


def _weights(m: int, device) -> Tensor:
    """``[m]`` fixed odd int64 weights below 2^32 (Knuth's multiplicative hash of the index):
    a 32-bit pattern times one never leaves int64."""
    key = (m, str(device))
    w = _WEIGHTS.get(key)
    if w is None:
        j = torch.arange(1, m + 1, dtype=torch.int64, device=device)
        w = _WEIGHTS[key] = (j * 2654435761) % (1 << 32) | 1
    return w


def _leaf_print(t: Tensor) -> Tensor:
    """``sum_j w_j bits(t[i, j])`` per row, int64, wrapping.  # [b, ...] -> [b]"""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.is_floating_point():
        t = t.view(_BITS[t.element_size()])
    x = t.reshape(t.shape[0], -1)
    if x.dtype != torch.int64:
        x = x.to(torch.int64)
    return (x * _weights(x.shape[1], x.device)).sum(1)


def batch_print(batch) -> Tensor:
    """The print of every row of one Batch (all its leaves).  # -> [b] int64"""
    acc = None
    for t in batch_leaves(batch):
        p = _leaf_print(t)
        acc = p if acc is None else acc * _LEAF + p.to(acc.device)
    return acc


def _source(train):
    """The user's data behind a regrouped view, or None for what has no print (a one-shot
    iterator, which a second read would consume; a store; anything not iterable)."""
    if isinstance(train, _Regrouped):
        train = train.data
    if is_batch(train):
        return [train]
    if isinstance(train, (str, bytes, Mapping)) or not isinstance(train, Iterable):
        return None
    if iter(train) is train or hasattr(train, "manifest"):  # one-shot, or a FeatureStore
        return None
    return train


def _printable(b) -> bool:
    """A Batch whose leaves share one leading size > 0 (anything else is refused by name by
    the method's own checks, not here)."""
    if not is_batch(b):
        return False
    leaves = batch_leaves(b)
    if any(t.ndim == 0 or t.is_meta for t in leaves):
        return False
    return leaves[0].shape[0] > 0 and all(t.shape[0] == leaves[0].shape[0] for t in leaves)


def _shuffled(loader) -> bool:
    samplers = (getattr(loader, "sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    random = (torch.utils.data.RandomSampler, torch.utils.data.SubsetRandomSampler,
              torch.utils.data.WeightedRandomSampler)
    return any(isinstance(s, random) for s in samplers)


def take(func: str, train, *, shuffled: str = "refuse") -> Tensor | None:
    """Return the print of ``train``'s rows in order (``[n_train]`` int64), or None where there
    is nothing to print (a one-shot iterator, a store, a batch of another structure: ``prepare``
    then checks its data itself, and ``score`` counts rows as before).

    Raises:
        ValueError: ``train`` is a DataLoader with a random sampler (``shuffle=True``): each
            pass has another order, so no later call can give the rows in ``prepare``'s order
            (``shuffled="none"``: None instead, for a caller that can do without the order).
    """
    data = _source(train)
    if data is None:
        return None
    if _shuffled(data):
        if shuffled == "none":
            return None
        raise ValueError(_msg(func, "train", "the training rows in a fixed order (the state "
                              "keeps a result per row, by position)", "a DataLoader with a "
                              "random sampler (shuffle=True): every pass has another order",
                              "Pass shuffle=False."))
    parts, leaves = [], []
    for b in data:
        if not _printable(b):
            return None
        parts.append(batch_print(b).cpu())
        if isinstance(data, (list, tuple)):
            leaves.extend((weakref.ref(t), t._version) for t in batch_leaves(b))
    if not parts:
        return None
    rows = torch.cat(parts)
    if isinstance(data, (list, tuple)):
        key = id(rows)
        _SEEN[key] = (weakref.ref(rows), leaves)
        weakref.finalize(rows, _SEEN.pop, key, None)
    return rows


def _same_objects(data, rows: Tensor) -> bool:
    """Whether ``data`` holds the very leaves ``take`` printed, unmodified: no tensor op."""
    seen = _SEEN.get(id(rows))
    if seen is None or seen[0]() is not rows or not isinstance(data, (list, tuple)):
        return False
    leaves = seen[1]
    i = 0
    for b in data:
        if not is_batch(b):
            return False
        for t in batch_leaves(b):
            if i >= len(leaves) or leaves[i][0]() is not t or leaves[i][1] != t._version:
                return False
            i += 1
    return i == len(leaves)


def first_mismatch(train, rows: Tensor) -> int | None:
    """The first row index where ``train`` differs from the print ``rows`` (``len(rows)``
    where it has other rows past them or too few), or None where it gives the same rows in the
    same order. Reads each batch once; a one-shot iterator is consumed."""
    if isinstance(train, _Regrouped):
        train = train.data
    data = [train] if is_batch(train) else train
    if _same_objects(data, rows):
        return None
    n = 0
    for b in data:
        if not _printable(b):
            return n
        p = batch_print(b).cpu()
        if n + len(p) > len(rows):
            return len(rows)
        bad = (p != rows[n:n + len(p)]).nonzero()
        if len(bad):
            return n + int(bad[0, 0])
        n += len(p)
    return None if n == len(rows) else len(rows)


def matches(train, rows: Tensor | None) -> bool:
    """True where ``train`` gives the printed rows in order; False without a print, for a
    one-shot iterator (not read) and for what :func:`first_mismatch` finds different."""
    if rows is None or train is None or _source(train) is None:
        return False
    try:
        return first_mismatch(train, rows) is None
    except (RuntimeError, TypeError, ValueError):
        return False


def check(func: str, train, rows: Tensor | None, *, consume: bool = True) -> None:
    """Raise unless ``train`` (not None) gives the rows printed in ``rows``, in order; nothing
    without a print (a state saved before prints: counted only, by the caller), nor for a
    one-shot iterator with ``consume=False`` (a caller that reads it next)."""
    if rows is None or train is None or (not consume and _source(train) is None):
        return
    i = first_mismatch(train, rows)
    if i is None:
        return
    where = (f"row {i} differs" if i < len(rows)
             else f"not the {len(rows)} rows prepare saw")
    raise ValueError(_msg(func, "train", "the rows prepare saw, in its order (the state caches "
                          "their features)", f"other rows or another order ({where})",
                          "Pass the same batches, or prepare on these."))


def stamped(prepare, func: str):
    """``prepare(params, train)`` whose state also holds :func:`take`'s print of ``train`` in
    its ``train_print`` field (taken first, so a shuffled DataLoader is refused before work)."""
    @functools.wraps(prepare)
    def wrapped(params, train):
        rows = take(func, train)
        return prepare(params, train)._replace(train_print=rows)

    return wrapped
