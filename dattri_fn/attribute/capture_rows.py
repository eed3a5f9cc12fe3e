"""How many examples one capture pass may take: in-memory batches merged within the memory budget.

A capture pass (one batched forward and backward with probes, :mod:`dattri_fn.transforms.capture`)
costs a fixed ~0.3-0.7 ms of Python and autograd set-up on top of its arithmetic, which on small
models is most of it. Methods that capture a training set given as a list of batches
(:func:`~dattri_fn.attribute.logra.logra`, :func:`~dattri_fn.attribute.factgrass.factgrass`)
therefore merge consecutive batches into fewer passes (and Grad-Dot/Grad-Cos/TracIn take a score
call's test and train batches in one, :func:`in_one_pass`) while an upper estimate of a pass's memory
stays within :func:`~dattri_fn.operators.gauss_newton.memory_budget`:

    bytes(pass of B rows) <= B * (numel of one example's leaves) * sum_l (in_l + out_l) * itemsize

(a layer applied at ``T`` positions holds ``T * (in + out)`` numbers per example for its input
and output gradient, and ``T`` is at most an example's numel; the model's other activations are
taken to be no wider than its captured layers). That estimate only keeps a pass from blowing
the budget: it assumes every example holds as many positions as numbers, ~65x the bytes a flat
layer takes. A pass's rows are therefore also capped by what it measurably holds: before any pass
has run at most :data:`ONE_PASS_ROWS` rows, after it ``memory_budget() // PASS_SHARE`` bytes of
the batch and its captured factors (4 MiB of the default 256 MiB; merging only saves the fixed
per-pass cost, which a few thousand rows already amortise, while held factors grow with every
row). Per-example results do not depend on how examples are grouped into passes (eval mode); sums
over examples (curvature statistics) are reordered, so they move at the rounding level.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor

from .._checks import batch_cat, batch_leaves, batch_size, batch_slice, is_batch, refuse_ambiguous_list

ONE_PASS_ROWS = 4096  # most rows :func:`in_one_pass` takes in one pass (its docstring says why)
PASS_SHARE = 64  # a merged pass holds at most memory_budget() / PASS_SHARE measured bytes


def capture_row_bytes(batch, weights: Iterable[Tensor]) -> int:
    """Upper estimate of one example's bytes in a capture pass (module docstring).

    Args:
        batch: one Batch, as the pass would take it.
        weights: the captured layers' weights (``[out, in]``, ``[out, C, kh, kw]`` or a
            ``Conv1D``'s ``[in, out]``: each counts ``shape[0] + numel / shape[0]``).
    """
    leaves = batch_leaves(batch)
    per_row = sum(t.shape[1:].numel() for t in leaves) if leaves and leaves[0].ndim else 1
    widths, itemsize = 0, 4
    for w in weights:
        widths += w.shape[0] + w.numel() // max(w.shape[0], 1)
        itemsize = max(itemsize, w.element_size())
    return max(1, per_row * widths * itemsize)


def _layout(batch) -> tuple:
    """What must agree for two batches to concatenate: structure, trailing shapes, dtypes."""
    if isinstance(batch, Tensor):
        return (Tensor, tuple(batch.shape[1:]), batch.dtype, batch.device)
    if isinstance(batch, Mapping):
        return (dict, tuple((k, *_layout(v)) for k, v in batch.items()))
    return (type(batch), tuple(_layout(v) for v in batch))


def merged_passes(func: str, arg: str, data, row_bytes, budget: int, measured=None, *,
                  share: int = PASS_SHARE, split: bool = False) -> Iterator:
    """Yield the batches of a list/tuple ``data`` merged into runs of at most ``budget //
    row_bytes(first batch)`` rows (consecutive batches of one layout only); any other ``data``
    (one Batch, a DataLoader, a store) is yielded as given by the caller's own iteration.

    ``measured``: ``() -> bytes one example held in the last pass`` (its batch and captured
    factors; None before any pass). A run then also stops at ``budget // PASS_SHARE //
    measured()`` rows, and at :data:`ONE_PASS_ROWS` rows while nothing is measured (module
    docstring); it is read each time a run starts, so the caller's first pass sets the rest.
    ``share``: that divisor (default :data:`PASS_SHARE`). ``split``: a batch over the
    measured cap is yielded in slices, and each run is filled to its cap across batches (a
    batch's leftover rows go with the next batch's first ones: every row once, in order;
    per-example rows do not depend on the grouping; sums over examples are reordered).

    Each batch's rows are checked (:func:`~dattri_fn._checks.batch_size`) before merging, so an
    error names ``func(arg=...)`` as it would unmerged.
    """
    if is_batch(data) or not isinstance(data, (list, tuple)):
        raise TypeError("merged_passes: expected a list or tuple of batches")
    fit, cap, buf, n, layout = None, None, [], 0, None

    def run_cap() -> int:
        if measured is None:
            return fit
        m = measured()
        return min(fit, ONE_PASS_ROWS if m is None else max(1, budget // share // m))

    seen = 0  # a NaN example named by its index in the data
    for b in data:
        rows = batch_size(func, arg, b, first=seen)
        seen += rows
        if fit is None:
            fit = max(1, budget // row_bytes(b))
        lay = _layout(b)
        if buf and (lay != layout or (not split and n + rows > cap)):
            yield batch_cat(buf)
            buf, n = [], 0
        if not split:
            if not buf:  # a run starts: capped by what the pass before it measured
                cap = run_cap()
            buf.append(b)
            n, layout = n + rows, lay
            continue
        s, layout = 0, lay
        while s < rows:  # runs filled to their cap, across batches: a run's cap read as it starts
            if not buf:
                cap = run_cap()
            take = min(rows - s, cap - n)
            buf.append(b if take == rows else batch_slice(b, s, s + take))
            n, s = n + take, s + take
            if n >= cap:
                yield batch_cat(buf)
                buf, n = [], 0
    if buf:
        yield batch_cat(buf)


def can_merge(data) -> bool:
    """True for a list/tuple of two or more Batches (what :func:`merged_passes` merges)."""
    return isinstance(data, (list, tuple)) and not is_batch(data) and len(data) > 1 and all(
        is_batch(b) for b in data)


__all__ = ["PASS_SHARE", "can_merge", "capture_row_bytes", "merged_passes"]


def in_one_pass(func: str, test, train, row_bytes) -> tuple[list, list[int]] | None:
    """``([test, *train batches], their row counts)`` when both sides are in memory, in one
    layout, total at most ``ONE_PASS_ROWS`` rows, and one capture pass over all of them fits
    :func:`~dattri_fn.operators.gauss_newton.memory_budget` (``row_bytes(batch)``: an upper
    estimate per example); else None (nothing is read).

    The row cap: one pass saves a fixed ~0.5 ms per batch it replaces, which is noise next to
    the arithmetic of a few thousand rows, while its held factors grow with every row (at 16k
    digits-mlp rows they matched dattri's whole peak; the batch-by-batch path holds one batch).
    """
    from ..operators.gauss_newton import memory_budget

    if not is_batch(test) or train is None:
        return None
    refuse_ambiguous_list(func, "train", train)
    if is_batch(train):
        batches = [train]
    elif isinstance(train, (list, tuple)) and train and all(is_batch(b) for b in train):
        batches = list(train)
    else:
        return None
    lay = _layout(test)
    if any(_layout(b) != lay for b in batches):
        return None
    try:  # a bad batch takes the usual path, whose error names it
        rows = [batch_size(func, "train", b) for b in (test, *batches)]
    except (TypeError, ValueError):
        return None
    if sum(rows) > ONE_PASS_ROWS or sum(rows) * row_bytes(test) > memory_budget():
        return None
    return [test, *batches], rows


def cached_row_count(features, factors: dict | None) -> int | None:
    """Rows a cache holds: ``n`` of ``features [n, d]``, else the first factor's leading size (None: none)."""
    if features is not None:
        return features.shape[0]
    if factors:
        return next(iter(factors.values()))[0].shape[0]
    return None
