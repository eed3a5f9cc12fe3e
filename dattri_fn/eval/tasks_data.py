"""The bundled tasks' data (see :mod:`dattri_fn.eval.tasks`): sklearn's digits, the ``text-lm``
corpus, seeded splits and label flips, and the SHA-256 seed derivation they draw from."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect

import torch
from torch import Tensor

from .._checks import _msg

NOISE_FRACTION = 0.1


# Fixed so the corpus (and its SHA-256) only changes with the Python version's docstrings.
CORPUS_MODULES = ("collections", "contextlib", "copy", "dataclasses", "difflib", "functools",
                  "heapq", "json", "statistics", "string", "textwrap")


# Printable ASCII plus newline: a vocabulary that does not depend on the corpus.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))


def derive_seed(*parts) -> int:
    """Return a 63-bit seed mixed from ``parts`` by SHA-256 (stable across runs/platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# ----------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits  # ships its data: no download

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)


def text_corpus() -> str:
    """Return the ``text-lm`` corpus: docstrings of :data:`CORPUS_MODULES`, mapped to ``VOCAB``.

    Per module: its docstring, then those of its public classes and functions defined in it,
    sorted by name, joined by blank lines; characters outside printable ASCII become ``"?"``
    (tabs become spaces). Its SHA-256 is recorded as ``Task.meta["corpus_sha256"]``.
    """
    docs = []
    for name in CORPUS_MODULES:
        mod = importlib.import_module(name)
        docs.append(mod.__doc__ or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if (not attr.startswith("_") and getattr(obj, "__module__", None) == name
                    and (inspect.isclass(obj) or inspect.isfunction(obj))
                    and isinstance(obj.__doc__, str)):
                docs.append(inspect.cleandoc(obj.__doc__))
    text = "\n\n".join(d.strip() for d in docs if d.strip()).replace("\t", " ")
    allowed = set(VOCAB)
    return "".join(c if c in allowed else "?" for c in text)


def _split(n_total: int, n_train: int, n_test: int, seed: int, func: str):
    if n_train + n_test > n_total:
        raise ValueError(_msg(func, "n_train", f"n_train + n_test <= {n_total}",
                              f"{n_train} + {n_test}"))
    perm = torch.randperm(n_total, generator=_generator("split", seed))
    return perm[:n_train], perm[n_train:n_train + n_test]


def _flip_labels(y: Tensor, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    n = y.shape[0]
    g = _generator("noisy", seed)
    idx = torch.randperm(n, generator=g)[: round(NOISE_FRACTION * n)]
    # Adding 1..C-1 mod C guarantees the new label differs from the old one.
    shift = torch.randint(1, classes, (idx.numel(),), generator=g)
    y = y.clone()
    y[idx] = (y[idx] + shift) % classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[idx] = True
    return y, flipped
