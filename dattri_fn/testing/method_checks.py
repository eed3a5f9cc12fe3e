"""Contract check of attribution methods on problems with known answers (``check_method``)."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_int, check_positive
from .assertions import _assert_close, _fail, _name
from .problems import Problem
from .references import exact_loo

__all__ = ["MethodCheck", "check_method"]


class MethodCheck(NamedTuple):
    """What :func:`check_method` verified: ``checked`` property names, ``skipped`` name -> why."""

    name: str
    checked: tuple[str, ...]
    skipped: dict[str, str]


_FITTED = "ridge_regression(...) or logistic_regression(fit=True, l2>0)"


def _loo_skip(problem: Problem, min_loo_corr) -> str | None:
    """Why the exact-LOO property cannot run on ``problem`` (None: it runs)."""
    if min_loo_corr is None:
        return "min_loo_corr=None"
    if not problem.convex:
        return f"{problem.name} is not convex (leave-one-out has no unique refit)"
    if not problem.fitted:
        return (f"{problem.name} is not fitted at its minimiser (exact_loo refits from the "
                f"minimiser)")
    return None


# -- methods --------------------------------------------------------------------------------------
def _split(data, size: int) -> list:
    x, y = data
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def _take(data, idx) -> tuple:
    return tuple(t[idx] for t in data)


def _check_stores(name: str, method, params, state, listed, test, S: Tensor, diag: Tensor,
                  rtol: float, store) -> None:
    """The ``store`` property of :func:`check_method`."""
    import os
    import tempfile

    from ..store import open_store, record_store

    check = "check_method"
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"check_method(store=...): expected None or a directory path, got "
                        f"{type(store).__name__}.")
    os.makedirs(store, exist_ok=True)
    path = tempfile.mkdtemp(prefix="check-method-", dir=store)
    config = {"check_method": name}
    labels = ("train", "test")
    rec = record_store(path, listed, params=params, config=config)
    _assert_close(check, name, "score(train=record_store(...)) == score(train)",
                  method.score(params, state, rec, test), S, rtol, labels)
    _assert_close(check, name, "self_score(record_store(...)) == self_score(train)",
                  method.self_score(params, state, rec), diag, rtol, ("train",))
    opened = open_store(path, params=params, config=config)
    _assert_close(check, name, "score(train=open_store(...)) == score(train)",
                  method.score(params, state, opened, test), S, rtol, labels)
    _assert_close(check, name, "self_score(open_store(...)) == self_score(train)",
                  method.self_score(params, state, opened), diag, rtol, ("train",))


def check_method(method, problem: Problem, *, params=None, n_test: int = 4,
                 batch_size: int = 3, rtol: float = 1e-8, min_loo_corr: float | None = 0.85,
                 top_k: int = 3, loo: Tensor | None = None, store=None,
                 name: str | None = None) -> MethodCheck:
    """Check an attribution :class:`~dattri_fn.attribute.Method` on a :class:`Problem`.

    Properties, with ``train = problem.data`` and ``test`` its first ``n_test`` examples:

    - ``score`` is ``[n_train, n_test]`` and finite; ``self_score`` equals the diagonal of
      ``score(train, train)``;
    - scores do not depend on how data is given: one batch, a list of batches of
      ``batch_size``, or a ``DataLoader`` over a ``TensorDataset`` (``rtol`` relative to the
      largest score);
    - ``score(..., top_k=k)`` equals ``torch.topk`` of the full matrix over the training axis
      (values; the indices point at those values);
    - sign convention: a training set with example 0 duplicated scores both copies equally on
      test example 0 (a copy of them), and positively (a proponent);
    - on a convex problem fitted at its minimiser, the Pearson correlation of the
      ``[n_train, n_train]`` scores with :func:`exact_loo` is at least ``min_loo_corr``
      (None skips it). Measured by ``python -m benchmarks.testing_kit_loo --seeds 25``: the
      exact influence reaches >= 0.918 at the smallest sizes ``strategies.problems(fitted=True)``
      draws; Grad-Dot and influence multiplying by ``H`` instead of ``H^-1`` reach 0.35-0.80
      with ``cond=10`` (caught), but up to 0.98 with ``cond=1``, where ``H`` is close to a
      multiple of ``I`` and no correlation can tell them apart;
    - with ``store`` (a directory), feature stores (:mod:`dattri_fn.store`): ``score`` and
      ``self_score`` given ``record_store(...)`` of the batched training set, then given the
      opened store (no training data), equal them from the data.

    Args:
        method: ``Method(prepare, score, self_score, name)``.
        params: what ``prepare``/``score`` take as params (default ``problem.params``; e.g.
            a list of checkpoints for an ensemble).
        loo: ``exact_loo(problem)`` if already computed (it refits ``n`` times).
        store: a directory for the store property (a fresh sub-directory per call), or None
            to skip it (for a method that does not read its train side from a store).

    Returns:
        :class:`MethodCheck`: the properties checked and those skipped with the reason. A
        skipped exact-LOO property (a problem not convex or not fitted) also warns once, naming
        the reason and the problems it runs on, unless ``min_loo_corr=None`` asked for it.

    Raises:
        AssertionError: naming the violated property and the worst entry.
    """
    from torch.utils.data import DataLoader, TensorDataset

    check = "check_method"
    if not all(callable(getattr(method, f, None)) for f in ("prepare", "score", "self_score")):
        raise TypeError(f"check_method(method=...): expected a Method (prepare, score, "
                        f"self_score), got {type(method).__name__}.")
    if not isinstance(problem, Problem):
        raise TypeError(f"check_method(problem=...): expected a dattri_fn.testing Problem (e.g. "
                        f"ridge_regression(...)), got {type(problem).__name__}.")
    n_test, batch_size = check_int(check, "n_test", n_test), check_int(check, "batch_size", batch_size)
    top_k, rtol = check_int(check, "top_k", top_k), check_positive(check, "rtol", rtol)
    if min_loo_corr is not None and not (isinstance(min_loo_corr, (int, float))
                                         and -1 <= min_loo_corr <= 1):
        raise ValueError(f"check_method(min_loo_corr=...): expected None or a correlation in "
                         f"[-1, 1], got {min_loo_corr!r}.")
    name = name or _name(method, "method")
    params = problem.params if params is None else params
    train = problem.data
    n = problem.n
    m = min(n_test, n)
    test = _take(train, slice(0, m))
    state = method.prepare(params, train)
    S = method.score(params, state, train, test)
    if not isinstance(S, Tensor) or tuple(S.shape) != (n, m):
        got = list(S.shape) if isinstance(S, Tensor) else type(S).__name__
        _fail(check, name, "scores are [n_train, n_test]", f"got {got} for [{n}, {m}]")
    if not bool(torch.isfinite(S).all()):
        i, j = (int(t) for t in (~torch.isfinite(S)).nonzero()[0])
        _fail(check, name, "finite scores", f"non-finite at train {i}, test {j}")
    labels = ("train", "test")
    full = method.score(params, state, train, train)
    _assert_close(check, name, "score(train, test) == score(train, train)[:, :n_test]",
                  S, full[:, :m], rtol, labels)
    diag = method.self_score(params, state, train)
    _assert_close(check, name, "self_score == diag(score(train, train))", diag,
                  full.diagonal(), rtol, ("train",))
    listed = _split(train, batch_size)
    S_list = method.score(params, method.prepare(params, listed), listed, _split(test, batch_size))
    _assert_close(check, name, f"batching invariance (lists of batches of {batch_size})",
                  S_list, S, rtol, labels)
    loader = lambda d: DataLoader(TensorDataset(*d), batch_size=batch_size)
    S_loader = method.score(params, method.prepare(params, loader(train)), loader(train),
                            loader(test))
    _assert_close(check, name, f"DataLoader invariance (batch_size {batch_size})", S_loader, S,
                  rtol, labels)
    k = min(top_k, n)
    tk = method.score(params, state, train, test, top_k=k)
    want = torch.topk(S, k, dim=0)
    values = getattr(tk, "values", None)
    indices = getattr(tk, "indices", None)
    if values is None or indices is None:
        _fail(check, name, "top_k returns (values, indices)", f"got {type(tk).__name__}")
    _assert_close(check, name, f"top_k values == torch.topk(scores, {k}, dim=0)", values,
                  want.values, rtol, ("rank", "test"))
    _assert_close(check, name, "top_k indices point at their values",
                  S.gather(0, indices.to(S.device)), values, rtol, ("rank", "test"))
    dup = tuple(torch.cat([t, t[:1]]) for t in train)
    S_dup = method.score(params, method.prepare(params, dup), dup, _take(train, slice(0, 1)))
    first, copy = float(S_dup[0, 0]), float(S_dup[-1, 0])
    scale = max(abs(first), abs(copy), 1e-300)
    if abs(first - copy) > rtol * scale:
        _fail(check, name, "a duplicated training point scores like its original",
              f"train 0 scores {first:.6g}, its copy {copy:.6g} on test 0")
    if not first > 0:
        _fail(check, name, "sign convention: a training point identical to the test point is "
              "a proponent (positive score)", f"score {first:.6g} on its own copy")
    checked = ["shape", "self_score", "batching", "DataLoader", "top_k", "sign"]
    skipped = {}
    if store is not None:
        _check_stores(name, method, params, state, listed, test, S, diag, rtol, store)
        checked.append("store")
    else:
        skipped["store"] = "store=None"
    why = _loo_skip(problem, min_loo_corr)
    if why is not None:
        skipped["loo"] = why
        if min_loo_corr is not None:
            warnings.warn(f"check_method(problem=...): skipped the exact leave-one-out property of "
                          f"{name}, the "
                          f"one that catches a wrong inverse: {why}. It runs on {_FITTED}; pass "
                          f"min_loo_corr=None to skip it on purpose.", UserWarning, stacklevel=2)
    else:
        loo = exact_loo(problem) if loo is None else loo
        pair = torch.stack([full.detach().to(torch.float64).flatten(), loo.flatten().to(full.device)])
        corr = float(torch.corrcoef(pair)[0, 1])
        if not corr >= min_loo_corr:
            col = torch.stack([torch.corrcoef(torch.stack([full[:, j].double(), loo[:, j]]))[0, 1]
                               for j in range(n)])
            j = int(torch.nan_to_num(col, nan=-2.0).argmin())
            _fail(check, name, f"agreement with exact leave-one-out on {problem.name}: Pearson "
                  f"correlation >= {min_loo_corr}",
                  f"correlation {corr:.4f}; worst test column {j}: {float(col[j]):.4f}")
        checked.append("loo")
    return MethodCheck(name, tuple(checked), skipped)
