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
* ``score``: replays each segment of ``c`` steps once from its checkpoint (``T`` more steps in
  all) and runs ``T`` vjps, each over ``k`` cotangents: time ``~ T (1 + k r) t_step`` with
  ``r`` the cost of one vjp of a step relative to the step (a second-order pass, ~2-4).
  Memory ``(T/c + c) S`` for the states + ``2 k S`` for the cotangents + one step's vjp
  residuals batched over ``k`` (``chunk_size`` bounds that batch). ``c = sqrt(T)`` minimises
  the states at ``2 sqrt(T) S``; ``c = 1`` keeps every state (no replay).
* ``horizon="auto"`` (:func:`metagradient`): the same single pass, plus ``k n_train + k S``
  floats (each target's best weight cotangents and state cotangent so far) and ``k`` norms; rows
  are copied only when a target's params cotangent ``|thetabar|`` reaches a new minimum.
* ``horizon="band"``: ``"auto"``'s memory plus ``T k`` norms and either the ``k sum_t B_t``
  per-step weight cotangents (one pass, when that is at most ``record_limit`` floats) or a
  second pass through the band's longest horizon: extra memory bounded independently of ``T``.

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
from torch.func import grad, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._checks import (
    _msg,
    all_finite,
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
from ..training.run import Trajectory, batch_order, check_run, run_steps, take, train
from ..training.steps import Optimizer, make_step
from .boundary import first_example
from .method import Method, check_checkpoints
from .pipeline import TopK, merge_topk


class MetaGradient(NamedTuple):
    """``weights [k, n_train]``: d f_j / d w_i; ``params {name: [k, *shape]}``: d f_j / d theta_{T-K_j};
    ``horizon [k]``: ``K_j``, the steps walked back for target ``j`` (``T`` for the exact pass)."""

    weights: Tensor
    params: Params
    horizon: Tensor | None = None


class MagicState(NamedTuple):
    """One :class:`~dattri_fn.training.Trajectory` and data order per run (initial params)."""

    runs: tuple[Trajectory, ...]
    orders: tuple[list[Tensor], ...]


def _split(state) -> tuple[list[Tensor], tuple]:
    """Return the floating tensors of a state (the differentiable part) and how to rebuild it."""
    leaves, spec = tree_flatten(state)
    mask = [isinstance(x, Tensor) and x.is_floating_point() for x in leaves]
    return [x for x, m in zip(leaves, mask, strict=True) if m], (leaves, spec, mask)


def _join(floats: Sequence[Tensor], how: tuple):
    leaves, spec, mask = how
    it = iter(floats)
    return tree_unflatten([next(it) if m else x for x, m in zip(leaves, mask, strict=True)], spec)


def _check_horizon(func: str, horizon) -> int | str | None:
    if isinstance(horizon, str):
        if horizon in ("auto", "band"):
            return horizon
        raise ValueError(_msg(func, "horizon", "None, an int >= 1, 'auto' or 'band'", repr(horizon)))
    return check_optional_int(func, "horizon", horizon)


# The band rule's constants, fixed (stop 18, benchmarks/magic_rules.py "auto-band") before any
# LDS was seen: horizons whose params cotangent is within 10% of the smallest, at least half
# the argmin's length.
BAND_TOLERANCE = 1.1
RECORD_LIMIT = 2**24


def band_weights(norms: Tensor) -> tuple[Tensor, Tensor]:
    """Return each step's weight in the band mean and the argmin horizons.  # [T, k] -> [T, k], [k]

    ``norms[K-1, j] = |thetabar^j_{T-K}|``. With ``K_j = argmin_K`` (first minimum over the
    finite norms) the band is ``{K >= K_j / 2 : norms[K-1, j] <= 1.1 norms[K_j-1, j]}`` and the
    band metagradient is ``(1/|band_j|) sum_{K in band_j} W_j[K]``, ``W[K] = sum_{t >= T-K} c_t``
    (``c_t`` step ``t``'s weight cotangents). Step ``t`` enters every ``W[K]`` with ``K >= T - t``,
    so the mean is ``sum_t a[T-t-1, j] c_t`` with ``a[K-1, j] = |{K' in band_j : K' >= K}| /
    |band_j|``: a per-(step, target) weight, no ``[T, k, n]`` record. A target with no finite
    norm gets the full pass (``band = {T}``, ``K_j = T``), as ``"auto"`` does.
    """
    T = norms.shape[0]
    finite = torch.isfinite(norms)
    masked = torch.where(finite, norms, torch.full_like(norms, math.inf))
    low = masked.min(0).values  # [k]
    # The first minimum (ties to the shorter horizon, as "auto"): torch.min's index among equal
    # values is not documented to be the first, argmax of a 0/1 column is.
    anchor = (masked == low[None]).to(torch.long).argmax(0) + 1
    never = ~finite.any(0)
    anchor[never] = T
    K = torch.arange(1, T + 1, device=norms.device)[:, None]  # [T, 1]
    band = finite & (norms <= BAND_TOLERANCE * low[None]) & (2 * K >= anchor[None])  # [T, k]
    band[:, never] = False
    band[T - 1, never] = True
    per_K = band.to(norms.dtype) / band.sum(0).to(norms.dtype)  # [T, k], each column sums to 1
    # a[K-1] = sum_{K' >= K} per_K[K'-1]: a reversed cumulative sum down the horizons.
    return per_K.flip(0).cumsum(0).flip(0), anchor


def _row_norms(parts: Sequence[Tensor], k: int) -> Tensor:
    """The Euclidean norm of each of ``k`` rows across ``parts`` ``[k, ...]``.  # -> [k]"""
    return torch.sqrt(sum((b.reshape(k, -1) ** 2).sum(1) for b in parts))


def _sweep(step: Callable, trajectory: Trajectory, data: Batch, order: Sequence[Tensor],
           weights: Tensor, bar: list[Tensor], first: int, chunk_size: int | None,
           vjp_step: Callable):
    """Yield ``(t, rows, sbar_t, c_t)`` for ``t = T-1 .. first``: the state cotangent after step
    ``t``'s vjp (flattened floats, params first) and the step's weight cotangents ``[k, B_t]``.

    Each segment between checkpoints is replayed once from its first state by ``step`` (the
    forward run's own loop, so the states are the run's bit for bit) and walked backward through
    ``vjp_step`` (``step`` or a form of it equal in exact arithmetic).
    """
    marks = sorted(trajectory.checkpoints)
    for lo, hi in reversed(list(zip(marks[:-1], marks[1:], strict=False))):
        if hi <= first:
            break
        states = {}
        run_steps(step, trajectory.checkpoints[lo], data, order, weights, lo, hi,
                  every=1, keep=states)
        for t in range(hi - 1, max(lo, first) - 1, -1):
            floats, how = _split(states.pop(t))
            rows = order[t]
            batch = take(data, rows)

            def one_step(floats_t, w_rows, how=how, batch=batch):
                params, opt_state = _join(floats_t, how)
                return _split(vjp_step(params, opt_state, batch, w_rows))[0]

            _, pullback = vjp(one_step, floats, weights[rows.to(weights.device)])
            bar, rows_bar = vmap(pullback, chunk_size=chunk_size)(bar)
            yield t, rows, bar, rows_bar


def metagradient(step: Callable, trajectory: Trajectory, data: Batch, order: Sequence[Tensor],
                 cotangent: Params, *, weights: Tensor | None = None,
                 chunk_size: int | None = None, horizon: int | str | None = None,
                 record_limit: int = RECORD_LIMIT, vjp_step: Callable | None = None
                 ) -> MetaGradient:
    """Return ``d <cotangent_j, theta_T> / d w`` and ``/ d theta_0`` by reverse mode over the run.

    ``cotangent`` is ``{name: [k, *shape]}``, usually ``vmap(grad(f))`` of ``k`` targets at the
    final params. Segments between consecutive ``trajectory.checkpoints`` are replayed from
    their first state (:func:`~dattri_fn.training.run_steps`, the forward run's own loop) and
    walked backward with one :func:`torch.func.vjp` per step.  # -> [k, n_train], {[k, ...]}

    Args:
        step: the pure step the trajectory was trained with.
        trajectory: from :func:`~dattri_fn.training.train` with the same ``data``, ``order``,
            ``weights``.
        data, order, weights: as in :func:`~dattri_fn.training.train`.
        cotangent: the final-params cotangents, one row per target.
        chunk_size: cotangents per vmapped vjp (None: all ``k`` at once).
        horizon: ``K``: walk back through the last ``K`` steps only (truncated reverse mode:
            the weight cotangents of steps ``< T - K`` are dropped and ``params`` is then the
            cotangent of ``theta_{T-K}``); None or ``>= T``: the whole run. ``"auto"``: per
            target ``j`` the ``K_j`` in ``1..T`` whose params cotangent is smallest,

                K_j = argmin_K |thetabar^j_{T-K}|,   thetabar_t = d <cot_j, theta_T> / d theta_t,

            (the optimizer state at ``t`` held fixed): the Euclidean norm over the PARAMETERS'
            part of the state cotangent only. The
            optimizer buffers' part is left out: Adam's moment cotangents scale like
            ``lr / sqrt(v)`` and ``lr m / v^(3/2)``, huge where ``v`` is tiny (text-lm: a median
            340 against 2.24 for the params part one step back, 5e12 at the start), so the
            whole-state norm chose ``K_j = 1`` for every target there; under SGD with momentum
            both norms chose nearly the same ``K_j`` (LDS within 0.002 on the digits tasks).
            Checked after every step's vjp; ties go to the smaller ``K``; a target whose norm is
            never finite keeps the full pass. One full reverse pass; when ``|thetabar^j|``
            reaches a new minimum, row ``j`` of the weight cotangents accumulated so far (and of
            the state cotangent) is copied aside, and those copies are returned. Extra memory:
            ``k n_train + k S`` floats; ``checkpoint_every`` does not change the choice (every
            step is replayed to its exact state before its vjp).

            ``"band"``: per target the MEAN of the truncated metagradients over the band of
            near-minimal horizons (:func:`band_weights`),

                tau_j = (1/|band_j|) sum_{K in band_j} W_j[K],
                band_j = {K >= K_j / 2 : |thetabar^j_{T-K}| <= 1.1 |thetabar^j_{T-K_j}|},

            instead of the one argmin of a noisy curve; ``params`` and ``horizon`` are those of
            ``K_j`` (as ``"auto"``). As a per-(step, target) weighted sum of the steps' weight
            cotangents it needs each step's ``[k, B_t]`` cotangents once the band is known: one
            pass records them when ``k sum_t B_t <= record_limit`` floats, else a first pass
            records only the ``[T, k]`` norms and a second pass (through the band's longest
            horizon only) adds the weighted cotangents. Extra memory beyond ``"auto"``'s:
            ``T k`` norms plus at most ``record_limit`` floats, whatever ``T``.
        record_limit: the most floats the one-pass ``"band"`` record may hold (default
            ``2**24``); a larger record takes the two-pass route (same result to round-off).
        vjp_step: the step differentiated at each state (default ``step``, which still
            replays the states): a form of ``step`` EQUAL TO IT IN EXACT ARITHMETIC that is cheaper
            to differentiate, e.g. one loss path where ``step`` computes two to reproduce a
            ``torch.optim`` run's rounding (the bundled text-lm step: 0.7x the reverse pass's
            time, scores within float32 round-off). Nothing checks the equality.
    """
    func = "metagradient"
    if not callable(step):
        raise TypeError(_msg(func, "step", "a pure step (params, opt_state, batch, weights) -> "
                             "(params, opt_state)", type(step).__name__))
    if not isinstance(trajectory, Trajectory):
        raise TypeError(_msg(func, "trajectory", "the Trajectory of training.train",
                             type(trajectory).__name__))
    n, weights = check_run(func, data, order, weights)
    chunk_size = check_optional_int(func, "chunk_size", chunk_size)
    horizon = _check_horizon(func, horizon)
    record_limit = check_int(func, "record_limit", record_limit, minimum=0)
    if vjp_step is None:
        vjp_step = step
    elif not callable(vjp_step):
        raise TypeError(_msg(func, "vjp_step", "None or a pure step (params, opt_state, batch, "
                             "weights) -> (params, opt_state)", type(vjp_step).__name__))
    T = len(order)
    auto, band = horizon == "auto", horizon == "band"
    first = 0 if horizon is None or auto or band else max(0, T - horizon)
    marks = sorted(trajectory.checkpoints)
    if marks[0] != 0 or marks[-1] != T:
        raise ValueError(_msg("metagradient", "trajectory", f"checkpoints at steps 0 and T = {T}",
                              f"steps {marks[0]}..{marks[-1]}"))
    final_params, final_opt = trajectory.checkpoints[T]
    if not isinstance(cotangent, dict) or set(cotangent) != set(final_params):
        if not isinstance(cotangent, dict):
            raise TypeError(_msg(func, "cotangent", "a dict {name: [k, *shape]}",
                                 type(cotangent).__name__))
        raise ValueError(_msg("metagradient", "cotangent", f"the keys {list(final_params)}",
                              f"{list(cotangent)}"))
    k = _check_cotangent(func, cotangent, final_params)
    dtype = next(iter(final_params.values())).dtype
    # Weights in the params' dtype: a float32 weight would round its float64 cotangent.
    weights = weights.to(dtype)
    zeros = tree_map(lambda x: x.new_zeros((k, *x.shape))
                     if isinstance(x, Tensor) and x.is_floating_point() else x, final_opt)
    bar0, _ = _split(({name: cotangent[name] for name in final_params}, zeros))
    bar = bar0  # the cotangent of theta_T when the sweep takes no step
    w_bar = torch.zeros(k, n, dtype=dtype, device=weights.device)
    n_params = len(final_params)
    if auto or band:
        best = torch.full((k,), math.inf, dtype=dtype, device=w_bar.device)
        best_w, best_bar = torch.zeros_like(w_bar), [torch.zeros_like(b) for b in bar]
        steps = torch.zeros(k, dtype=torch.long, device=w_bar.device)
    if band:
        norms = torch.empty(T, k, dtype=dtype, device=w_bar.device)
        total = sum(len(rows) for rows in order)
        # One buffer for the whole record, filled from its end (step T-1 first): 320 small
        # tensors kept among the pass's large temporaries would fragment the heap instead.
        record = (torch.empty(k, total, dtype=dtype, device=w_bar.device)
                  if k * total <= record_limit else None)
    for t, rows, bar, rows_bar in _sweep(step, trajectory, data, order, weights, bar0, first,
                                         chunk_size, vjp_step):
        cols = rows.to(w_bar.device)
        if band:
            if record is not None:
                total -= len(rows)
                record[:, total:total + len(rows)] = rows_bar
        else:
            w_bar.index_add_(1, cols, rows_bar)
        if auto or band:
            # _split puts the params dict's leaves first: bar[:n_params] = thetabar.
            step_norms = _row_norms(bar[:n_params], k)  # [k]
            if band:
                norms[T - t - 1] = step_norms
            # Strictly smaller: a tie keeps the shorter horizon; a NaN norm is never chosen.
            new = step_norms < best
            if bool(new.any()):
                best = torch.where(new, step_norms, best)
                if auto:
                    best_w[new] = w_bar[new]
                for keep, b in zip(best_bar, bar, strict=True):
                    keep[new] = b[new]
                steps[new] = T - t
    if auto or band:
        # A target whose norm was never finite keeps the full pass (its NaNs stay visible).
        never = steps == 0
        best_w[never] = w_bar[never]
        for keep, b in zip(best_bar, bar, strict=True):
            keep[never] = b[never]
        steps[never] = T
        w_bar, bar = best_w, best_bar
    else:
        steps = torch.full((k,), T - first, dtype=torch.long, device=w_bar.device)
    if band:
        w_bar = _band_sum(step, trajectory, data, order, weights, bar0, norms, record,
                          chunk_size, vjp_step, w_bar)
    params0, _ = _join(bar, _split(trajectory.checkpoints[0])[1])
    return MetaGradient(w_bar, params0, steps)


def _band_sum(step, trajectory, data, order, weights, bar0, norms, record, chunk_size, vjp_step,
              out: Tensor) -> Tensor:
    """Return ``sum_t a[T-t-1] c_t`` into ``out`` (zeroed here): from the record ``[k, sum_t B_t]``
    (step ``t``'s ``c_t`` in its columns, run order), or from a second pass through the band's
    longest horizon.  # -> [k, n]"""
    T = len(order)
    a, _ = band_weights(norms)  # [T, k]
    out.zero_()
    if record is not None:
        # The record holds the steps in run order: step t's columns start at sum_{s < t} B_s.
        lo = 0
        for t, rows in enumerate(order):
            hi = lo + len(rows)
            out.index_add_(1, rows.to(out.device), a[T - t - 1][:, None] * record[:, lo:hi])
            lo = hi
        return out
    longest = int(a.gt(0).any(1).nonzero().max()) + 1  # steps before T - longest weigh 0
    for t, rows, _, rows_bar in _sweep(step, trajectory, data, order, weights, bar0,
                                       T - longest, chunk_size, vjp_step):
        out.index_add_(1, rows.to(out.device), a[T - t - 1][:, None] * rows_bar)
    return out


def _check_cotangent(func: str, cotangent: dict, final_params: Params) -> int:
    """Return ``k``, the rows every ``cotangent[name]`` ``[k, *shape]`` shares, or raise."""
    k = None
    for name, ref in final_params.items():
        c = cotangent[name]
        if not isinstance(c, Tensor) or not c.is_floating_point() or c.shape[1:] != ref.shape \
                or c.ndim != ref.ndim + 1 or (k is not None and c.shape[0] != k):
            got = f"shape {list(c.shape)}" if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(_msg(func, "cotangent", f"floating [k, *shape] rows for {name!r} "
                                  f"(shape {list(ref.shape)}, the same k for every name)",
                                  f"{got} at {name!r}"))
        if not all_finite(c):
            raise ValueError(_msg(func, "cotangent", "finite values", f"NaN or inf at {name!r}"))
        k = c.shape[0]
    return k


KEEP_LIMIT = 2**22


def default_every(steps: int, state) -> int:
    """Return ``checkpoint_every`` for a run of ``steps`` steps from ``state``: 1 (keep every
    state, no replay in the reverse pass) when the ``steps + 1`` states hold at most ``2**22``
    floats (16 MiB in float32), else ``ceil(sqrt(steps))`` (the fewest states held, ``2
    sqrt(T) S``). The scores are the same bit for bit either way (a replay reproduces the run);
    keeping every state saves the replay, one forward step per reverse step (digits-cnn: 321 x
    3,908 floats kept; a forward step there costs ~3% of a reverse step for 50 targets)."""
    size = sum(x.numel() for x in _split(state)[0])
    return 1 if (steps + 1) * size <= KEEP_LIMIT else max(1, math.ceil(math.sqrt(steps)))


def _as_batch(func: str, arg: str, data) -> Batch:
    if is_batch(data):
        return data
    if isinstance(data, (list, tuple)) and data and all(is_batch(b) for b in data):
        return batch_cat(list(data))
    raise TypeError(_msg(func, arg, "a Batch (tensor or tuple/dict of tensors) or a list of "
                         "Batches", type(data).__name__))


def magic(loss: Loss | FunctionalModel, optimizer: Optimizer, *, epochs: int,
          batch_size: int | None = None, seed: int | Sequence[int] = 0,
          target: Callable[[Params, Any], Tensor] | None = None,
          checkpoint_every: int | None = None, chunk_size: int | None = None,
          self_chunk: int = 256, step: Callable | None = None,
          horizon: int | str | None = "auto", vjp_step: Callable | None = None) -> Method:
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
            with blame_data(func, "train", train_data):
                mg = metagradient(step, traj, train_data, order, cot, chunk_size=chunk_size,
                                  vjp_step=vjp_step,
                                  horizon=horizon)
            total = mg.weights if total is None else total + mg.weights
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
