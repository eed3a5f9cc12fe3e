"""Whether a DataLoader gives its rows in the dataset's order (review RU4 H1)."""

from __future__ import annotations

from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler


def _msg(func: str, arg: str, expected: str, got: str, fix: str) -> str:
    return f"{func}({arg}=...): expected {expected}, got {got}. {fix}"


ONE_SHOT_FIX = ("Wrap it in list(...), or, for data larger than memory, pass an object whose "
                "__iter__ builds the batches afresh on every call (each pass streams).")


def _sequential(sampler, kind) -> bool:
    # a subclass that keeps the parent's __iter__ keeps its order
    return isinstance(sampler, kind) and type(sampler).__iter__ is kind.__iter__


def check_order(func: str, arg: str, data) -> None:
    """Refuse a DataLoader whose batches do not arrive in the dataset's order, or that drops rows
    (``drop_last=True`` on a dataset that is not a multiple of the batch size): the rows of a
    score, its top-k indices and self-scores follow the order the batches arrive in, silently.

    Reads the loader's sampler objects only (no index is drawn, no batch is built); an
    IterableDataset's order is its own and is accepted."""
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return
    outer = data.batch_sampler
    if outer is None or _sequential(outer, BatchSampler):
        inner = data.sampler if outer is None else outer.sampler
        if not _sequential(inner, SequentialSampler):
            name = type(inner).__name__
            what = ("with shuffle=True (its RandomSampler draws a new order on every pass)"
                    if name == "RandomSampler" else
                    f"whose sampler {name} does not give the dataset's order" if name in (
                        "SubsetRandomSampler", "WeightedRandomSampler", "DistributedSampler")
                    else f"whose sampler {name} has an order this check cannot read")
        elif outer is not None and outer.drop_last and len(inner) % outer.batch_size:
            n, cut = len(inner), len(inner) % outer.batch_size
            raise ValueError(_msg(func, arg, "every example of the dataset",
                                  f"{n - cut} examples of the {n} (drop_last=True drops the "
                                  f"last {cut}, which are then never scored)",
                                  "Pass drop_last=False."))
        else:
            return
    else:
        what = f"whose batch_sampler {type(outer).__name__} has an order this check cannot read"
    rows = "training rows" if arg == "train" else "rows"
    raise ValueError(_msg(func, arg, f"the {rows} in a fixed order, the dataset's (score rows, "
                          "top-k indices and self-scores follow the order the batches arrive in)",
                          f"a DataLoader {what}", "Pass shuffle=False (no sampler), or a list "
                          "of batches in the order the rows should have."))
