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
import warnings
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


def _leaves(b) -> list:
    """A Batch's leaves, a Mapping's by sorted key (its key order is not part of its rows)."""
    if isinstance(b, Mapping) and all(isinstance(k, str) for k in b):
        return batch_leaves({k: b[k] for k in sorted(b)})
    return batch_leaves(b)


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
        t = torch.view_as_real(t.resolve_conj())
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
    for t in _leaves(batch):
        p = _leaf_print(t)
        acc = p if acc is None else acc * _LEAF + p.to(acc.device)
    return acc


def _tensor_rows(loader) -> list | None:
    """``[dataset.tensors]`` for a DataLoader that gives a ``TensorDataset``'s rows in order with
    the default collate (its batches stack those rows: the same row prints), else None."""
    from torch.utils.data import DataLoader, SequentialSampler, TensorDataset, default_collate

    if not (isinstance(loader, DataLoader) and isinstance(loader.dataset, TensorDataset)
            and loader.batch_size is not None and loader.collate_fn is default_collate
            and type(loader.sampler) is SequentialSampler):
        return None
    return [tuple(loader.dataset.tensors)]


def _source(train):
    """The user's data behind a regrouped view, or None for what has no print (a one-shot
    iterator, which a second read would consume; a store; anything not iterable; a DataLoader
    over another dataset: printing it would cost a pass of the user's loading, which may also
    be readable once, so its rows are only counted). A DataLoader over a ``TensorDataset`` is
    its dataset's tensors (kept by weak reference, never read through the loader)."""
    if isinstance(train, _Regrouped):
        train = train.data
    if is_batch(train):
        return [train]
    if isinstance(train, (str, bytes, Mapping)) or not isinstance(train, Iterable):
        return None
    if iter(train) is train or hasattr(train, "manifest"):  # one-shot, or a FeatureStore
        return None
    if isinstance(train, torch.utils.data.DataLoader):
        return _tensor_rows(train)
    return train


def _printable(b) -> bool:
    """A Batch whose leaves share one leading size > 0 (anything else is refused by name by
    the method's own checks, not here)."""
    if not is_batch(b):
        return False
    leaves = _leaves(b)
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

    Data in memory (a Batch, a list/tuple of them) is not read here: its leaves are kept by weak
    reference with their ``_version``, and the print is formed from them when first needed
    (:func:`resolved`: a ``score`` given other objects, :func:`settle` before a save), in place
    of the empty tensor returned now. A DataLoader's batches are gone after a pass: read now.

    Raises:
        ValueError: ``train`` is a DataLoader with a random sampler (``shuffle=True``): each
            pass has another order, so no later call can give the rows in ``prepare``'s order
            (``shuffled="none"``: None instead, for a caller that can do without the order).
    """
    # (a list of batches, the common case, skips _source's checks: this runs every prepare)
    quick = type(train) in (list, tuple) and train and not isinstance(train[0], Tensor)
    data = train if quick else _source(train)
    if data is None:
        return None
    if not isinstance(data, (list, tuple)) and _shuffled(data):
        if shuffled == "none":
            return None
        raise ValueError(_msg(func, "train", "the training rows in a fixed order (the state "
                              "keeps a result per row, by position)", "a DataLoader with a "
                              "random sampler (shuffle=True): every pass has another order",
                              "Pass shuffle=False."))
    if isinstance(data, (list, tuple)):
        batches, n = [], 0
        for b in data:
            leaves = _leaves(b) if is_batch(b) else None
            if not leaves or leaves[0].ndim == 0:
                return None  # (prepare refuses it by name; resolved() checks the rest)
            n += leaves[0].shape[0]
            batches.append([_kept(t) for t in leaves])
        rows = torch.empty(0, dtype=torch.int64)
        key = id(rows)
        _SEEN[key] = (weakref.ref(rows, lambda _, key=key: _SEEN.pop(key, None)), batches, n)
        return rows
    parts = []
    for b in data:
        if not _printable(b):
            return None
        parts.append(batch_print(b).cpu())
    return torch.cat(parts) if parts else None


def _kept(t: Tensor) -> tuple:
    """``(weakref to t, its _version, weakref to its base, its geometry)``: a view (a slice of
    the user's tensor, as an inline batch list makes) can be formed again from a base that
    outlives it (a view shares its base's version counter, so a write through either shows)."""
    base = t._base
    if base is None:
        return weakref.ref(t), t._version, None, None
    return (weakref.ref(t), t._version, weakref.ref(base),
            (tuple(t.shape), t.stride(), t.storage_offset()))


def _alive(kept: tuple) -> Tensor | None:
    """The kept leaf, or the same view of its live base, unmodified since; else None."""
    ref, version, base_ref, geometry = kept
    t = ref()
    if t is None and base_ref is not None:
        base = base_ref()
        if base is not None:
            t = base.as_strided(*geometry)
    return t if t is not None and t._version == version else None


def _seen(rows: Tensor):
    seen = _SEEN.get(id(rows))
    return seen if seen is not None and seen[0]() is rows else None


def resolved(rows: Tensor) -> Tensor | None:
    """The full print ``rows`` (formed now, in place, from the leaves ``take`` kept where it was
    left empty), or None where it cannot be known: those leaves were freed or modified since
    (or a state saved before it was formed). Nothing is refused on an unknown print: the rows
    are then only counted."""
    if rows.numel():
        return rows
    seen = _seen(rows)
    if seen is None:
        return None
    parts = []
    for batch in seen[1]:
        leaves = [_alive(kept) for kept in batch]
        if any(t is None for t in leaves) or not _printable(leaves):
            return None
        parts.append(batch_print(leaves).cpu())
    rows.resize_(seen[2]).copy_(torch.cat(parts))
    return rows


def settle(obj) -> None:
    """Form every pending ``train_print`` in a state (NamedTuples, lists, tuples, dicts), so a
    saved state carries it: for :func:`dattri_fn.io.save`."""
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        for f in type(obj)._fields:
            v = getattr(obj, f)
            if f == "train_print" and isinstance(v, Tensor):
                resolved(v)
            else:
                settle(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            settle(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            settle(v)


def _same_objects(data, rows: Tensor) -> bool:
    """Whether ``data`` holds the very leaves ``take`` saw, unmodified: no tensor op."""
    seen = _seen(rows)
    if seen is None or not isinstance(data, (list, tuple)) or len(data) != len(seen[1]):
        return False
    for b, kept in zip(data, seen[1], strict=True):
        if not is_batch(b):
            return False
        leaves = _leaves(b)
        if len(leaves) != len(kept) or any(k[0]() is not t or k[1] != t._version
                                           for t, k in zip(leaves, kept, strict=True)):
            return False
    return True


def first_mismatch(train, rows: Tensor) -> int | None:
    """The first row index where ``train`` differs from the print ``rows`` (``len(rows)``
    where it has other rows past them or too few), or None where it gives the same rows in the
    same order, or where the print is unknown (:func:`resolved`). Reads each batch once; a
    one-shot iterator is consumed."""
    if isinstance(train, _Regrouped):
        train = train.data
    data = _source(train)
    if data is None:
        if not (isinstance(train, Iterable) and iter(train) is train):
            return None  # a store, or a DataLoader over another dataset: counted only
        data = train  # a one-shot iterator: read here, once
    if _same_objects(data, rows):
        return None
    rows = resolved(rows)
    if rows is None:
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
    """True where ``train`` gives the printed rows in order; False without a print, for an
    unknown one, for a one-shot iterator (not read) and for what :func:`first_mismatch` finds
    different."""
    if rows is None or train is None or _source(train) is None:
        return False
    if isinstance(train, _Regrouped):
        train = train.data
    if _same_objects(_source(train), rows):
        return True
    if resolved(rows) is None:
        return False
    try:
        return first_mismatch(train, rows) is None
    except (RuntimeError, TypeError, ValueError):
        return False


def check(func: str, train, rows: Tensor | None, *, consume: bool = True) -> None:
    """Raise unless ``train`` (not None) gives the rows printed in ``rows``, in order; nothing
    without a print or with an unknown one (the rows are counted only, by the caller), nor for
    a one-shot iterator with ``consume=False`` (a caller that reads it next)."""
    if rows is None or train is None or (not consume and _source(train) is None):
        return
    data = _source(train)
    if data is not None and not _same_objects(data, rows) and resolved(rows) is None:
        from ..transforms.layer_grads_plan import user_stacklevel

        warnings.warn(f"{func}(train=...): cannot check that these are the rows prepare saw, in "
                      "its order: the tensors prepare read were freed or written in place since "
                      "(e.g. a temporary .clone() batch list), so the scores follow prepare's "
                      "rows. Keep the training tensors alive and unchanged until score, or pass "
                      "train=None.", UserWarning, stacklevel=user_stacklevel())
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
