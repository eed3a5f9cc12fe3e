"""Whether a DataLoader gives its rows in the dataset's order (review RU4 H1)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

try:  # private, but its sampler attributes are what iter(loader) keeps of the loader
    from torch.utils.data.dataloader import _BaseDataLoaderIter
except ImportError:  # pragma: no cover
    _BaseDataLoaderIter = ()


def _msg(func: str, arg: str, expected: str, got: str, fix: str = "") -> str:
    text = f"{func}({arg}=...): expected {expected}, got {got}."
    return f"{text} {fix}" if fix else text


ONE_SHOT_FIX = ("Wrap it in list(...), or, for data larger than memory, pass an object whose "
                "__iter__ builds the batches afresh on every call (each pass streams).")
_ORDER_FIX = ("Pass shuffle=False (no sampler), a list of batches in the order the rows should "
              "have, or, for data larger than memory, an object whose __iter__ builds the batches "
              "in that order afresh on every call.")
_SHARD_FIX = ("To shard rows across processes, give each its own rows with "
              "dattri_fn.distributed.shard_data(data) (or shard_range(n)) and place its output "
              "with dattri_fn.distributed.row_offset(n_local).")
# ``why=`` of a call site whose seeded draws land on rows by position (a shuffled loader there
# gives a different answer on every call with the same seed)
SEEDED_ORDER = ("the seeded {what} draws fall on rows by position, so seed= gives the same {of} "
                "on every call only with the rows in a fixed order")
# a list/tuple sampler is compared index by index: a longer one (a user's own order) is refused
_LIST_MAX = 100_000


def _sequential(sampler, kind) -> bool:
    # a subclass that keeps the parent's __iter__ keeps its order
    return isinstance(sampler, kind) and type(sampler).__iter__ is kind.__iter__


def _in_order(sampler, dataset) -> bool:
    """``sampler`` yields ``0, 1, ..., n-1`` for the ``n`` rows of ``dataset``: SequentialSampler,
    or that range as a range, a short list/tuple or an integer Tensor."""
    if _sequential(sampler, SequentialSampler):
        return True
    try:
        n = len(dataset)
    except TypeError:
        return False
    if isinstance(sampler, range):
        return sampler == range(n)
    if isinstance(sampler, (list, tuple)):
        return len(sampler) == n <= _LIST_MAX and all(
            type(i) is int and i == j for j, i in enumerate(sampler))
    if isinstance(sampler, Tensor):
        return (sampler.ndim == 1 and not sampler.is_floating_point() and len(sampler) == n
                and bool((sampler.cpu() == torch.arange(n)).all()))
    return False


def _parts(data):
    """``(dataset, batch_sampler or None, sampler)`` of a DataLoader or of its iterator; None
    for anything else or an IterableDataset (its order is its own)."""
    if isinstance(data, DataLoader):
        dataset, outer = data.dataset, data.batch_sampler
        inner = data.sampler if outer is None else getattr(outer, "sampler", None)
    elif _BaseDataLoaderIter and isinstance(data, _BaseDataLoaderIter):
        dataset, index = data._dataset, data._index_sampler
        outer = index if data._auto_collation else None
        inner = index if outer is None else getattr(outer, "sampler", None)
    else:
        return None
    return None if isinstance(dataset, IterableDataset) else (dataset, outer, inner)


def check_order(func: str, arg: str, data, *, why: str | None = None) -> None:
    """Refuse a DataLoader (or ``iter(loader)``) whose batches do not arrive in the dataset's
    order, that drops rows (``drop_last=True`` on a dataset that is not a multiple of the batch
    size), or, for an iterator, that has already given batches: the rows of a score, its top-k
    indices and self-scores follow the order the batches arrive in, silently.

    Reads the loader's sampler objects only (no index is drawn, no batch is built); an
    IterableDataset's order is its own and is accepted. ``why``: what follows the row order at
    this call site, for the message (default: score rows, top-k indices and self-scores)."""
    parts = _parts(data)
    if parts is None:
        return
    dataset, outer, inner = parts
    fix = _ORDER_FIX
    if outer is not None and not _sequential(outer, BatchSampler):
        what = f"whose batch_sampler {type(outer).__name__} has an order this check cannot read"
    elif not _in_order(inner, dataset):
        name = type(inner).__name__
        if name == "DistributedSampler":
            what, fix = "whose sampler DistributedSampler gives one process a part of the " \
                        "rows (padded with repeats where they do not divide evenly)", _SHARD_FIX
        elif name == "RandomSampler":
            what = "with shuffle=True (its RandomSampler draws a new order on every pass)"
        elif name in ("SubsetRandomSampler", "WeightedRandomSampler"):
            what = f"whose sampler {name} does not give the dataset's order"
        else:
            what = f"whose sampler {name} has an order this check cannot read"
    elif outer is not None and outer.drop_last and len(inner) % outer.batch_size:
        m, cut = len(inner), len(inner) % outer.batch_size
        raise ValueError(_msg(func, arg, "every example of the dataset",
                              f"{m - cut} examples of the {m} (drop_last=True drops the last "
                              f"{cut}, which are then never scored)", "Pass drop_last=False."))
    elif getattr(data, "_num_yielded", 0):
        raise ValueError(_msg(func, arg, "every example of the dataset", "an iterator of a "
                              f"DataLoader that has already given {data._num_yielded} "
                              "batch(es), which are then never scored",
                              "Pass a fresh iter(loader), or the loader itself."))
    else:
        return
    rows = "training rows" if arg == "train" else "rows"
    why = why or "score rows, top-k indices and self-scores follow the order the batches arrive in"
    expected = f"the {rows} in a fixed order, the dataset's ({why})"
    kind = "an iterator of a DataLoader" if not isinstance(data, DataLoader) else "a DataLoader"
    raise ValueError(_msg(func, arg, expected, f"{kind} {what}", fix))
