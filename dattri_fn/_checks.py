"""Validation at the public boundary. Every error reads ``"<func>(<arg>=...): expected ..., got ..."``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

# errors of the user's examples or params reported as the public call's (moved to _blame)
from ._blame import (  # noqa: F401
    _DATA_ERROR,
    _DTYPE_ERROR,
    _INNER_DATA_ERROR,
    _LIBRARY_ERROR,
    _TRANSFORM_LIMIT,
    blame_data,
    blame_keys,
    dtype_error,
)

# _msg lives with the order check, which _checks imports (one copy, no import cycle)
from ._order import ONE_SHOT_FIX, _msg, check_order  # noqa: F401


def available_bytes(device) -> int | None:
    """Memory a new tensor on ``device`` can take now: CUDA's free memory, the host's
    ``MemAvailable`` (Linux) for the CPU; None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_dense_fits(func: str, P: int, dtype: torch.dtype, device, copies: int = 1) -> None:
    """Refuse a dense ``[P, P]`` request (``copies`` of it) that cannot fit, before allocating.

    Raises:
        MemoryError: naming ``func``, ``P`` and the bytes asked against the bytes available.
    """
    need = copies * P * P * torch.empty((), dtype=dtype).element_size()
    have = available_bytes(device)
    if have is not None and need > have:
        raise MemoryError(f"{func}: a dense [P, P] matrix with P = {P:,} needs {need / 2**30:.1f} "
                          f"GiB ({copies} x {P:,}^2 x {dtype}), but {have / 2**30:.1f} GiB are "
                          f"available on {torch.device(device)}. Use a matrix-free solver (cg, "
                          f"minres, arnoldi) or a factored one (kfac, ekfac, datainf).")


def all_finite(x: Tensor) -> bool:
    """Whether every entry of the floating ``x`` is finite, in one reduction when it is.

    A NaN or inf entry makes ``x.sum()`` NaN or inf, so a finite sum proves every entry
    finite; only a non-finite sum (a bad entry, or an overflow) pays for the elementwise test.
    A tensor outside autograd is summed as it is (``detach`` is one more dispatch each scan).
    """
    return (math.isfinite((x.detach() if x.requires_grad else x).sum().item())
            or bool(torch.isfinite(x).all()))


def check_tensor(func: str, arg: str, x, *, ndim: int | None = None,
                 dim_size: dict[int, int] | None = None, finite: bool = True,
                 floating: bool = False) -> Tensor:
    """Raise unless ``x`` is a Tensor with ``ndim`` dims, fixed sizes and finite values."""
    if not isinstance(x, Tensor):
        raise TypeError(_msg(func, arg, "a torch.Tensor", type(x).__name__))
    if ndim is not None and x.ndim != ndim:
        raise ValueError(_msg(func, arg, f"a {ndim}-d tensor", f"shape {list(x.shape)}"))
    for axis, size in (dim_size or {}).items():
        if x.shape[axis] != size:
            raise ValueError(_msg(func, arg, f"size {size} at dim {axis}", f"shape {list(x.shape)}"))
    if floating and not x.is_floating_point():
        raise TypeError(_msg(func, arg, "a floating-point tensor", str(x.dtype)))
    if finite and x.is_floating_point() and not all_finite(x):
        raise ValueError(_msg(func, arg, "finite values", "NaN or inf"))
    return x


def check_positive(func: str, arg: str, value, *, allow_zero: bool = False) -> float:
    """Raise unless ``value`` is a finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(_msg(func, arg, "a real number", type(value).__name__))
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(_msg(func, arg, "a finite number " + (">= 0" if allow_zero else "> 0"),
                              repr(value)))
    return float(value)


def check_int(func: str, arg: str, value, *, minimum: int = 1) -> int:
    """Raise unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(_msg(func, arg, "an int", type(value).__name__))
    if value < minimum:
        raise ValueError(_msg(func, arg, f"an int >= {minimum}", repr(value)))
    return value


def check_optional_int(func: str, arg: str, value, *, minimum: int = 1) -> int | None:
    return None if value is None else check_int(func, arg, value, minimum=minimum)


def check_params(func: str, arg: str, params) -> dict[str, Tensor]:
    """Raise unless ``params`` is a non-empty ``dict[str, Tensor]`` of finite floats."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError(_msg(func, arg, "a non-empty dict[str, Tensor]", type(params).__name__))
    for k, v in params.items():
        if not isinstance(v, Tensor):
            raise TypeError(_msg(func, arg, "Tensor values", f"{type(v).__name__} at key {k!r}"))
        if not v.is_floating_point():
            raise TypeError(_msg(func, arg, "floating-point tensors", f"{v.dtype} at key {k!r}"))
        if v.is_meta:
            raise TypeError(_msg(func, arg, "tensors with data", f"a meta tensor at key {k!r}",
                                 "Load the weights (e.g. module.to_empty(...) then a state "
                                 "dict) before attributing."))
        if not all_finite(v):
            raise ValueError(_msg(func, arg, "finite values", f"NaN or inf at key {k!r}"))
    return dict(params)


def is_batch(obj) -> bool:
    """True for a single Batch: a Tensor, or a tuple/list/dict whose leaves are Tensors."""
    if isinstance(obj, Tensor):
        return True
    if type(obj) is tuple or type(obj) is list:  # (no Mapping: the abc check is the slow one)
        return bool(obj) and all(isinstance(v, Tensor) for v in obj)
    if isinstance(obj, Mapping):
        return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return bool(obj) and all(isinstance(v, Tensor) for v in obj)
    return False


def batch_leaves(batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if type(batch) is tuple or type(batch) is list:
        return list(batch)
    if isinstance(batch, Mapping):
        return list(batch.values())
    return list(batch)


def _first_bad_row(t: Tensor) -> int:
    """The first row (leading index) of ``t`` holding a NaN or inf: one reduction, no loop."""
    return int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[0, 0])


def batch_size(func: str, arg: str, batch, first: int | None = None) -> int:
    """Return the shared leading size ``B`` of a Batch; raise on a non-batch, mismatch or B == 0.

    A NaN or inf value is refused naming its first row: ``example first + i`` where the caller
    gives ``first`` (the batch's first example index in the data), else ``row i of the batch``.
    Only the failure path pays for finding it."""
    if not is_batch(batch):
        raise TypeError(_msg(func, arg, "a Tensor or a tuple/list/dict of Tensors",
                             type(batch).__name__))
    leaves = batch_leaves(batch)
    if any(t.ndim == 0 for t in leaves):
        raise ValueError(_msg(func, arg, "tensors with a leading batch dim", "a 0-d tensor"))
    sizes = {t.shape[0] for t in leaves}
    if len(sizes) != 1:
        fix = ("A list of Tensors is ONE batch (x, y, ...); pass shards of bare tensors as a "
               "list of 1-tuples, [(x1,), (x2,)]." if isinstance(batch, list) else "")
        raise ValueError(_msg(func, arg, "one leading batch size shared by all tensors",
                              f"sizes {sorted(sizes)}", fix))
    (size,) = sizes
    if size == 0:
        raise ValueError(_msg(func, arg, "a non-empty batch", "B = 0"))
    if any(t.is_meta for t in leaves):
        raise TypeError(_msg(func, arg, "tensors with data", "a meta tensor",
                             "Materialise the examples on a real device first."))
    for t in leaves:
        if t.is_floating_point() and not all_finite(t):
            i = _first_bad_row(t)
            where = f"row {i} of the batch" if first is None else f"example {first + i}"
            raise ValueError(_msg(func, arg, "finite values", f"NaN or inf in {where}"))
    return size


def batch_slice(batch, start: int, stop: int):
    """Rows ``start:stop`` of every leaf, keeping the container type."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return _rebuilt(batch, [v[start:stop] for v in batch])


def batch_cat(batches: list):
    """Concatenate Batches of one layout along their leading (example) dim."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {k: torch.cat([b[k] for b in batches]) for k in first}
    return _rebuilt(first, [torch.cat([b[i] for b in batches]) for i in range(len(first))])


def _rebuilt(batch, leaves: list):
    """``leaves`` in ``batch``'s sequence type: a NamedTuple takes its fields positionally."""
    make = getattr(type(batch), "_make", None)
    return make(leaves) if make is not None else type(batch)(leaves)


def regroup(batches: Iterable, rows: int | None, func: str = "regroup") -> Iterable:
    """Yield consecutive batches merged until each has ``>= rows`` examples (None: as given).

    Only consecutive batches of one layout and trailing shapes are merged (per-batch padding
    gives groups of their own); a ValueError naming ``func(batch_rows=...)`` is left for batches
    that still cannot be concatenated.
    """
    if rows is None:
        yield from batches
        return

    def merged(buf):
        try:
            return batch_cat(buf)
        except (RuntimeError, TypeError, KeyError, IndexError) as err:
            raise ValueError(_msg(func, "batch_rows", "batches that concatenate along the first "
                                  "dim (same layout and trailing shapes)", f"{err}",
                                  "Pass batch_rows=None or pad batches to one shape.")) from err

    buf, n, layout = [], 0, None
    for b in batches:
        # batches of another layout or trailing shapes (dynamic padding) start a group of their
        # own instead of failing to concatenate (review RU2 M3); one-shape data groups as before
        key = _layout(b)
        if buf and key != layout:
            yield merged(buf)
            buf, n = [], 0
        buf.append(b)
        layout = key
        n += batch_leaves(b)[0].shape[0]
        if n >= rows:
            yield merged(buf)
            buf, n = [], 0
    if buf:
        yield merged(buf)


def _layout(batch) -> tuple:
    """A batch's container kind, keys and per-leaf ``(trailing shape, dtype)``."""
    keys = tuple(batch) if isinstance(batch, Mapping) else None
    return type(batch), keys, tuple((t.shape[1:], t.dtype) if isinstance(t, Tensor) else None
                                    for t in batch_leaves(batch))


class _Regrouped:
    """A re-iterable view of ``data`` whose consecutive batches are merged (see :func:`regroup`)."""

    def __init__(self, func: str, arg: str, data, rows: int):
        self.func, self.arg, self.data, self.rows = func, arg, data, rows

    def __iter__(self):
        return iter(regroup(iter_batches(self.func, self.arg, self.data), self.rows, self.func))


def _refuse_store(func: str, arg: str, data) -> None:
    """Raise where a feature store reaches a call that reads examples: a store is a
    NamedTuple, and read as a tuple of batches it would yield its path as a "batch"."""
    if type(data).__module__ == "dattri_fn.store":
        raise TypeError(_msg(func, arg, "examples: a Batch or a re-iterable of Batches (this "
                             "call reads the data itself; a store serves a method's train "
                             "features)", type(data).__name__))


def refuse_ambiguous_list(func: str, arg: str, data) -> None:
    """Refuse a list of >= 2 tensors of one shape and dtype as a data argument: it reads as one
    batch ``(x, y, ...)`` and as shards of bare inputs alike, and either guess scores wrong rows
    silently when it is the other. A tuple is one batch, a list of tuples a list of batches."""
    if (isinstance(data, list) and len(data) >= 2 and all(isinstance(v, Tensor) for v in data)
            and len({(tuple(v.shape), v.dtype) for v in data}) == 1):
        raise ValueError(_msg(
            func, arg, "a tuple (x, y, ...) for ONE batch, or a list of batches [(x1,), (x2,)] "
            "for shards of bare inputs", f"a list of {len(data)} tensors of one shape "
            f"{list(data[0].shape)}, which reads either way", "Pass tuple(...) for one batch, "
            "or wrap each shard in a 1-tuple (each example is then (x,))."))


def count_rows(func: str, arg: str, data, *, check: bool = True,
               ordered: bool = True) -> int | None:
    """Examples in a Batch, a list/tuple of Batches or a regrouped view of one; None for other
    iterables (a DataLoader's length is not its row count). ``check=False`` reads leading sizes
    only, for a caller that validates every batch as it goes (None if one is not a batch).
    ``ordered``: the rows reach the output in order (see :func:`check_order`)."""
    if isinstance(data, _Regrouped):
        data = data.data
    if ordered:
        check_order(func, arg, data)
    _refuse_store(func, arg, data)
    refuse_ambiguous_list(func, arg, data)
    if is_batch(data):
        data = [data]
    if not isinstance(data, (list, tuple)):
        return None
    if check:
        n = 0
        for b in data:
            n += batch_size(func, arg, b, first=n)
        return n
    n = 0
    for b in data:
        leaves = batch_leaves(b) if is_batch(b) else []
        if not leaves or leaves[0].ndim == 0:
            return None
        n += leaves[0].shape[0]
    return n


def regrouped(func: str, arg: str, data, rows: int | None):
    """Return ``data`` (None) or a re-iterable of its batches merged to ``>= rows`` examples."""
    return data if rows is None else _Regrouped(func, arg, data, rows)


def batch_to(batch, device):
    """Move every leaf to ``device`` (a no-op for tensors already there)."""
    if isinstance(device, torch.device) and (
            (type(batch) is Tensor and batch.device == device)
            or (type(batch) is tuple and all(type(t) is Tensor and t.device == device
                                             for t in batch))):
        # what ``to`` gives back (the leaves themselves; a tuple cannot be changed in place),
        # without a dispatch per leaf
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) for k, v in batch.items()}
    return _rebuilt(batch, [v.to(device) for v in batch])


class _Passes:
    """A re-iterable whose every complete pass must yield the rows of its first one.

    :func:`peek` reads the first batch from an iterator that the next pass continues, so a
    look at the first batch loses nothing even when the data can be read only once.
    """

    def __init__(self, func: str, arg: str, data: Iterable):
        self.func, self.arg, self.data, self.rows = func, arg, data, None
        self._pending = None  # (iterator, first batch) left by peek

    def peek(self):
        if self._pending is None:
            it = iter(self.data)
            self._pending = (it, next(it, None))
        return self._pending[1]

    def _source(self):
        if self._pending is None:
            yield from self.data
            return
        (it, first), self._pending = self._pending, None
        if first is not None:
            yield first
            yield from it

    def __iter__(self):
        n = 0
        for batch in self._source():
            leaves = batch_leaves(batch) if is_batch(batch) else []
            n += leaves[0].shape[0] if leaves and leaves[0].ndim else 0
            yield batch
        if self.rows is None:
            self.rows = n
        elif n != self.rows:
            raise ValueError(_msg(self.func, self.arg, f"the same {self.rows} rows on every pass "
                                  "over the data", f"{n} rows on a later pass (an iterable that "
                                  "can be read only once, e.g. a DataLoader over a generator)",
                                  "Materialise it: list(loader)."))


def peek(batches: Iterable):
    """The first batch of ``batches`` (from :func:`iter_batches`) or None, losing nothing."""
    return batches.peek() if isinstance(batches, _Passes) else next(iter(batches), None)


def iter_batches(func: str, arg: str, data, *, ordered: bool = True,
                 once: bool = False) -> Iterable:
    """Return a re-iterable of batches: ``[data]`` for a single Batch, ``data`` for a list/DataLoader.

    Generators and iterators are refused, since operators re-read their data on every call;
    a re-iterable that is not a list or tuple (a DataLoader) has the rows of each complete pass
    counted, and a pass that differs from the first raises, naming ``arg``. ``ordered``: the
    rows reach the output in order, so a shuffling or row-dropping DataLoader is refused
    (:func:`check_order`); False for a sum over the rows (a curvature), where order is free.
    ``once``: the caller reads the data in one pass (a top-k scan), so a one-shot iterator
    is returned as it is; ``iter(loader)`` is order-checked through the sampler it keeps, but a
    generator's order cannot be read and is taken as given.
    """
    refuse_ambiguous_list(func, arg, data)
    if is_batch(data):
        return [data]
    _refuse_store(func, arg, data)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(_msg(func, arg, "a Batch or a re-iterable of Batches", type(data).__name__))
    if iter(data) is data:
        if once:
            if ordered:
                check_order(func, arg, data)
            return data
        raise TypeError(_msg(func, arg, "a re-iterable of Batches (list, DataLoader)",
                             "a one-shot iterator", ONE_SHOT_FIX))
    if ordered:
        check_order(func, arg, data)
    if isinstance(data, (list, tuple, _Passes)):
        return data
    return _Passes(func, arg, data)


def check_rows_like(func: str, V: Tensor, dtype: torch.dtype | None, device: torch.device) -> None:
    """Raise unless the rows ``V`` have the operator's dtype (None: any) and device (no silent
    promotion)."""
    if dtype is not None and V.dtype != dtype:
        raise TypeError(f"{func}(V=...): expected dtype {dtype} (the operator's), got {V.dtype}. "
                        f"Cast V with .to({dtype}).")
    if V.device != device:
        raise ValueError(f"{func}(V=...): expected device {device} (the operator's), "
                         f"got {V.device}. Move V with .to('{device}').")
