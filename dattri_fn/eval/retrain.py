"""Retraining ground truth for attribution metrics: subset retraining (LDS) and leave-one-out.

Score convention of the library: ``scores [n_train, n_test]``, positive = up-weighting the
training example LOWERS the test loss. Targets recorded here are ``task.target`` (HIGHER =
BETTER for the test point), so :func:`dattri_fn.eval.metrics.lds` and
:func:`dattri_fn.eval.metrics.loo_correlation` give +1 to a perfect method.

Cache. Every trained model is one *unit* (a subset or a removed index, and a seed index) whose
``[n_test]`` targets are written atomically (:func:`dattri_fn.io.save`) to its own file under
``cache_dir/<task>-<kind>-<key>/``. ``key`` hashes everything that changes a unit's answer: the
task's name, data (content hash: sizes, split seed, flipped labels), model/trainer/target
functions and ``hparams``, the torch version, the engine version, ``seed`` and (for subsets)
``alpha``. ``m`` and ``r`` are not in the key: subset ``k`` and seed ``s`` are drawn from
``(seed, k)`` and ``(seed, s)`` alone, so a larger ``m`` or ``r`` reuses every unit already
trained. A killed run resumes where it stopped: only missing unit files are trained.

Parallelism: ``workers > 1`` trains units in a spawn ``ProcessPoolExecutor``, each worker with
``torch.set_num_threads(1)``; workers write their unit files themselves, so an interrupt loses at
most the units in flight. Measured once on the 2-core dev box while shared (load average ~4-5),
digits-lr (n_train=1000, 25 ms a unit), wall time for m units, r=1:

    m=300: 1 process x 1 thread 12.2 s / 18.2 s; 2 processes x 1 thread 31.5 s / 18.0 s;
           1 process x 2 threads 390 s / 117 s (oversubscribed OpenMP threads spin)
    m=100: 1 x 1 thread 4.0 s; 2 processes 9.2 s; 1 x 2 threads 40.2 s
    digits-mlp m=24 (0.2 s a unit): 1 x 1 thread 5.5 s; 2 processes 10.0 s

So: never give one process 2 threads for these tiny models; a pool pays its spawn + import cost
(~2-3 s a worker) only for many heavier units on idle cores. Default ``workers=1``; results
agree across the two modes to float32 round-off (thread counts change reduction orders).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .. import io
from .._checks import _msg, check_int, check_positive
from .tasks import Task, derive_seed, train_model

ENGINE_VERSION = 1
# task.name names a cache directory: a plain name can neither leave cache_dir ("../x", "/x",
# "a/b") nor hide in it (".x").
_TASK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class GroundTruth(NamedTuple):
    """Subset-retraining ground truth for :func:`dattri_fn.eval.metrics.lds`.

    ``subsets [m, n_train]`` bool; ``targets [m, n_test]`` = ``task.target`` of models trained
    on each subset, averaged over ``r`` seeds.
    """

    subsets: Tensor
    targets: Tensor


class LOOGroundTruth(NamedTuple):
    """Leave-one-out ground truth for :func:`dattri_fn.eval.metrics.loo_correlation`.

    ``indices [n]`` int64 removed training examples; ``diffs [n, n_test]`` =
    ``target(full) - target(without i)`` (seed-averaged), positive when ``i`` helped.
    """

    indices: Tensor
    diffs: Tensor


# ------------------------------------------------------------------------------ cache keys
def _tensor_digest(h, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{list(t.shape)}".encode())
    h.update(t.numpy().tobytes())


def _callable_id(f) -> str:
    keywords = getattr(f, "keywords", None)
    if keywords is not None:  # a functools.partial: its function and its bound settings
        inner = {k: _callable_id(v) if callable(v) else v for k, v in sorted(keywords.items())}
        return f"{_callable_id(f.func)}{inner!r}"
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(type(f)))}"


def cache_key(task: Task, *, kind: str, seed: int, alpha: float | None = None) -> str:
    """Return the SHA-256 hex key of everything that changes one unit of ``kind``'s answer.

    Hashes ENGINE_VERSION, ``torch.__version__``, ``task.name``, the content of the four data
    tensors and ``flipped``, ``task.hparams``, the identities of ``make_model``/``train``/
    ``target``/``loss_fn`` (partials with their keywords), ``kind``, ``seed`` and ``alpha``.
    """
    h = hashlib.sha256()
    head = {"engine": ENGINE_VERSION, "torch": torch.__version__, "task": task.name,
            "kind": kind, "seed": seed, "alpha": alpha,
            "hparams": json.dumps(task.hparams, sort_keys=True, default=repr),
            "fns": [_callable_id(f) for f in
                    (task.make_model, task.train, task.target, task.loss_fn)]}
    h.update(json.dumps(head, sort_keys=True).encode())
    for t in (task.x_train, task.y_train, task.x_test, task.y_test):
        _tensor_digest(h, t)
    if task.flipped is not None:
        _tensor_digest(h, task.flipped)
    return h.hexdigest()


def _cache_root(func: str, cache_dir) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("DATTRI_FN_CACHE", os.path.join(".cache", "dattri_fn"))
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(_msg(func, "cache_dir", "a str or os.PathLike or None",
                             type(cache_dir).__name__))
    return Path(cache_dir)


# ----------------------------------------------------------------------------------- units
def draw_subsets(n_train: int, m: int, *, alpha: float = 0.5, seed: int = 0) -> Tensor:
    """Return ``m`` random subsets of ``round(alpha * n_train)`` examples each.  # [m, n_train] bool

    Row ``k`` depends on ``(n_train, alpha, seed, k)`` only, so a larger ``m`` extends it.
    """
    check_int("draw_subsets", "n_train", n_train)
    check_int("draw_subsets", "m", m)
    check_positive("draw_subsets", "alpha", alpha)
    if alpha >= 1:
        raise ValueError(_msg("draw_subsets", "alpha", "a fraction in (0, 1)", repr(alpha)))
    size = max(1, round(alpha * n_train))
    out = torch.zeros(m, n_train, dtype=torch.bool)
    for k in range(m):
        g = torch.Generator().manual_seed(derive_seed("subset", seed, k))
        out[k, torch.randperm(n_train, generator=g)[:size]] = True
    return out


def _model_seed(seed: int, s: int) -> int:
    # Shared by every subset (common random numbers): init noise cancels in comparisons.
    return derive_seed("model", seed, s) % (2**31)


def _train_unit(task: Task, keep: Tensor | None, model_seed: int, path: str,
                weighted: bool = False) -> float:
    start = time.perf_counter()
    model = train_model(task, seed=model_seed, keep=keep, weighted=weighted)
    targets = task.target(model, task.x_test, task.y_test).detach().cpu()
    seconds = time.perf_counter() - start
    io.save({"targets": targets, "seconds": seconds}, path)
    return seconds


_WORKER_TASK: Task | None = None


def _init_worker(task: Task) -> None:
    global _WORKER_TASK
    torch.set_num_threads(1)
    _WORKER_TASK = task


def _worker_unit(keep: Tensor | None, model_seed: int, path: str, weighted: bool) -> float:
    return _train_unit(_WORKER_TASK, keep, model_seed, path, weighted)


class _Progress:
    """A single ``\\r``-rewritten status line on stderr, redrawn at most 5 times a second."""

    def __init__(self, label: str, total: int, cached: int, enabled: bool):
        self.label, self.total, self.done, self.cached = label, total, cached, cached
        self.enabled, self.start, self.last = enabled, time.perf_counter(), 0.0
        self.show(force=True)

    def step(self) -> None:
        self.done += 1
        self.show(force=self.done == self.total)

    def show(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        elapsed, trained = now - self.start, self.done - self.cached
        left = self.total - self.done
        eta = f", eta {elapsed / trained * left:.0f}s" if trained and left else ""
        sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} units "
                         f"({self.cached} cached) {elapsed:.1f}s{eta}   ")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self) -> None:
        """Redraw the last state and end the line (also when the run is interrupted)."""
        if self.done < self.total:
            self.show(force=True)
            if self.enabled:
                sys.stderr.write("\n")


def _run_units(task: Task, units: list[tuple[str, Tensor | None, int]], directory: Path, *,
               workers: int, progress: bool, on_unit: Callable[[str], None] | None,
               label: str, weighted: bool = False) -> dict[str, Tensor]:
    """Train every unit whose file is missing; return ``{name: targets [n_test]}`` for all."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.pt" for name, _, _ in units}
    missing = [u for u in units if not paths[u[0]].is_file()]
    bar = _Progress(label, len(units), len(units) - len(missing), progress)
    try:
        _train_missing(task, missing, paths, workers, bar, on_unit, weighted)
    finally:
        bar.close()
    return {name: io.load(paths[name])["targets"] for name, _, _ in units}


def _train_missing(task, missing, paths, workers, bar, on_unit, weighted=False) -> None:
    if workers == 1 or len(missing) <= 1:
        for name, keep, model_seed in missing:
            _train_unit(task, keep, model_seed, str(paths[name]), weighted)
            bar.step()
            if on_unit is not None:
                on_unit(name)
    elif missing:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(missing)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(task,)) as pool:
            pending = {pool.submit(_worker_unit, keep, s, str(paths[name]), weighted): name
                       for name, keep, s in missing}
            try:
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        fut.result()
                        name = pending.pop(fut)
                        bar.step()
                        if on_unit is not None:
                            on_unit(name)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise


def _check_common(func: str, task, r, seed, workers):
    if not isinstance(task, Task):
        raise TypeError(_msg(func, "task", "a dattri_fn.eval.tasks.Task", type(task).__name__,
                             "Build one with dattri_fn.eval.tasks.get_task(name)."))
    if not isinstance(task.name, str):
        raise TypeError(_msg(func, "task", "a str task.name", type(task.name).__name__))
    if not _TASK_NAME.fullmatch(task.name):
        raise ValueError(_msg(func, "task", "a task.name of letters, digits, '-', '_' and '.', "
                              "not starting with '.'", f"name {task.name!r}",
                              "It names the cache directory: rename the task, e.g. "
                              "dataclasses.replace(task, name='my-task')."))
    check_int(func, "r", r)
    check_int(func, "seed", seed, minimum=0)
    check_int(func, "workers", workers)


def lds_ground_truth(task: Task, m: int, r: int = 1, *, alpha: float = 0.5, seed: int = 0,
                     cache_dir: str | os.PathLike | None = None, workers: int = 1,
                     progress: bool = True, on_unit: Callable[[str], None] | None = None,
                     weighted: bool = False) -> GroundTruth:
    """Return targets of models retrained on ``m`` random ``alpha``-subsets, ``r`` seeds each.

    ``targets[k, j] = mean_s task.target(model(S_k, seed_s))[j]`` with ``S_k`` =
    ``draw_subsets(n_train, m, alpha=alpha, seed=seed)[k]``; seed ``s`` is shared by all
    subsets. # -> subsets [m, n_train] bool, targets [m, n_test]

    Args:
        task: the task (its data device is used for training; workers need it picklable, as
            every bundled task is).
        m: number of subsets.
        r: models (seeds) per subset.
        alpha: subset fraction in (0, 1).
        seed: draws subsets and model seeds.
        cache_dir: cache root (default ``$DATTRI_FN_CACHE`` or ``./.cache/dattri_fn``).
        workers: 1 = train in this process (its thread settings); > 1 = that many spawn
            processes with one thread each.
        progress: draw a progress line on stderr.
        on_unit: called with each unit's name after its file is written (in this process).
        weighted: the fixed-randomness protocol (MAGIC's): every model trains on all rows in
            the full run's data order with the examples outside ``S_k`` weighted 0
            (:func:`~dattri_fn.eval.tasks.train_model` ``weighted=True``; an ``"sgd"`` or
            ``"adam"`` task). Cached apart from the standard units.

    Returns:
        :class:`GroundTruth` ``(subsets, targets)``; ``targets`` on the CPU in the target's dtype.

    Raises:
        TypeError: ``task`` is not a :class:`~dattri_fn.eval.tasks.Task` (or its ``name`` not a
            str), or wrong kinds.
        ValueError: ``m``, ``r``, ``workers`` < 1, ``alpha`` outside (0, 1), or a
            ``task.name`` that is not a plain name (letters, digits, ``-_.``; no leading ``.``).
    """
    _check_common("lds_ground_truth", task, r, seed, workers)
    check_int("lds_ground_truth", "m", m)
    check_positive("lds_ground_truth", "alpha", alpha)
    if alpha >= 1:
        raise ValueError(_msg("lds_ground_truth", "alpha", "a fraction in (0, 1)", repr(alpha)))
    subsets = draw_subsets(task.n_train, m, alpha=alpha, seed=seed)
    if not isinstance(weighted, bool):
        raise TypeError(_msg("lds_ground_truth", "weighted", "a bool", type(weighted).__name__))
    if weighted and "weights" not in inspect.signature(task.train).parameters:
        raise ValueError(_msg("lds_ground_truth", "weighted", "a task whose trainer takes "
                              "weights (hparams optimizer 'sgd' or 'adam')",
                              f"optimizer {task.hparams.get('optimizer')!r}",
                              "Build the task with get_task(name, hparams=SGD_HPARAMS)."))
    kind = "lds-weighted" if weighted else "lds"
    key = cache_key(task, kind=kind, seed=seed, alpha=float(alpha))
    directory = _cache_root("lds_ground_truth", cache_dir) / f"{task.name}-{kind}-{key[:20]}"
    device = task.x_train.device
    units = [(f"subset{k:06d}-seed{s:04d}", subsets[k].to(device), _model_seed(seed, s))
             for k in range(m) for s in range(r)]
    got = _run_units(task, units, directory, workers=workers, progress=progress,
                     on_unit=on_unit, label=f"lds_ground_truth {task.name}", weighted=weighted)
    targets = torch.stack([got[name] for name, _, _ in units]).reshape(m, r, -1).mean(1)
    return GroundTruth(subsets, targets)


def loo_ground_truth(task: Task, indices: Sequence[int] | Tensor, r: int = 1, *,
                     seed: int = 0, cache_dir: str | os.PathLike | None = None,
                     workers: int = 1, progress: bool = True,
                     on_unit: Callable[[str], None] | None = None) -> LOOGroundTruth:
    """Return diffs[i, j] = mean_s target_j(full, s) - mean_s target_j(without indices[i], s).

    Positive when removing the example hurts the test point (it was a proponent), which is the
    sign :func:`dattri_fn.eval.metrics.loo_correlation` expects. Full and leave-one-out models share
    their seeds so init noise cancels; with a deterministic trainer (all bundled tasks) the
    differences are exact up to the optimiser's tolerance.  # -> indices [n], diffs [n, n_test]

    Args:
        task: the task.
        indices: training indices to remove, one at a time (distinct, in ``[0, n_train)``).
        r: seeds per model.
        seed: draws the model seeds.
        cache_dir, workers, progress, on_unit: as :func:`lds_ground_truth`.

    Returns:
        :class:`LOOGroundTruth` ``(indices, diffs)``.

    Raises:
        TypeError: wrong kinds.
        ValueError: empty, repeated or out-of-range ``indices``; ``r``/``workers`` < 1; a
            ``task.name`` that is not a plain name (as :func:`lds_ground_truth`).
    """
    func = "loo_ground_truth"
    _check_common(func, task, r, seed, workers)
    idx = torch.as_tensor(indices).reshape(-1)
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(_msg(func, "indices", "integer indices", str(idx.dtype)))
    idx = idx.to(torch.int64).cpu()
    if idx.numel() == 0 or idx.unique().numel() != idx.numel():
        raise ValueError(_msg(func, "indices", "distinct training indices",
                              f"{idx.numel()} values, {idx.unique().numel()} distinct"))
    if bool(((idx < 0) | (idx >= task.n_train)).any()):
        raise ValueError(_msg(func, "indices", f"values in [0, {task.n_train})",
                              f"min {int(idx.min())}, max {int(idx.max())}"))
    key = cache_key(task, kind="loo", seed=seed)
    directory = _cache_root("loo_ground_truth", cache_dir) / f"{task.name}-loo-{key[:20]}"
    device = task.x_train.device
    units = [(f"full-seed{s:04d}", None, _model_seed(seed, s)) for s in range(r)]
    for i in idx.tolist():
        keep = torch.ones(task.n_train, dtype=torch.bool, device=device)
        keep[i] = False
        units += [(f"loo{i:06d}-seed{s:04d}", keep, _model_seed(seed, s)) for s in range(r)]
    got = _run_units(task, units, directory, workers=workers, progress=progress,
                     on_unit=on_unit, label=f"loo_ground_truth {task.name}")
    full = torch.stack([got[f"full-seed{s:04d}"] for s in range(r)]).mean(0)
    loo = torch.stack([torch.stack([got[f"loo{i:06d}-seed{s:04d}"] for s in range(r)]).mean(0)
                       for i in idx.tolist()])
    return LOOGroundTruth(idx, full - loo)


def make_predict_fn(task: Task, test_index: int, *, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """Return ``keep_mask [n_train] bool -> argmax prediction on test point test_index``.

    For :func:`dattri_fn.eval.metrics.brittleness`: each call retrains ``task.make_model(seed)``
    on the kept examples (no cache).
    """
    check_int("make_predict_fn", "test_index", test_index, minimum=0)
    if test_index >= task.n_test:
        raise ValueError(_msg("make_predict_fn", "test_index", f"an index < {task.n_test}",
                              repr(test_index)))
    x = task.x_test[test_index:test_index + 1]

    def predict(keep_mask: Tensor) -> Tensor:
        model = train_model(task, seed=seed, keep=keep_mask.to(task.x_train.device))
        with torch.no_grad():
            return model(x).argmax(-1)[0]

    return predict
