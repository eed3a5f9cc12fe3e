"""Fitting the L2-regularised last layer that the representer decomposition needs
(:func:`dattri_fn.attribute.representer.representer`'s ``refit``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import (
    _msg,
    blame_data,
    blame_keys,
    check_int,
    check_params,
    check_positive,
    check_tensor,
)
from .._types import Params
from ..solve.lbfgs import _lbfgs

_NEWTON_ENTRIES = 4096  # heads up to this size finish with dense Newton steps,
_NEWTON_WORK = 2**27  # when head entries x n x K (the Hessian's intermediates) stay below this


def fit_head(head_fn: Callable[[Params, Tensor], Tensor],
             loss_on_logits: Callable[[Tensor, Tensor], Tensor], params: Params, features: Tensor,
             targets: Tensor, *, l2: float, max_iter: int = 500, tol: float = 1e-7) -> Params:
    """Return ``params`` with the head replaced by the minimiser of the L2-regularised head loss.

    ``W* = argmin_W (1/n) sum_i L(head_fn(W, h_i), t_i) + l2 |W|^2`` over the entries of
    ``params`` that ``head_fn``'s output depends on (the others, e.g. a body, are returned
    as given). For a linear head this is strictly convex and ``W*`` is the stationary point the
    representer theorem needs (Yeh et al. fine-tune the last layer this way). Solved from
    ``params`` until the largest gradient entry, in float64, is at most ``tol * max(1, its
    value at the start)``; warns when it is still above. ``W*`` is then within ``|grad| /
    (2 l2)`` of the exact minimiser (strong convexity), and the representer decomposition of a test logit
    misses it by exactly ``(grad h_t)[c] / (2 l2)``: ``sum_i alpha_i <h_i, h_t> = W* h_t -
    grad h_t / (2 l2)`` for any ``W*``, with ``alpha`` taken at ``W*``.

    The solver. A linear head ``head_fn(W, h) = W h`` (one ``[K, F]`` matrix, ``K >= 2``)
    with softmax cross-entropy against labels or probability targets -- checked on every row
    at a random head and random logits, in float64 -- has its value, gradient and exact
    Hessian products in closed form, and is minimised by truncated Newton-CG (3-5 steps on
    the bundled tasks; 3-4x faster than L-BFGS on digits-lr's 650 entries). Its values and
    gradients are float64 sums over blocks of rows (:func:`_block_rows`, each block converted
    on the fly: the features are never copied whole); its Hessian products, which only steer
    the steps, run in the features' dtype (at least float32), so the stopping test above is
    the float64 one whatever the features' dtype. Any other head or
    loss, and a Newton stall, go through L-BFGS on the vmapped objective (compact form,
    :func:`dattri_fn.solve.lbfgs.minimize_lbfgs`'s line search), then (heads of up to 4,096
    entries, and entries x n x K up to 2**27: ~1 GiB of float64 intermediates for the dense
    Hessian) dense Newton steps.

    Args:
        features: ``h_i``.  # [n, F]
        targets: what ``loss_on_logits`` takes per example: class labels ``[n]`` or, e.g.,
            the model's own predicted probabilities ``[n, K]``.
        l2: ``> 0``, the coefficient of ``|W|^2`` (no 1/2).

    Raises:
        ValueError: ``head_fn`` depends on none of ``params``, or a bad setting.
    """
    func = "fit_head"
    for arg, fn in (("head_fn", head_fn), ("loss_on_logits", loss_on_logits)):
        if not callable(fn):
            raise TypeError(_msg(func, arg, "a callable", type(fn).__name__))
    l2 = check_positive(func, "l2", l2)
    max_iter = check_int(func, "max_iter", max_iter)
    tol = check_positive(func, "tol", tol)
    params = check_params(func, "params", params)
    check_tensor(func, "features", features, ndim=2, floating=True)
    check_tensor(func, "targets", targets)
    if targets.shape[:1] != features.shape[:1]:
        raise ValueError(_msg(func, "targets", "one target per row of features "
                              f"{list(features.shape)}", f"shape {list(targets.shape)}"))
    dtypes = {v.dtype for v in params.values()}
    if features.dtype not in dtypes:
        raise TypeError(_msg(func, "features", f"the params' dtype {sorted(map(str, dtypes))}",
                             str(features.dtype)))
    probe = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with blame_keys(func, "params", params), blame_data(func, "targets", (features, targets)):
        logits0 = head_fn(probe, features[0])
        loss_on_logits(logits0.detach(), targets[0])
    used = (torch.autograd.grad(logits0.sum(), list(probe.values()), allow_unused=True)
            if isinstance(logits0, Tensor) and logits0.requires_grad else [None] * len(probe))
    keys = [k for k, g in zip(probe, used, strict=True) if g is not None]
    del used
    if not keys:
        raise ValueError(_msg(func, "params", "the parameters head_fn reads",
                              "none that its output depends on"))
    fixed = {k: v.detach().to(torch.float64) for k, v in params.items() if k not in keys}
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]
    # The closed form's check runs every target through the loss (at the head's logits):
    # when it holds, the generic check below has nothing left to find.
    closed = _linear_softmax(head_fn, loss_on_logits, fixed, keys, params, features.detach(),
                             targets.detach(), l2)
    if closed is None:
        with blame_keys(func, "params", params), blame_data(func, "targets", (features, targets)):
            # every target through the loss once: a class index out of range is named here
            vmap(loss_on_logits)(vmap(head_fn, in_dims=(None, 0))(params, features).detach(),
                                 targets)
    copies = []  # the float64 copy of the data, made only where the generic objective runs

    def data64() -> tuple[Tensor, Tensor]:
        if not copies:
            copies.append((features.detach().to(torch.float64),
                           targets.detach().to(torch.float64) if targets.is_floating_point()
                           else targets.detach()))
        return copies[0]

    per_example = vmap(lambda p, hi, ti: loss_on_logits(head_fn(p, hi), ti), in_dims=(None, 0, 0))

    def objective(flat: Tensor) -> Tensor:  # the head's entries raveled, float64
        ws = [v.reshape(shape) for v, shape in zip(flat.split(sizes), shapes, strict=True)]
        return per_example({**fixed, **dict(zip(keys, ws, strict=True))}, *data64()).mean() \
            + l2 * (flat * flat).sum()

    grad_fn = torch.func.grad(objective)

    def value_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        # plain autograd through the vmapped objective: the cheapest (value, gradient) here
        x = x.detach().requires_grad_(True)
        value = objective(x)
        return value.detach(), torch.autograd.grad(value, x)[0]

    flat = torch.cat([params[k].detach().to(torch.float64).reshape(-1) for k in keys])
    if closed is not None:
        value_grad = closed.value_grad
        P = closed.h.new_empty(closed.t.shape[0], closed.K, dtype=closed.work_dtype)
        start = [flat, *closed.value_grad(flat, P)]
        del flat  # the start is the solver's to drop once it has moved on
        bound = tol * max(1.0, float(start[2].abs().max()))
        flat, value, g = _newton_cg(closed, start, P, bound, max_iter)
        del P
    else:
        value, g = value_grad(flat)
        bound = tol * max(1.0, float(g.abs().max()))
    if float(g.abs().max()) > bound:  # (its [history, P] pairs are not allocated for nothing)
        flat, g = _lbfgs(value_grad, flat, value, g, bound, max_iter)
    work = flat.numel() * features.shape[0] * logits0.numel()
    if flat.numel() <= _NEWTON_ENTRIES and work <= _NEWTON_WORK:
        # A line search stalls near round-off; Newton converges quadratically from here.
        for _ in range(8):
            if float(g.abs().max()) <= bound:
                break
            flat = flat - torch.linalg.solve(torch.func.hessian(objective)(flat), g)
            g = grad_fn(flat)
    left = float(g.abs().max())
    if left > bound:
        warnings.warn(f"fit_head: the head loss's largest gradient entry is {left:.2e} > "
                      f"{bound:.2e} after max_iter={max_iter} L-BFGS steps (and Newton for "
                      f"<= {_NEWTON_ENTRIES} entries); the representer "
                      "decomposition is then approximate (raise max_iter or l2).", stacklevel=2)
    fitted = dict(zip(keys, flat.split(sizes), strict=True))
    return {k: (fitted[k].reshape(v.shape).to(v.dtype) if k in fitted else v)
            for k, v in params.items()}


_BLOCKS = 8  # the float64 work streams the features in about this many blocks of rows,
_BLOCK_MIN = 64  # of at least this many rows (fewer, larger blocks cost less per-call overhead)
_BLOCK_ENTRIES = 2**22  # and at most this many entries (32 MiB of float64) once that is larger


def _block_rows(n: int, F: int) -> int:
    """Rows per float64 block of an ``[n, F]`` feature matrix: an eighth of them, at least 64
    and at most ``2**22 / F`` (then more blocks); the float64 temporaries are then ~1/4 of the
    float32 features' own size, in a bounded number of blocks."""
    rows = min(max(_BLOCK_MIN, -(-n // _BLOCKS)), max(_BLOCK_MIN, _BLOCK_ENTRIES // max(F, 1)))
    return max(1, min(n, rows))


def _loss_rows(rows: int, F: int, K: int) -> int:
    """Rows per vmapped call of :func:`_linear_softmax`'s loss check: its ~6 float64 ``[r, K]``
    temporaries (logits, targets, the loss's values and gradients, the formulas', vmap's)
    about as large as the head check's ``[2 rows, F]`` block and its two ``[2 rows, K]``
    outputs, and never fewer rows than that block (each call costs ~1 ms whatever its rows)."""
    return max(2 * rows, 2 * rows * (F + 2 * K) // (6 * K))


def _linear_softmax(head_fn: Callable, loss_on_logits: Callable, fixed: Params, keys: list,
                    params: Params, h: Tensor, t: Tensor, l2: float) -> _SoftmaxHead | None:
    """The head objective in closed form (value, gradient, Hessian products) when the head is linear,
    ``head_fn(W, h) = W h``, and the loss is softmax cross-entropy against labels or
    probability targets; else None.  # w [K F] -> ([], [K F])

    With ``Z = H W^T`` ``[n, K]``, target rows ``T`` (one-hot labels, or the given
    probabilities) and ``s_i = sum_c T_ic``:

        f = (1/n) sum_i (s_i logsumexp(Z_i) - T_i . Z_i) + l2 |W|^2
        grad_W f = (1/n) (s * softmax(Z) - T)^T H + 2 l2 W

    two ``[n, F] x [F, K]``-sized products per evaluation instead of a vmapped per-example
    objective and its backward. Both assumptions are checked on every row, in float64, a block
    of rows at a time (:func:`_block_rows`, :func:`_loss_rows`): the head at a random ``W``
    (seeded) against ``H W^T``, and the loss's values and logit gradients at the start's logits
    (every row) and at random ones (the first block's targets, in the last block's call)
    against the formulas (relative 1e-10); anything
    else keeps the generic path. ``h`` and ``t`` stay in their dtypes (the head converts
    blocks of rows as it goes).
    """
    if len(keys) != 1 or params[keys[0]].ndim != 2:
        return None
    key = keys[0]
    K, F = params[key].shape
    n = h.shape[0]
    if K < 2 or F != h.shape[1] or n == 0:
        return None
    if t.is_floating_point():
        if t.shape != (n, K):
            return None
    elif not (t.shape == (n,) and bool(((t >= 0) & (t < K)).all())):
        return None
    f64, rows = torch.float64, _block_rows(n, F)
    wide = 2 * rows  # the head check's blocks (the loss check: _loss_rows), below the score's peak
    work = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    head = _SoftmaxHead(h, t, h.new_empty(n, dtype=f64), K, l2, rows, work)
    gen = torch.Generator(device=h.device).manual_seed(0)
    W_r = torch.randn(K, F, generator=gen, dtype=f64, device=h.device)
    W0 = params[key].detach().to(f64)
    head_rows = vmap(head_fn, in_dims=(None, 0))
    loss_rows = vmap(torch.func.grad_and_value(loss_on_logits))

    def close(a, b) -> bool:  # |a - b| <= 1e-10 (1 + |b|), in place: a and b are spent
        return a.shape == b.shape and bool(a.sub_(b).abs_().le_(b.abs_().add_(1).mul_(1e-10)).all())

    try:
        with torch.no_grad():
            for a in range(0, n, wide):  # the head, at a random W
                hb = h[a:a + wide].to(f64)
                if not close(head_rows({**fixed, key: W_r}, hb), hb @ W_r.T):
                    return None
                del hb
            # the loss at the start's logits on every row, in blocks of `loss` rows (~1 ms
            # a vmapped call whatever its rows), and at random logits on the first block's
            # targets, appended to the last block's call
            loss = _loss_rows(rows, F, K)
            starts = range(0, n, loss)
            for a in starts:
                lo, hi = a, min(a + loss, n)
                T = head.targets(lo, hi)
                Z = torch.cat([h[b:min(b + rows, hi)].to(f64) @ W0.T
                               for b in range(lo, hi, rows)])  # float64 rows, `rows` at a time
                head.s[lo:hi] = T.sum(1)
                s_b = head.s[lo:hi]
                if a == starts[-1]:
                    r = min(rows, n)
                    Z = torch.cat([Z, 4 * torch.randn(r, K, generator=gen, dtype=f64,
                                                       device=h.device)])
                    T, s_b = torch.cat([T, head.targets(0, r)]), torch.cat([s_b, head.s[:r]])
                # float targets: T is t in float64 already
                if t.is_floating_point():
                    tb = T
                elif a == starts[-1]:
                    tb = torch.cat([t[lo:hi], t[:r]])
                else:
                    tb = t[lo:hi]
                grads, values = loss_rows(Z, tb)
                del tb
                # each formula checked and dropped before the next is formed
                if not close(values, torch.logsumexp(Z, 1).mul_(s_b).sub_((T * Z).sum(1))):
                    return None
                if not close(grads, torch.softmax(Z, 1).mul_(s_b[:, None]).sub_(T)):
                    return None
                del T, Z, grads, values, s_b
    except Exception:  # a head or loss the formulas do not describe: the generic path
        return None
    return head._replace(unit=float((head.s - 1).abs().max()) <= 8 * torch.finfo(work).eps)


class _SoftmaxHead(NamedTuple):
    """``f(W) = (1/n) sum_i (s_i logsumexp(h_i W^T) - T_i . h_i W^T) + l2 |W|^2`` in closed form
    (:func:`_linear_softmax`), over ``h`` and ``t`` as given."""

    h: Tensor  # [n, F], the features' dtype
    t: Tensor  # [n] class labels or [n, K] probabilities, as given
    s: Tensor  # [n] float64: s_i = sum_c T_ic
    K: int
    l2: float
    rows: int  # rows per float64 block
    work_dtype: torch.dtype  # of the Hessian products (and the probabilities they read)
    unit: bool = False  # s_i = 1 to work_dtype's precision (labels, probabilities): not multiplied

    def targets(self, a: int, b: int) -> Tensor:
        """Rows ``a:b`` of ``T`` in float64.  # -> [b - a, K]"""
        t = self.t[a:b]
        if t.is_floating_point():
            return t.to(torch.float64)
        return torch.nn.functional.one_hot(t.long(), self.K).to(torch.float64)

    def value_grad(self, w: Tensor, P: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(f, grad f)`` at ``w`` in float64, summed over blocks of rows; ``softmax(Z)``
        written into ``P`` when given.  # w [K F] -> ([], [K F]); P [n, K]"""
        n, rows = self.h.shape[0], self.rows
        W = w.view(self.K, -1)
        total, grad = w.new_zeros(()), torch.zeros_like(W)
        for a in range(0, n, rows):
            hb, T, s = self.h[a:a + rows].to(torch.float64), self.targets(a, a + rows), \
                self.s[a:a + rows, None]
            Z = hb @ W.T  # [r, F] -> [r, K]
            lse = torch.logsumexp(Z, 1, keepdim=True)
            total.add_(torch.dot(s.view(-1), lse.view(-1))).sub_(torch.dot(T.view(-1), Z.view(-1)))
            Z.sub_(lse).exp_()  # softmax, in Z: no [r, K] temporaries
            if P is not None:
                P[a:a + rows] = Z
            grad.addmm_(Z.mul_(s).sub_(T).T, hb)  # (s * P - T)^T h
            del hb, T, Z  # before the next block's are formed
        return total / n + self.l2 * (w @ w), grad.view(-1).div_(n).add_(w, alpha=2 * self.l2)

    def hvp(self, P: Tensor, v: Tensor) -> Tensor:
        """``(1/n) sum_i s_i (diag p_i - p_i p_i^T) (x) h_i h_i^T v + 2 l2 v``, the data term in
        ``work_dtype``.  # P [n, K], v [K F] -> [K F]"""
        n, dt = self.h.shape[0], self.work_dtype
        V = v.view(self.K, -1).to(dt)
        if self.h.dtype == dt:  # one block, the rows as they are (~67 calls a fit: no slices)
            out = torch.mm(self._hvp_rows(self.h, P, V, self.s), self.h)
        else:  # another dtype: converted by blocks
            out = None
            for a in range(0, n, self.rows):
                hb = self.h[a:a + self.rows].to(dt)
                Z = self._hvp_rows(hb, P[a:a + self.rows], V, self.s[a:a + self.rows])
                out = torch.mm(Z, hb) if out is None else out.addmm_(Z, hb)
                del hb, Z
        return out.view(-1).to(v.dtype).div_(n).add_(v, alpha=2 * self.l2)

    def _hvp_rows(self, hb: Tensor, p: Tensor, V: Tensor, s: Tensor) -> Tensor:
        """``(s_i p_ik (Z_ik - sum_c p_ic Z_ic))^T`` with ``Z = hb V^T``, all in ``Z``: no
        ``[r, K]`` temporary beside it.  # hb [r, F], p [r, K], V [K, F], s [r] -> [K, r]"""
        Z = torch.mm(hb, V.T).mul_(p)
        Z.addcmul_(p, Z.sum(1, keepdim=True), value=-1)
        if not self.unit:
            Z.mul_(s[:, None].to(hb.dtype))
        return Z.T


def _newton_cg(head: _SoftmaxHead, start: list, P: Tensor, bound: float,
               max_iter: int) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated Newton on ``head``'s objective from ``start = [w, value, gradient]`` (emptied
    here, so that no caller keeps the first iterate alive; softmax ``P`` at ``w``) until
    ``max|g| <= bound``; return ``(w, value, g)`` at the last iterate.  # [K F] -> ...

    Each step solves ``H d = -g`` (the Hessian, :meth:`_SoftmaxHead.hvp`) by conjugate
    gradients to the relative residual ``min(1/2, sqrt(|g|))`` (Eisenstat & Walker's forcing
    term: superlinear convergence, no over-solving far from the minimum), then backtracks as
    :func:`dattri_fn.solve.lbfgs.minimize_lbfgs` does. On digits-lr's head (650 entries) it
    takes 4-5 steps and ~60 Hessian products where L-BFGS took ~50 steps and ~58
    evaluations, each of these costing about one Hessian product. Stops early (the caller
    then continues by L-BFGS) when a line search finds no step. The Hessian products in
    float32 (float32 features) perturb each step by ~1e-7 relative, far below the forcing
    term's tolerance; the acceptance and the stopping test read float64 values and gradients.
    ``P`` is overwritten by each trial of the line search: the CG before it was its last use.
    """
    w, value, g = start
    start.clear()
    n_entries = w.numel()
    eps = torch.finfo(w.dtype).eps
    for _ in range(min(max_iter, 50)):
        g_max = float(g.abs().max())
        if g_max <= bound:
            break
        # CG on H d = -g from d = 0
        d, r = torch.zeros_like(g), -g
        p, rr = r.clone(), float(r @ r)
        stop = min(0.25, float(g.norm())) * rr  # (forcing term)^2 |g|^2, forcing <= 1/2
        for _ in range(min(n_entries, 1000)):
            Hp = head.hvp(P, p)
            pHp = float(p @ Hp)
            if not pHp > 0:  # round-off at the bottom of the spectrum: keep what we have
                break
            a = rr / pHp
            d.add_(p, alpha=a)
            r.sub_(Hp, alpha=a)
            rr_new = float(r @ r)
            if rr_new <= stop:
                break
            p.mul_(rr_new / rr).add_(r)  # r + beta p, in p (the same rounding)
            rr = rr_new
        del r, p, Hp
        slope = float(g @ d)
        if not slope < 0:
            d, slope = -g, -float(g @ g)
        t, noise, loose = 1.0, 8 * eps * abs(float(value)), 1e-6 * abs(float(value))
        while True:
            w_new = w + t * d
            v_new, g_new = head.value_grad(w_new, P)
            if float(v_new) <= float(value) + 1e-4 * t * slope or (
                    float(v_new) <= float(value) + noise and float(g_new.abs().max()) < g_max) or (
                    float(v_new) <= float(value) + loose and float(g_new @ d) <= -0.8 * slope):
                break
            t *= 0.5
            if t < 1e-12:
                return w, value, g
        w, value, g = w_new, v_new, g_new
    return w, value, g


def _soft_targets(logits: Tensor) -> Tensor:
    """The model's own predicted probabilities: ``softmax`` of ``[..., K]`` logits, or for one
    logit the 0-d probability ``sigmoid(s)`` of class 1 per example (a label's shape)."""
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[..., 0])
    return torch.softmax(logits, -1)
