"""Metagradients by reverse mode through a recorded run of pure steps (:func:`metagradient`):
the exact pass, the truncated ``horizon=K``, ``"auto"`` (each target's ``K_j``) and ``"band"`` (the
mean over a band of horizons), each one backward sweep over the ``T`` steps; :mod:`.magic` is the
attributor over it, :mod:`.metagradient_rules` holds the band weights, the early-exit rule and
their checks. Memory and time: :mod:`.magic`'s docstring."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._checks import _msg, all_finite, check_int, check_optional_int
from .._types import Batch, Params
from ..training.run import Trajectory, check_run, run_steps, take

# The rules moved to .metagradient_rules (stop 26); their old import paths keep working.
from .metagradient_rules import BAND_TOLERANCE as BAND_TOLERANCE
from .metagradient_rules import EARLY_EXIT as EARLY_EXIT
from .metagradient_rules import RECORD_LIMIT, _check_horizon, _row_norms, band_weights
from .metagradient_rules import _as_int as _as_int
from .metagradient_rules import _as_real as _as_real
from .metagradient_rules import _check_early_exit as _check_early_exit


class MetaGradient(NamedTuple):
    """``weights [k, n_train]``: d f_j / d w_i; ``params {name: [k, *shape]}``: d f_j / d theta_{T-K_j};
    ``horizon [k]``: ``K_j`` (``T`` for the exact pass); ``walked [k]``: the steps the reverse pass
    took for target ``j`` (``>= K_j``; ``K`` for ``horizon=K``; with ``"auto"``/``"band"`` below
    ``T`` only where ``early_exit`` stopped it). Four fields since stop 23: code that unpacked
    three (``w, p, h = metagradient(...)``) must take ``.weights``/``.params``/``.horizon``."""

    weights: Tensor
    params: Params
    horizon: Tensor | None = None
    walked: Tensor | None = None


# Bytes of the block _raise_malloc_thresholds frees: just under glibc's 32 MiB cap (64-bit) on the
# threshold it adapts, page rounding and the chunk header included.
MALLOC_BLOCK = 32 * 2**20 - 2**16


def _raise_malloc_thresholds() -> None:
    """Allocate and free one untouched ``MALLOC_BLOCK`` tensor: glibc's own adaptation then
    serves blocks up to 32 MiB from the heap and trims its top only beyond 64 MiB free.

    glibc maps a block above its mmap threshold (128 KiB at start) and, when such a block is freed,
    raises the threshold to its size (at most 32 MiB) and the trim threshold to twice that: the
    state of any process that has freed a mapped block just under 32 MiB (one of exactly 32 MiB
    is over glibc's cap and leaves them). After a small run the thresholds sit at a
    few MiB, and a reverse step's 1-12 MiB temporaries go back to the kernel between vmapped calls
    and are faulted in again: ~10k minor faults per digits-cnn reverse step (50 targets in chunks
    of 10), 0.65-0.75x its thread CPU once gone (stop 27, ``benchmarks/magic_heap.py``). No
    ``mallopt`` (unlike :func:`~dattri_fn.training.keep_heap`): the adaptation stays on and the
    arithmetic is the same; under another allocator it is one untouched allocation.
    """
    torch.empty(MALLOC_BLOCK, dtype=torch.uint8)


def _split(state) -> tuple[list[Tensor], tuple]:
    """Return the floating tensors of a state (the differentiable part) and how to rebuild it."""
    leaves, spec = tree_flatten(state)
    mask = [isinstance(x, Tensor) and x.is_floating_point() for x in leaves]
    return [x for x, m in zip(leaves, mask, strict=True) if m], (leaves, spec, mask)


def _join(floats: Sequence[Tensor], how: tuple):
    leaves, spec, mask = how
    it = iter(floats)
    return tree_unflatten([next(it) if m else x for x, m in zip(leaves, mask, strict=True)], spec)


def _sweep(step: Callable, trajectory: Trajectory, data: Batch, order: Sequence[Tensor],
           weights: Tensor, bar: list[Tensor], first: int, chunk_size: int | None,
           vjp_step: Callable, narrow: list | None = None):
    """Yield ``(t, rows, sbar_t, c_t)`` for ``t = T-1 .. first``: the state cotangent after step
    ``t``'s vjp (flattened floats, params first) and the step's weight cotangents ``[k, B_t]``.

    ``narrow``: a one-item list the caller may set to an index tensor between two steps; the
    sweep then keeps only those rows of the cotangents from the next step on (and resets it).

    Each segment between checkpoints is replayed once from its first state by ``step`` (the
    forward run's own loop, so the states are the run's bit for bit) and walked backward through
    ``vjp_step`` (``step`` or a form of it equal in exact arithmetic). A segment ``[lo, hi)``
    needs the states before steps ``lo .. hi-1``: ``hi - lo - 1`` replayed steps (none when every
    state is kept); its last step's output is the checkpoint ``hi`` already held.
    """
    marks = sorted(trajectory.checkpoints)
    for lo, hi in reversed(list(zip(marks[:-1], marks[1:], strict=False))):
        if hi <= first:
            break
        states = {}
        states[hi - 1] = run_steps(step, trajectory.checkpoints[lo], data, order, weights, lo,
                                   hi - 1, every=1, keep=states)
        for t in range(hi - 1, max(lo, first) - 1, -1):
            floats, how = _split(states.pop(t))
            rows = order[t]
            batch = take(data, rows)

            def one_step(floats_t, w_rows, how=how, batch=batch):
                params, opt_state = _join(floats_t, how)
                return _split(vjp_step(params, opt_state, batch, w_rows))[0]

            if narrow is not None and narrow[0] is not None:
                bar = [b[narrow[0]] for b in bar]
                narrow[0] = None
            _, pullback = vjp(one_step, floats, weights[rows.to(weights.device)])
            bar, rows_bar = vmap(pullback, chunk_size=chunk_size)(bar)
            yield t, rows, bar, rows_bar


def metagradient(step: Callable, trajectory: Trajectory, data: Batch, order: Sequence[Tensor],
                 cotangent: Params, *, weights: Tensor | None = None,
                 chunk_size: int | None = None, horizon: int | str | None = None,
                 record_limit: int = RECORD_LIMIT, vjp_step: Callable | None = None,
                 early_exit: tuple[float, int] | None = None) -> MetaGradient:
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
            time, scores within float32 round-off), or the first Conv2d as one GEMM
            (:func:`~dattri_fn.training.gemm_conv.with_gemm_convs`; digits-cnn ~0.9x per reverse
            step), or ReLUs as products with their masks, whose second derivative makes no zero
            tensors (:mod:`~dattri_fn.training.mask_relu`; digits-cnn a further ~0.9x, the same
            bits on the measured runs). Nothing checks the equality. ``torch.compile`` of one
            chunk's vjp + vmapped pullback compiles in torch 2.13 (CPU inductor; weights move
            3e-6 relative in float32): per digits-cnn step 0.67-0.79x of eager at load 1.8-2.6
            (0.75x with the GEMM conv alone there, but 0.99x at load 6.6), for 30-54 CPU-s of cold
            compiling per shape (4.5 with a warm inductor cache); not wired in: across steps
            dynamo recompiles at every step (the optimizer state's int step counter is a guarded
            constant) until its cache limit, then runs eager (``benchmarks/magic_compile.py``).
            A stop-24 opt-in without the recompiles was taken out again: inductor 2.13's
            post-grad ``add(mm, x) -> addmm`` rewrite drops ``alpha=``, so Adam with L2 decay
            (``g.add(p, alpha=wd)``, every bundled task) compiles wrong, AdamW's double backward
            was also wrong for a reason not found, and a cold text-lm compile (~100 CPU-s per
            shape) costs more than it saves (``benchmarks/magic_compile_lm.py --repro-addmm``).
        early_exit: ``(R, W)`` with ``R >= 1.1``, only with ``"auto"``/``"band"``: stop walking
            target ``j`` back once its params-cotangent norm has stayed above ``R`` times its
            running minimum for ``W`` consecutive steps (``|thetabar^j_{T-K}| > R min_{K' <= K}
            |thetabar^j_{T-K'}|`` for the last ``W`` ``K``); the target's rows leave the vmapped
            batch (chunks shrink) and the pass ends when no target is left. ``K_j`` and the band
            are then taken over the horizons walked, ``1..S_j`` (``walked``). The result EQUALS
            the full pass exactly when no norm beyond ``S_j`` comes back to ``1.1`` times the
            walked minimum (``"band"``; ``"auto"``: to the minimum itself), i.e. when

                |thetabar^j_{T-K}| > 1.1 min_{K' <= S_j} |thetabar^j_{T-K'}|  for all K > S_j;

            otherwise the band (or ``K_j``) loses those later horizons. Nothing proves that
            condition during the pass: it is the rule's bet that a cotangent which has grown
            past ``R`` times its minimum for ``W`` steps does not come back within ``1.1`` times
            it. On the runs measured it did not (review R1, stop 23: the bundled runs, in
            sample, and 8 runs of other seeds), but the margin is thin on digits-cnn: the closest
            norm beyond a stop came back to 1.111x (bundled run 1) and 1.115x (seed 3), plateauing
            between 1.11x and 1.35x for ~30 steps after the stop; by ``K = T`` the norms are
            1.8-230x the minimum on digits-mlp, digits-cnn and text-lm (digits-lr's shrinks all
            the way). Cost: ``~ sum_j S_j`` target-steps; on ``"band"``'s two-pass route (a record
            over ``record_limit``) the second sweep walks all ``k`` targets through the band's
            longest horizon. None (default): the full pass.
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
    early_exit = _check_early_exit(func, early_exit, horizon)
    if vjp_step is None:
        vjp_step = step
    elif not callable(vjp_step):
        raise TypeError(_msg(func, "vjp_step", "None or a pure step (params, opt_state, batch, "
                             "weights) -> (params, opt_state)", type(vjp_step).__name__))
    _raise_malloc_thresholds()
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
        if early_exit is not None:
            # Horizons a stopped target never walks are not in its band (band_weights skips
            # non-finite norms) and weigh 0 there, so their record columns must be finite.
            norms.fill_(math.inf)
        record = ((torch.zeros if early_exit is not None else torch.empty)(
            k, total, dtype=dtype, device=w_bar.device) if k * total <= record_limit else None)
    # live: the targets still walked, in the order of the sweep's rows (all of them unless
    # early_exit stops some); above: consecutive steps each has spent above R x its minimum.
    live = torch.arange(k, device=w_bar.device)
    walked = torch.full((k,), T - first, dtype=torch.long, device=w_bar.device)
    above = torch.zeros(k, dtype=torch.long, device=w_bar.device)
    narrow = [None]
    for t, rows, bar, rows_bar in _sweep(step, trajectory, data, order, weights, bar0, first,
                                         chunk_size, vjp_step, narrow):
        cols = rows.to(w_bar.device)
        whole = len(live) == k
        if band:
            if record is not None:
                total -= len(rows)
                if whole:
                    record[:, total:total + len(rows)] = rows_bar
                else:
                    record[live, total:total + len(rows)] = rows_bar
        elif whole:
            w_bar.index_add_(1, cols, rows_bar)
        else:
            w_bar[live] = w_bar[live].index_add_(1, cols, rows_bar)
        if auto or band:
            # _split puts the params dict's leaves first: bar[:n_params] = thetabar.
            step_norms = _row_norms(bar[:n_params], len(live))  # [live]
            if band:
                norms[T - t - 1, live] = step_norms
            # Strictly smaller: a tie keeps the shorter horizon; a NaN norm is never chosen.
            new = step_norms < best[live]
            if bool(new.any()):
                idx = live[new]
                best[idx] = step_norms[new]
                if auto:
                    best_w[idx] = w_bar[idx]
                for keep, b in zip(best_bar, bar, strict=True):
                    keep[idx] = b[new]
                steps[idx] = T - t
            if early_exit is not None and t > first:
                ratio, patience = early_exit
                # A NaN norm is never above: such a target walks the whole run.
                up = step_norms > ratio * best[live]
                above[live] = torch.where(up, above[live] + 1, 0)
                done = above[live] >= patience
                if bool(done.any()):
                    walked[live[done]] = T - t
                    if bool(done.all()):
                        break
                    narrow[0] = (~done).nonzero().squeeze(1)
                    live = live[narrow[0]]
                    bar = [b[narrow[0]] for b in bar]
    if auto or band:
        # A target whose norm was never finite keeps the full pass (its NaNs stay visible).
        never = steps == 0
        best_w[never] = w_bar[never]
        # A NaN norm is never above R x the minimum, so such a target is still live: bar's rows.
        mine = never[live]
        for keep, b in zip(best_bar, bar, strict=True):
            keep[live[mine]] = b[mine]
        steps[never] = T
        w_bar, bar = best_w, best_bar
    else:
        steps = torch.full((k,), T - first, dtype=torch.long, device=w_bar.device)
    if band:
        w_bar = _band_sum(step, trajectory, data, order, weights, bar0, norms, record,
                          chunk_size, vjp_step, w_bar)
    params0, _ = _join(bar, _split(trajectory.checkpoints[0])[1])
    return MetaGradient(w_bar, params0, steps, walked)


def _band_sum(step, trajectory, data, order, weights, bar0, norms, record, chunk_size, vjp_step,
              out: Tensor, drop: bool = True) -> Tensor:
    """Return ``sum_t a[T-t-1] c_t`` into ``out`` (zeroed here): from the record ``[k, sum_t B_t]``
    (step ``t``'s ``c_t`` in its columns, run order), or from a second pass through the band's
    longest horizon, each target leaving it after its own longest (``drop``; False: every
    target walks the band's longest, the route before stop 24).  # -> [k, n]"""
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
    # reach[j]: target j's longest horizon of nonzero weight (a[K-1, j] > 0 exactly for K <=
    # reach[j]: a is a reversed cumulative sum of nonnegative per-horizon weights, a[0] = 1).
    K = torch.arange(1, T + 1, device=a.device)[:, None]
    reach = (a.gt(0) * K).max(0).values  # [k]
    longest = int(reach.max())  # steps before T - longest weigh 0 for every target
    # A target leaves the sweep after its last step of nonzero weight (its later rows would add
    # 0 * c_t); the rows still walked are cut from the vmapped batch as early_exit does.
    live = torch.arange(a.shape[1], device=a.device)
    narrow = [None] if drop else None
    for t, rows, _, rows_bar in _sweep(step, trajectory, data, order, weights, bar0,
                                       T - longest, chunk_size, vjp_step, narrow):
        cols = rows.to(out.device)
        if len(live) == a.shape[1]:
            out.index_add_(1, cols, a[T - t - 1][:, None] * rows_bar)
        else:
            out[live] = out[live].index_add_(1, cols, a[T - t - 1, live][:, None] * rows_bar)
        if drop:
            done = reach[live] <= T - t  # step t - 1 is horizon T - t + 1: weight 0 from there
            if bool(done.any()):
                if bool(done.all()):
                    break
                narrow[0] = (~done).nonzero().squeeze(1)
                live = live[narrow[0]]
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


__all__ = ["MetaGradient", "band_weights", "metagradient"]
