"""Eager checks at a method's public boundary: the first example through a user function, and a
``train`` argument against the rows a state cached."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from .._checks import (
    _msg,
    _rebuilt,
    _refuse_store,
    _Regrouped,
    batch_leaves,
    batch_size,
    count_rows,
    is_batch,
    refuse_ambiguous_list,
)
from .._types import Params
from . import train_print


def first_example(batch):
    """Return row 0 of every leaf of a Batch: one example, the leading dim removed."""
    if isinstance(batch, Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        return {k: v[0] for k, v in batch.items()}
    return _rebuilt(batch, [v[0] for v in batch])


def check_example_fn(func: str, arg: str, data_arg: str, fn: Callable, params: Params, batch,
                     *, ndim: int = 0, fix: str = "") -> Tensor:
    """Call ``fn(params, example_0)`` eagerly; raise a clear error unless it gives an ``ndim``-d
    Tensor (a failing call is blamed on the data, the usual cause)."""
    try:
        out = fn(params, first_example(batch))
    except (RuntimeError, IndexError) as err:
        raise ValueError(_msg(func, data_arg, f"examples that {arg} accepts (the layout of the "
                              "training examples)", f"an error on the first example: {err}"))\
            from err
    if not isinstance(out, Tensor):
        raise TypeError(_msg(func, arg, "a function returning a Tensor per example",
                             type(out).__name__))
    if out.ndim != ndim:
        want = "a scalar Tensor[]" if ndim == 0 else f"a {ndim}-d Tensor"
        raise ValueError(_msg(func, arg, f"a function returning {want} per example",
                              f"shape {list(out.shape)}", fix))
    return out


def _unread_rows(func: str, data) -> int | None:
    """:func:`~dattri_fn._checks.count_rows` of ``train`` without the finite scan of its values,
    for a call that never reads them. A batch whose structure ``batch_size`` would refuse (not a
    batch, a 0-d leaf, leaves of different leading sizes, B = 0, a meta tensor) is handed to
    ``batch_size`` itself, which raises its own error before it scans anything; so does
    ``count_rows`` for a store or an ambiguous list."""
    if isinstance(data, _Regrouped):
        data = data.data
    _refuse_store(func, "train", data)
    refuse_ambiguous_list(func, "train", data)
    if is_batch(data):
        data = [data]
    if not isinstance(data, (list, tuple)):
        return None
    n = 0
    for b in data:
        if not is_batch(b):
            return count_rows(func, "train", data)  # raises batch_size's TypeError
        leaves = batch_leaves(b)
        size = leaves[0].shape[0] if leaves[0].ndim else 0
        if not size or any(t.ndim == 0 or t.shape[0] != size or t.is_meta for t in leaves):
            batch_size(func, "train", b)  # raises its error for this structure
            raise AssertionError(f"batch_size accepted a batch refused here: {b!r}")
        n += size
    return n


def check_cached_train(func: str, train, n_cached: int, *, read: bool = True,
                       rows: Tensor | None = None) -> None:
    """Raise if ``train`` has != ``n_cached`` rows: a Batch or a list/tuple of them counted, a
    DataLoader by its dataset's length (a loader over a subset scores no other rows); with
    ``rows`` (the state's :func:`~dattri_fn.attribute.train_print.take` print), also unless
    ``train`` gives those rows in that order (the same live tensors pass with no tensor op;
    others are read once, a one-shot iterator consumed).

    ``read=False`` is for a call that never reads ``train``'s values (its state caches the rows it
    scores): the rows are counted and every error about their type or count is raised as with
    ``read=True``, but the values are not scanned for NaN/inf (they cannot reach the scores; the
    cached rows were checked finite when the state was prepared)."""
    if train is None:
        n = None
    elif read:
        n = count_rows(func, "train", train)
    else:
        n = _unread_rows(func, train)
    dataset = getattr(train, "dataset", None)
    if n is None and dataset is not None and hasattr(dataset, "__len__"):
        n = len(dataset)
        size = getattr(train, "batch_size", None)
        if getattr(train, "drop_last", False) and size:
            n -= n % size
    if n is not None and n != n_cached:
        raise ValueError(_msg(func, "train", f"the {n_cached} training examples the state was "
                              "prepared on (its cached features are used)", f"{n} examples",
                              "Call prepare on this training set, or pass train=None."))
    train_print.check(func, train, rows)
