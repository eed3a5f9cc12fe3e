"""MAGIC: exact metagradients of test targets with respect to every training example's weight.

A run of ``T`` pure steps ``s_{t+1} = step(s_t, batch_t, w[batch_t])`` (state ``s = (theta,
opt_state)``, :mod:`dattri_fn.training`) makes the final parameters a function of the data
weights ``w`` (``w = 1``: the run that happened). MAGIC returns, for every test target ``f_j``,

    tau_ij = d f_j(theta_T(w)) / d w_i   at  w = 1

by reverse mode through the whole run: ``sbar_T = (grad f_j(theta_T), 0)``, then for
``t = T-1 .. 0`` one :func:`torch.func.vjp` of step ``t`` at ``s_t`` gives ``sbar_t`` and the
rows' weight cotangents, which are added into ``tau[:, batch_t]``. The ``k`` test targets ride
along as a batch of cotangents (``vmap`` over the vjp). With ``f_j`` = higher-is-better (the
default ``-loss``), ``tau_ij > 0`` means up-weighting ``i`` lowers ``j``'s loss: a proponent,
the library's sign.

Memory and time (``S`` = state size: ``2P`` for SGD with momentum, ``3P`` for Adam; ``c`` =
``checkpoint_every``; ``k`` test targets; ``B`` batch size):

* ``prepare``: ``T`` steps; holds ``ceil(T/c) + 1`` states: ``(T/c) S`` floats (default ``c``:
  1 while ``(T + 1) S <= 2**22``, else ``ceil(sqrt(T))``; :func:`default_every`).
* ``score``: replays the first ``c - 1`` steps of each segment from its checkpoint (``T -
  ceil(T/c)`` steps in all, none for ``c = 1``: a segment's last step ends at the next
  checkpoint, already held) and runs ``T`` vjps, each over ``k`` cotangents: time ``~ T (1 -
  1/c + k r) t_step`` with ``r`` one target's share of a step's vjp relative to the step (one
  thread, float32: ~2 on text-lm with k = 16, against ~3.7 for one target alone; ~0.45 on
  digits-cnn with k = 50 in chunks of 10, ~3 for one target alone). Memory ``(T/c +
  c) S`` for the states + ``2 k S`` for the cotangents + one step's vjp residuals batched over
  ``k`` (``chunk_size`` bounds that batch). ``c = sqrt(T)`` minimises
  the states at ``2 sqrt(T) S``; ``c = 1`` keeps every state (no replay). On glibc,
  :func:`~dattri_fn.training.keep_heap` (an explicit, process-wide call) keeps the freed
  ``[k, ...]`` temporaries in the heap for the next step: on text-lm the kernel otherwise spent
  ~10% of a reverse step faulting them back in (one run 0.92x; the same bits).
* ``horizon="auto"`` (:func:`metagradient`): the same single pass, plus ``k n_train + k S``
  floats (each target's best weight cotangents and state cotangent so far) and ``k`` norms; rows
  are copied only when a target's params cotangent ``|thetabar|`` reaches a new minimum.
* ``horizon="band"``: ``"auto"``'s memory plus ``T k`` norms and either the ``k sum_t B_t``
  per-step weight cotangents (one pass, when that is at most ``record_limit`` floats) or a
  second pass, each target through its own band's longest horizon: extra memory bounded
  independently of ``T``.
* ``early_exit=(R, W)`` (with ``"auto"``/``"band"``): target ``j`` walks ``S_j <= T`` steps
  (``MetaGradient.walked``), so the vjps cost ``~ sum_j S_j`` target-steps instead of ``k T``
  (the rows of finished targets leave the vmapped batch; with ``chunk_size`` the chunks are cut
  from the targets still walked) and the pass ends at ``max_j S_j``; on ``"band"``'s two-pass
  route (a record over ``record_limit``) the second sweep adds ``sum_j`` (target ``j``'s
  longest band horizon) target-steps. No extra memory. On the
  recorded bundled runs with the recipes' ``(1.2, 8)``: ``sum_j S_j / (k T)`` 0.70 on text-lm,
  0.92 on digits-cnn, 0.97 on digits-mlp, 1 on digits-lr (``benchmarks/magic_exit.py``).

References:
    Ilyas & Engstrom, "MAGIC: Near-Optimal Data Attribution for Deep Learning", arXiv 2504.16430.
    Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
    Learning", ICML 2015 (reverse mode through SGD with momentum).
"""


from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, vmap

from .._checks import (
    _msg,
    batch_cat,
    batch_slice,
    blame_data,
    blame_keys,
    check_int,
    check_optional_int,
    is_batch,
)
from .._checks import batch_size as rows_of
from .._types import Batch, Loss, Params
from ..model import FunctionalModel
from ..training.run import Trajectory, batch_order, train
from ..training.steps import Optimizer, make_step
from .boundary import first_example
from .metagradient import MetaGradient as MetaGradient  # the old import paths keep working
from .metagradient import _check_early_exit, _check_horizon
from .metagradient import _join as _join
from .metagradient import _row_norms as _row_norms
from .metagradient import _split as _split
from .metagradient import band_weights as band_weights
from .metagradient import metagradient as metagradient
from .method import Method, check_checkpoints
from .pipeline import TopK, merge_topk


class MagicState(NamedTuple):
    """One :class:`~dattri_fn.training.Trajectory` and data order per run (initial params)."""

    runs: tuple[Trajectory, ...]
    orders: tuple[list[Tensor], ...]


KEEP_LIMIT = 2**22


def default_every(steps: int, state) -> int:
    """Return ``checkpoint_every`` for a run of ``steps`` steps from ``state``: 1 (keep every
    state, no replay in the reverse pass) when the ``steps + 1`` states hold at most ``2**22``
    floats (16 MiB in float32), else ``ceil(sqrt(steps))`` (the fewest states held, ``2
    sqrt(T) S``). The scores are the same bit for bit either way (a replay reproduces the run);
    keeping every state saves the replay, one forward step per reverse step (digits-cnn: 321 x
    3,908 floats kept; a forward step there costs ~4% of a reverse step for 50 targets)."""
    size = sum(x.numel() for x in _split(state)[0])
    return 1 if (steps + 1) * size <= KEEP_LIMIT else max(1, math.ceil(math.sqrt(steps)))


def _as_batch(func: str, arg: str, data) -> Batch:
    if is_batch(data):
        return data
    if isinstance(data, (list, tuple)) and data and all(is_batch(b) for b in data):
        return batch_cat(list(data))
    raise TypeError(_msg(func, arg, "a Batch (tensor or tuple/dict of tensors) or a list of "
                         "Batches", type(data).__name__))


def _finite(params) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in params.values())


def _check_finite_run(func: str, traj: Trajectory, cot: dict, arg: str,
                      order: Sequence[Tensor]) -> None:
    """Refuse non-finite test cotangents by what caused them: the replayed training run
    (non-finite final parameters: ``magic(train=...)``, with the first kept state that went
    non-finite) or a test example (``arg``, by index)."""
    if _finite(traj.params):
        bad = None
        for c in cot.values():
            rows = ~torch.isfinite(c.reshape(c.shape[0], -1)).all(dim=1)
            bad = rows if bad is None else bad | rows
        if bad is None or not bool(bad.any()):
            return
        raise ValueError(_msg(func, arg, "examples whose target gradient is finite at the "
                              "trained parameters",
                              f"NaN or inf at example {int(bad.nonzero()[0, 0])}"))
    where = ""
    kept = sorted(t for t, st in traj.checkpoints.items() if not _finite(st[0]))
    if kept and kept[0] > 0:  # the state before step t is the first kept one non-finite
        t = kept[0]
        prev = max((u for u in traj.checkpoints if u < t), default=0)
        steps = f"step {t - 1}" if prev == t - 1 else f"steps {prev}..{t - 1}"
        rows = order[t - 1].tolist() if prev == t - 1 else None
        where = f"; parameters first non-finite after {steps}" + (
            f", batch rows {rows[:8]}" if rows is not None else "")
    raise ValueError(_msg(func, "train", "data on which the replayed training run stays finite",
                          f"non-finite parameters after training (the run diverged on the "
                          f"data{where})"))


def _scale_targets(cot: dict) -> tuple[dict, Tensor | None]:
    """Return the cotangents with each target row whose square could overflow (``max|v|^2 * P
    > finfo.max / 16``, ``P`` the parameter count) divided by a power of two that brings its
    largest magnitude into ``[0.5, 1)``, and the exponents ``[k, 1]`` to multiply the score rows
    back by (None when no row needed it: the call is then untouched, the same bits). The
    metagradient is linear in each target's cotangent and a power of two scales exactly, so a
    scaled row's scores are the unscaled ones up to rounding; unscaled, a float32 target gradient
    ~1e20 overflowed inside the reverse pass (its norms, the vjps) and gave finite scores 3.8x off
    float64 (engineer F's overflow survey, stop 25), as ``influence_cg.row_scaled`` for CG."""
    parts = list(cot.values())
    k = parts[0].shape[0]
    if k == 0:
        return cot, None
    amax = torch.stack([c.reshape(k, -1).abs().amax(dim=1) if c[0].numel() else
                        c.new_zeros(k) for c in parts]).amax(dim=0)  # [k]
    size = sum(c[0].numel() for c in parts)
    limit = torch.finfo(parts[0].dtype).max / 16
    over = amax > math.sqrt(limit / max(size, 1))
    if not bool(over.any()):
        return cot, None
    e = torch.where(over, torch.frexp(amax)[1], 0)  # [k]
    scaled = {name: torch.ldexp(c, -e.reshape(-1, *([1] * (c.ndim - 1)))).to(c.dtype)
              for name, c in cot.items()}
    return scaled, e[:, None]


def magic(loss: Loss | FunctionalModel, optimizer: Optimizer, *, epochs: int,
          batch_size: int | None = None, seed: int | Sequence[int] = 0,
          target: Callable[[Params, Any], Tensor] | None = None,
          checkpoint_every: int | None = None, chunk_size: int | None = None,
          self_chunk: int = 256, step: Callable | None = None,
          horizon: int | str | None = "auto", vjp_step: Callable | None = None,
          early_exit: tuple[float, int] | None = None) -> Method:
    """Return MAGIC as a :class:`~dattri_fn.attribute.Method`: ``tau_ij = d f_j(theta_T)/d w_i``.

    By default through the last ``K_j`` steps of the run per target (``horizon="auto"``);
    ``horizon=None`` is the exact metagradient through all ``T``.

    ``params`` given to ``prepare``/``score`` are the INITIAL parameters of the run (a list of
    them: an ensemble of runs, run ``c`` with data order seed ``seed + c`` or ``seed[c]``, scores
    averaged; each run walks back its own horizon: with ``"auto"`` run ``c``'s ``K^c_j`` from its
    own cotangents, ``tau = (1/R) sum_c tau^c``).
    ``prepare(params, train)`` trains ``epochs`` epochs of ``optimizer`` on the per-example
    ``loss`` (batches of ``batch_size``, None = full batch) and keeps every
    ``checkpoint_every``-th state (default :func:`default_every`); ``score`` runs the reverse pass
    for all test targets at once. See the module docstring for memory and time.

    Args:
        loss: per-example ``loss(params, example) -> Tensor[]`` or a FunctionalModel.
        optimizer: :func:`~dattri_fn.training.sgd`, ``adam`` or ``adamw``.
        epochs, batch_size, seed: the data order (:func:`~dattri_fn.training.batch_order`);
            ``seed`` an int (run ``c`` uses ``seed + c``) or one seed per run.
        target: ``f(params, example) -> Tensor[]``, HIGHER = better for the test point
            (default ``-loss``), e.g. the correct-class margin.
        checkpoint_every: states between checkpoints (1: keep every state, no replay; None:
            :func:`default_every`, every state while the run's states fit ``2**22`` floats).
        chunk_size: test targets per vmapped vjp (None: all at once).
        self_chunk: training examples per reverse pass in ``self_score``.
        step: the pure step ``(params, opt_state, batch, weights) -> (params, opt_state)`` to
            train and differentiate (default ``make_step(loss, optimizer)``, the weighted mean
            loss); ``optimizer.init`` still gives the initial state. E.g.
            :func:`dattri_fn.eval.tasks.task_step`, the bundled tasks' own Adam run.
        vjp_step: the step the reverse pass differentiates (default ``step``): a cheaper form
            of ``step`` equal to it in exact arithmetic (:func:`metagradient`); ``step`` still
            trains and replays the run.
        horizon: ``"auto"`` (default): per test target ``j``, the metagradient through the last
            ``K_j`` steps, ``K_j`` the step count where the params cotangent
            ``|d f_j / d theta_{T-K}|`` is smallest, found during the one full reverse pass
            (:func:`metagradient`); where the cotangent shrinks all the way back (a convex,
            stable run) that is ``K_j = T``, the exact metagradient. None: the whole run, the
            exact metagradient ``d f_j(theta_T) / d w_i``. An int ``K``: the last ``K`` steps
            (the reverse pass then costs ``K / T`` of the full one). Truncation is a biased
            estimate, useful where the run's linearisation is unstable early on (the cotangent
            grows backward); on the bundled tasks ``"auto"`` scored an LDS at least as high
            as None on all four (``benchmarks/magic_horizon.py``, ``benchmarks/magic.py
            --horizons auto``), hence the default. Averaged over 3 seeds (a list of params),
            each truncated at its own ``K_j``, it scored above every single-model method on all
            four (the exact ensemble did not), but 0.004 below the 3-model CG influence ensemble
            on digits-cnn (``benchmarks/magic_rules.py``, ``benchmarks/RESULTS.md``).
            ``"band"``: per target the mean of the truncated metagradients over every ``K >=
            K_j / 2`` whose params cotangent is within 10% of the minimum (:func:`metagradient`;
            one pass while its ``[k, B]`` per-step record fits ``2**24`` floats, else two);
            chosen by the LDS on a validation ground truth (other subsets and retraining seeds)
            for the bundled recipes (``recipe("magic")``/``("magic-ens")``). The 3-seed band
            ensemble's LDS on digits-cnn, 0.388 [0.348, 0.429] (std r=1) / 0.468 (r=3), is above
            the CG influence ensemble's 0.374 / 0.453 by point estimates, inside the CIs
            (``benchmarks/RESULTS.md``).

        early_exit: ``(R, W)`` or None (default): with ``"auto"``/``"band"``, each target leaves
            the reverse pass once its params-cotangent norm has stayed above ``R`` times its
            running minimum for ``W`` steps (:func:`metagradient`; equal to the full pass when
            no later norm comes back within 1.1x of the minimum walked). The recipes use
            :data:`~dattri_fn.attribute.metagradient.EARLY_EXIT` (text-lm: ``recipes.MAGIC_EXIT``).

    Returns:
        ``Method`` named ``"magic"``; ``score -> [n_train, n_test]`` (or a TopK), positive =
        proponent; ``self_score -> [n_train]`` = ``d f(theta_T, z_i) / d w_i``.

    Example:
        >>> method = magic(loss, sgd(0.1, momentum=0.9), epochs=5, batch_size=8)
        >>> state = method.prepare(params0, train)
        >>> scores = method.score(params0, state, train, test)   # [n_train, n_test]
    """
    model = loss if isinstance(loss, FunctionalModel) else None
    loss = model.loss if model is not None else loss
    if not callable(loss):
        raise TypeError(_msg("magic", "loss", "a per-example function (params, example) -> "
                             "Tensor[] or a FunctionalModel", type(loss).__name__))
    if step is None:
        # A FunctionalModel trains with its batched forward (one call per batch, not per example).
        step = make_step(model if model is not None else loss, optimizer)
    elif not callable(step):
        raise TypeError(_msg("magic", "step", "a pure step (params, opt_state, batch, weights) -> "
                             "(params, opt_state) or None", type(step).__name__))
    if vjp_step is not None and not callable(vjp_step):
        raise TypeError(_msg("magic", "vjp_step", "None or a pure step (params, opt_state, "
                             "batch, weights) -> (params, opt_state)", type(vjp_step).__name__))
    epochs = check_int("magic", "epochs", epochs)
    batch_size = check_optional_int("magic", "batch_size", batch_size)
    seeds = None
    if isinstance(seed, Sequence):
        seeds = [check_int("magic", "seed", s, minimum=0) for s in seed]
    else:
        seed = check_int("magic", "seed", seed, minimum=0)
    checkpoint_every = check_optional_int("magic", "checkpoint_every", checkpoint_every)
    chunk_size = check_optional_int("magic", "chunk_size", chunk_size)
    horizon = _check_horizon("magic", horizon)
    early_exit = _check_early_exit("magic", early_exit, horizon)
    self_chunk = check_int("magic", "self_chunk", self_chunk)
    if target is None:
        target = lambda p, ex: -loss(p, ex)
    elif not callable(target):
        raise TypeError(_msg("magic", "target", "a function (params, example) -> Tensor[]",
                             type(target).__name__))
    target_grads = vmap(grad(target), in_dims=(None, 0))

    def _runs(params, func: str = "magic") -> list[Params]:
        if not isinstance(params, (dict, list, tuple)) or not params:
            raise TypeError(_msg(func, "params", "a params dict or a non-empty list of them "
                                 "(initial parameters)", type(params).__name__))
        return check_checkpoints(func, params)

    def _check_first(func: str, arg: str, fn, params: Params, data) -> None:
        """``fn(params, example 0)`` eagerly: a scalar, with torch's errors on the examples
        and missing parameter names reported against ``func(arg=...)``/``params``."""
        with blame_data(func, arg, data), blame_keys(func, "params", params):
            out = fn(params, first_example(data))
        if not isinstance(out, Tensor) or out.ndim != 0:
            name = "loss" if fn is loss else "target"
            got = f"shape {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(_msg(func, name, "a per-example function returning a scalar", got))

    def prepare(params, train_data) -> MagicState:
        func = "magic.prepare"
        train_data = _as_batch(func, "train", train_data)
        n = batch_size_of(train_data)
        trajs, orders = [], []
        runs = _runs(params, func)
        _check_first(func, "train", loss, runs[0], train_data)
        if seeds is not None and len(seeds) != len(runs):
            raise ValueError(_msg("magic.prepare", "params", f"{len(seeds)} runs, one per seed",
                                  f"{len(runs)}"))
        for c, p0 in enumerate(runs):
            order = batch_order(n, batch_size=batch_size, epochs=epochs,
                                seed=seed + c if seeds is None else seeds[c])
            every = checkpoint_every or default_every(len(order), (p0, optimizer.init(p0)))
            with blame_data(func, "train", train_data):
                trajs.append(train(step, p0, optimizer.init(p0), train_data, order,
                                   checkpoint_every=every))
            orders.append(order)
        return MagicState(tuple(trajs), tuple(orders))

    def _scores(state: MagicState, train_data, test, func: str, arg: str = "test") -> Tensor:
        total = None
        for traj, order in zip(state.runs, state.orders, strict=True):
            with blame_data(func, arg, test):
                cot = target_grads(traj.params, test)  # {name: [k, *shape]}
            _check_finite_run(func, traj, cot, arg, order)
            cot, e = _scale_targets(cot)
            with blame_data(func, "train", train_data):
                mg = metagradient(step, traj, train_data, order, cot, chunk_size=chunk_size,
                                  vjp_step=vjp_step, horizon=horizon,
                                  early_exit=early_exit)
            w = mg.weights if e is None else torch.ldexp(mg.weights, e).to(mg.weights.dtype)
            total = w if total is None else total + w
        return (total / len(state.runs)).T  # [n_train, k]

    def check_state(func: str, state, params, train_data) -> None:
        if not isinstance(state, MagicState) or not state.runs \
                or len(state.runs) != len(state.orders):
            raise TypeError(_msg(func, "state", "the MagicState of magic.prepare",
                                 type(state).__name__))
        runs = _runs(params, func)
        if len(runs) != len(state.runs):
            raise ValueError(_msg(func, "params", f"the {len(state.runs)} runs the state was "
                                  "prepared with", f"{len(runs)}"))
        n_state = 1 + max(int(rows.max()) for order in state.orders for rows in order)
        n = batch_size_of(train_data)
        if n != n_state:
            raise ValueError(_msg(func, "train", f"the {n_state} training examples the state "
                                  "was trained on", f"{n} examples"))

    def score(params, state: MagicState, train_data, test, *, top_k: int | None = None):
        func = "magic.score"
        top_k = check_optional_int(func, "top_k", top_k)
        train_data = _as_batch(func, "train", train_data)
        check_state(func, state, params, train_data)
        test = _as_batch(func, "test", test)
        batch_size_of(test, "test")
        _check_first(func, "test", target, state.runs[0].params, test)
        scores = _scores(state, train_data, test, func)
        if top_k is None:
            return scores
        return merge_topk(None, scores, 0, top_k, True)

    def self_score(params, state: MagicState, train_data) -> Tensor:
        func = "magic.self_score"
        train_data = _as_batch(func, "train", train_data)
        check_state(func, state, params, train_data)
        n = batch_size_of(train_data)
        out = []
        for lo in range(0, n, self_chunk):
            hi = min(n, lo + self_chunk)
            block = _scores(state, train_data, batch_slice(train_data, lo, hi), func,
                            "train")  # [n, hi-lo]
            out.append(block[torch.arange(lo, hi), torch.arange(hi - lo)])
        return torch.cat(out)

    def batch_size_of(data, arg: str = "train") -> int:
        return rows_of("magic", arg, data)

    return Method(prepare, score, self_score, "magic")


__all__ = ["MagicState", "MetaGradient", "TopK", "band_weights", "default_every", "magic",
           "metagradient"]
