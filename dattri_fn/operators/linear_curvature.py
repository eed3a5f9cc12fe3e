"""Curvature of a model whose parameters are all ``nn.Linear`` weights/biases, from layer factors.

:func:`linear_hessian` (the exact dense Hessian) and :func:`linear_gnvp` (the Gauss-Newton
operator) give the same matrices as ``hvp(...).dense()`` and ``gnvp(...)`` from per-layer
quantities of the batched forward, instead of autodiff through every parameter per column.

Exact Hessian.

For one example, let layer ``l`` map its input ``a_l`` (augmented to ``[a_l, 1]`` when its bias
is a parameter; ``k_l`` entries) to ``z_l = W_l a_l + b_l + e_l``, with a zero probe ``e_l``
(``d_l`` entries, see :func:`dattri_fn.transforms.layers.tap_layers`). Write ``g = dloss/de``,
``Ht = d^2 loss / de^2`` (``[D, D]``, ``D = sum_l d_l``: the Hessian w.r.t. all layer outputs,
activations' curvature included) and ``T_ml = d a_m / d e_l`` (``[k_m, d_l]``, zero unless
layer ``l`` feeds layer ``m``). A change ``dW`` moves the probes by ``e_m = dW_m a_m(e)``, so
to second order

    H[(l,j,k), (m,p,q)] = Ht[(l,j), (m,p)] a_l[k] a_m[q]
                        + g_m[p] T_ml[q, j] a_l[k] + g_l[j] T_lm[k, p] a_m[q]

summed over examples. ``Ht`` and ``T`` come from ``D`` forward-mode products of the batched
gradient w.r.t. the probes (one tangent per output unit, shared by the whole batch: the
examples do not interact), so the cost is ``D`` Hessian-vector products plus
``2 N P_l P_m`` flops of matrix products per layer pair, against ``P`` Hessian-vector products
for ``torch.func.hessian`` or a dense ``hvp``. On the digits MLP (``P = 2,410``, ``D = 42``)
that is ~15x fewer flops.

Gauss-Newton. With ``J = d out / de`` (``[C, D]`` per example) and ``A`` the Hessian of the loss
w.r.t. the output (``[C, C]``), ``G V`` for the rows of ``V`` (``V_l`` of layer ``l`` reshaped
to ``[d_l, in_l]``, plus its bias ``v_l``) is

    u_l = V_l a_l + v_l,   w = J^T A J u,   (G V)_l = sum_i w_l a_l^T,   (G v)_l = sum_i w_l,

two matrix products per layer and three ``[C, D]``-sized ones per example and row, against a
forward and backward pass per row for :func:`~dattri_fn.operators.curvature.gnvp`.

Limits: those of the capture engine (:mod:`dattri_fn.transforms.capture`: each Linear weight
consumed by ``F.linear`` once per forward, on a batch-first input), one row per example at
every layer (``[B, in]``, no sequence dimension), every parameter a weight or bias of a
captured Linear, no parameter shared with another module or read outside its layer (tied
weights), no hooks on the captured layers, and a module that treats the examples of a batch
independently (only Linear, activation and container modules may be in training mode). A
model outside them raises :class:`FactoredCurvatureError`. What the capture cannot see
(``torch.no_grad`` inside ``forward``, say) is caught by a check of the factored product
against autodiff through the module itself (one Hessian-vector product on the first batch, one
Gauss-Newton-vector product on its first 64 examples; once per tap and input layout), which
raises the same error.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jvp, vjp, vmap

from .._checks import (
    _msg,
    batch_size,
    batch_slice,
    check_dense_fits,
    check_optional_int,
    peek,
    regroup,
)
from .._types import LinOp
from ..transforms import capture
from ..transforms.capture import CaptureError
from ..transforms.layers import module_state, output_shapes, per_example_losses, unpack_example
from ..tree import ravel
from .kfac import _check_call, _layout, _select

__all__ = ["FactoredCurvatureError", "linear_gnvp", "linear_hessian", "linear_tap"]


class FactoredCurvatureError(ValueError):
    """The model is outside what this module factors (see the module docstring's limits)."""


def _feeds(names: list[str], dacts: dict, d: dict, unit: dict) -> list[tuple[str, str]]:
    """Return ``[(l, m)]``: layer ``l``'s probe moves layer ``m``'s input in this batch
    (a nonzero block of ``T_ml``), found from the forward-mode products, not from a graph."""
    return [(src, m) for m in names for src in names
            if src != m and bool(dacts[m][unit[src]:unit[src] + d[src]].any())]


_MODE_FREE = (nn.Linear, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten,
              nn.Unflatten)


def _refuse(func: str, arg: str, expected: str, got: str) -> FactoredCurvatureError:
    return FactoredCurvatureError(_msg(func, arg, expected, got,
                                       "Use the autodiff hvp/gnvp for this model."))


def _check_structure(func: str, module: nn.Module, params) -> None:
    """Raise :class:`FactoredCurvatureError` unless the model is within the module's limits
    (those visible without tracing)."""
    modules = dict(module.named_modules())
    linear = {n for n, m in modules.items() if n and isinstance(m, nn.Linear)}
    stray = [k for k in params if k.rpartition(".")[0] not in linear
             or k.rpartition(".")[2] not in ("weight", "bias")]
    if stray:
        raise _refuse(func, "params", "weights/biases of nn.Linear submodules only",
                      f"other keys {stray}")
    uses: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    shared = [k for k in params if uses[id(module.get_parameter(k))] > 1]
    if shared:
        raise _refuse(func, "params", "parameters owned by one module each",
                      f"{shared} shared with another module (tied weights)")
    owners = sorted({k.rpartition(".")[0] for k in params})
    hooked = [n for n in owners if modules[n]._forward_hooks or modules[n]._forward_pre_hooks]
    if hooked or nn.modules.module._global_forward_hooks \
            or nn.modules.module._global_forward_pre_hooks:
        raise _refuse(func, "module", "Linear layers without forward hooks",
                      f"hooks on {hooked or 'every module (global)'}")
    training = [n or type(module).__name__ for n, m in modules.items() if m.training
                and not isinstance(m, _MODE_FREE)
                and type(m).__module__ != "torch.nn.modules.activation"]
    if training:
        raise _refuse(func, "module", "a module in eval mode (Linear, activation and container "
                      "modules aside)", f"training mode in {training[:3]}")


def _flat_shapes(func, tapped, state, args, kwargs, like, B: int) -> dict[str, tuple]:
    """Return each tapped layer's output shape; raise unless every one is ``[B, out]``."""
    shapes = output_shapes(tapped, state, args, kwargs, like)
    bad = {n: list(s) for n, s in shapes.items() if len(s) != 2 or s[0] != B}
    if bad:
        raise _refuse(func, "data", f"layer outputs [B, out] with B = {B} (one row per example)",
                      f"output shapes {bad}")
    return shapes


def _probe_terms(tapped, loss_fn, state, batch, like: Tensor, func: str):
    """Return per-example ``(a, g, Ht, T)`` for one batch (module docstring).

    ``a``, ``g``: ``{layer: [B, in]}``, ``{layer: [B, d]}``; ``Ht``: ``[B, D, D]``;
    ``T``: ``{layer m: [D, B, in_m]}`` (row ``o_l + j`` is ``d a_m / d e_l[j]``).
    """
    names = tapped.layers
    args, kwargs, target = unpack_example(batch)
    shapes = _flat_shapes(func, tapped, state, args, kwargs, like, batch_size(func, "data", batch))
    out_features = {n: s[1] for n, s in shapes.items()}

    def total(probes):
        out, acts = tapped(state, probes, *args, **kwargs)
        return per_example_losses(loss_fn, out, target).sum(), acts

    grad_acts = grad(total, has_aux=True)
    probes = {n: like.new_zeros(shapes[n]) for n in names}
    g, acts = grad_acts(probes)
    B, D = next(iter(shapes.values()))[0], sum(out_features.values())
    eye = torch.eye(D, dtype=like.dtype, device=like.device)
    tangents, start = {}, 0
    for n in names:
        d = out_features[n]
        tangents[n] = eye[:, None, start:start + d].expand(D, B, d)
        start += d
    dg, dacts = vmap(lambda t: jvp(grad_acts, (probes,), (t,))[1])(tangents)
    Ht = torch.cat([dg[n] for n in names], dim=-1).permute(1, 2, 0)
    return acts, g, Ht, dacts


def _hessian_terms(tapped, loss_fn, state, batch, like, layout, func):
    """:func:`_accumulate`'s ``(aug, Ht, g, dacts)`` for one batch."""
    acts, g, Ht, dacts = _probe_terms(tapped, loss_fn, state, batch, like, func)
    return _augment(acts, layout), Ht, g, dacts


def _add(H: Tensor, rows: tuple, cols: tuple, blk: Tensor) -> None:
    """Add ``blk`` ``[d_l, k, d_m, q]`` (augmented: input entries, then the bias if ``k`` or
    ``q`` counts it) into ``H`` at layer ``l``'s rows and layer ``m``'s columns (ravel order)."""
    (wl, bl, inl), (wm, bm, inm) = rows, cols
    dl, k, dm, q = blk.shape
    H[wl, wm].view(dl, inl, dm, inm).add_(blk[:, :inl, :, :inm])
    if q > inm:
        H[wl, bm].view(dl, inl, dm).add_(blk[:, :inl, :, inm])
    if k > inl:
        H[bl, wm].view(dl, dm, inm).add_(blk[:, inl, :, :inm])
        if q > inm:
            H[bl, bm].add_(blk[:, inl, :, inm])


def _augment(acts: dict, layout: dict) -> dict:
    """Append a column of ones to each layer input ``[B, in]`` whose bias is a param."""
    return {n: torch.cat([a, a.new_ones(a.shape[0], 1)], 1) if layout[n][1] is not None else a
            for n, a in acts.items()}


_BLOCK = 2**24  # numbers in one intermediate of a layer pair's product: rows are sub-chunked
_CHECK_ROWS = 64  # examples of the first batch linear_gnvp checks against autodiff
_ROW_BLOCK = 2**22  # numbers in one [B, k d] intermediate of a cached linear_gnvp product


def _pair_block(Ht: Tensor, al: Tensor, am: Tensor) -> Tensor:
    """Return ``sum_i Ht_i (x) a_l,i (x) a_m,i`` as ``[d_l, k_l, d_m, k_m]``.  # Ht [B, d_l, d_m]

    Contracted over the examples by one GEMM per ``_BLOCK``-sized piece, with the smallest of the
    three per-example intermediates (``a_l a_m^T``, ``Ht (x) a_l``, ``Ht (x) a_m``).
    """
    B, dl, dm = Ht.shape
    kl, km = al.shape[1], am.shape[1]
    sizes = (kl * km, dl * dm * kl, dl * dm * km)
    route = sizes.index(min(sizes))
    step = max(1, _BLOCK // min(sizes))
    out = None
    for r in range(0, B, step):
        h, a, b = Ht[r:r + step], al[r:r + step], am[r:r + step]
        n = h.shape[0]
        if route == 0:
            part = (h.reshape(n, dl * dm).T @ (a[:, :, None] * b[:, None, :]).reshape(n, -1))
            part = part.view(dl, dm, kl, km).permute(0, 2, 1, 3)
        elif route == 1:
            part = ((h[..., None] * a[:, None, None, :]).reshape(n, -1).T @ b)
            part = part.view(dl, dm, kl, km).permute(0, 2, 1, 3)
        else:
            part = ((h[..., None] * b[:, None, None, :]).reshape(n, -1).T @ a)
            part = part.view(dl, dm, km, kl).permute(0, 3, 1, 2)
        out = part.contiguous() if out is None else out.add_(part)
    return out


def _activation_block(gm: Tensor, T: Tensor, al: Tensor) -> Tensor:
    """Return ``sum_i g_m,i (x) T_i (x) a_l,i`` as ``[d_m, in_m, d_l, k_l]``.  # T [B, in_m, d_l]"""
    B, inm, dl = T.shape
    dm, kl = gm.shape[1], al.shape[1]
    left = dm <= kl  # the smaller per-example intermediate: g (x) T, or T (x) a_l
    step = max(1, _BLOCK // (inm * dl * min(dm, kl)))
    out = None
    for r in range(0, B, step):
        g, t, a = gm[r:r + step], T[r:r + step], al[r:r + step]
        n = g.shape[0]
        if left:
            part = ((g[:, :, None, None] * t[:, None]).reshape(n, -1).T @ a)
        else:
            part = g.T @ (t[..., None] * a[:, None, None, :]).reshape(n, -1)
        part = part.view(dm, inm, dl, kl)
        out = part if out is None else out.add_(part)
    return out


def _accumulate(H: Tensor, layout: dict, aug: dict, Ht: Tensor, g=None, dacts=None,
                feeds: bool = False) -> None:
    """Add one batch's ``sum_i`` of the module docstring's Hessian terms into ``H``.

    ``aug``: augmented layer inputs; ``Ht``: ``[B, D, D]`` (for the Gauss-Newton, ``J^T A J``
    without the activation terms); ``g``, ``dacts``: the probe gradients and ``T`` of
    :func:`_probe_terms`, whose nonzero blocks give the activation terms when ``feeds``.
    """
    names = list(layout)
    d = {n: (ws.stop - ws.start) // inp for n, (ws, _, inp) in layout.items()}
    unit = dict(zip(names, accumulate([0] + [d[n] for n in names[:-1]]), strict=True))
    for i, lay in enumerate(names):
        ol = unit[lay]
        for m in names[i:]:
            om = unit[m]
            blk = _pair_block(Ht[:, ol:ol + d[lay], om:om + d[m]], aug[lay], aug[m])
            _add(H, layout[lay], layout[m], blk)
            if m != lay:
                _add(H, layout[m], layout[lay], blk.permute(2, 3, 0, 1))
    for src, m in (_feeds(names, dacts, d, unit) if feeds else ()):
        # layer src feeds layer m: the activations' first-order term
        ol = unit[src]
        T = dacts[m][ol:ol + d[src]].permute(1, 2, 0)  # [B, in_m, d_src]
        R = _activation_block(g[m], T, aug[src])
        _add(H, layout[m], layout[src], R)
        _add(H, layout[src], layout[m], R.permute(2, 3, 0, 1))


def _check_close(func: str, what: str, got: Tensor, ref: Tensor) -> None:
    """Raise :class:`FactoredCurvatureError` unless ``got`` equals autodiff's ``ref`` to a
    tolerance of the dtype (``1e4 eps``, within ``[1e-6, 0.05]``, relative to their norms)."""
    tol = min(0.05, max(1e-6, 1e4 * torch.finfo(got.dtype).eps))
    err = float(torch.linalg.vector_norm(got - ref))
    scale = float(torch.linalg.vector_norm(got) + torch.linalg.vector_norm(ref))
    if not err <= tol * scale:  # NaN fails too
        raise _refuse(func, "module", f"a forward whose captured factors reproduce it ({what} of "
                      "the first batch equal to autodiff through the module)",
                      f"a relative difference of {err / max(scale, 1e-300):.3g} (tolerance "
                      f"{tol:.1g}): state the trace cannot see, e.g. torch.no_grad inside "
                      "forward")


def _autodiff(module, loss_fn, state, pnames, batch):
    """Return ``(flat0, out_fn, total)``: the raveled params, ``flat -> module output`` and
    ``flat -> sum_i loss_i`` by ``functional_call`` of the module itself (no trace)."""
    args, kwargs, target = unpack_example(batch)
    flat0, unravel = ravel({k: state[k] for k in pnames})
    out_fn = lambda flat: functional_call(module, {**state, **unravel(flat)}, args, kwargs)
    total = lambda flat: per_example_losses(loss_fn, out_fn(flat), target).sum()
    return flat0, out_fn, total


def _probe_vector(P: int, like: Tensor) -> Tensor:
    g = torch.Generator(device=like.device).manual_seed(0)
    return torch.randn(P, generator=g, dtype=like.dtype, device=like.device)


def _first_pass(func: str, compute):
    """Run the first batch's factor computation; an error of the captured forward there means
    the capture does not fit the model: a :class:`FactoredCurvatureError`."""
    try:
        return compute()
    except FactoredCurvatureError:
        raise
    except CaptureError as err:
        why = "; ".join(f"{n}: {w}" for n, w in err.problems.items())
        raise _refuse(func, "params", "weights read only by their own F.linear call (no tied "
                      "weights, batch-first inputs)", why) from err
    except Exception as err:  # whatever the forward raises with probes
        raise _refuse(func, "module", "a module whose Linear layers the capture engine can factor",
                      f"{type(err).__name__}: {err}") from err


def _unwrapped(module: nn.Module, params, tapped=None):
    """Return ``(module, params)`` with a bare ``nn.Linear`` root wrapped in a one-layer
    ``nn.Sequential`` (fx cannot keep a root as a leaf; keys gain ``"0."``, order kept)."""
    if not isinstance(module, nn.Linear) or not isinstance(params, dict):
        return module, params
    inner = getattr(tapped, "module", None)
    wrapper = (inner if isinstance(inner, nn.Sequential) and len(inner) == 1
               and inner[0] is module else nn.Sequential(module))
    return wrapper, {f"0.{k}": v for k, v in params.items()}


def _checked(func: str, module, params, tapped=None):
    """Return ``(module, params, tapped)``: the model validated against the limits visible
    without data (bare Linear wrapped, see :func:`_unwrapped`), captured unless ``tapped``
    is given. Plain errors for bad arguments, :class:`FactoredCurvatureError` for the limits."""
    if not isinstance(module, nn.Module):
        raise TypeError(_msg(func, "module", "an nn.Module", type(module).__name__))
    module, params = _unwrapped(module, params, tapped)
    module_state(func, module, params)  # unknown keys and wrong shapes are plain errors
    _check_structure(func, module, params)
    if tapped is None:
        try:
            tapped = capture.tap(module, _select(func, module, params, None)[0])
        except ValueError as err:  # a weight missing, a layer the engine does not know
            raise FactoredCurvatureError(str(err)) from err
    return module, params, tapped


def linear_tap(module: nn.Module, params):
    """Return the captured forward that :func:`linear_hessian` / :func:`linear_gnvp` take as
    ``tapped=`` (build once, reuse across calls); a bare ``nn.Linear`` is wrapped.

    Raises:
        FactoredCurvatureError: a model outside the module docstring's limits that shows
            without data (parameters, hooks, training mode, tracing).
    """
    return _checked("linear_tap", module, params)[2]


def _setup(func, module, loss_fn, params, data, chunk_size, tapped, batch_rows):
    """Validate a call; return ``(state, tapped, batches, chunk_size, layout, module, params)``
    (a bare Linear wrapped, see :func:`_unwrapped`).

    ``layout[layer] = (weight slice, bias slice or None, in_features)`` in the raveled params.
    Plain errors for bad arguments; :class:`FactoredCurvatureError` for a model outside the
    limits (module docstring).
    """
    module, params, tapped = _checked(func, module, params, tapped)
    state, names, pnames, batches, tapped, chunk_size = _check_call(
        func, module, loss_fn, params, data, None, chunk_size, tapped)
    check_optional_int(func, "batch_rows", batch_rows)
    shapes = {n: tuple(state[f"{n}.weight"].shape) for n in names}
    _, where = _layout(func, pnames, shapes)
    layout = {n: (ws, bs, shapes[n][1]) for n, (ws, bs) in where.items()}
    return state, tapped, batches, chunk_size, layout, module, params


def _chunks(func, batches, batch_rows, chunk_size):
    """Yield ``(part, rows)``: each merged batch in ``chunk_size`` pieces."""
    for batch in regroup(batches, batch_rows, func):
        B = batch_size(func, "data", batch)
        step = B if chunk_size is None else chunk_size
        for start in range(0, B, step):
            part = batch if step >= B else batch_slice(batch, start, start + step)
            yield part, min(step, B - start)


def linear_hessian(module: nn.Module, loss_fn: Callable, params, data, *,
                   chunk_size: int | None = None, tapped=None,
                   batch_rows: int | None = None) -> Tensor:
    """Return the exact ``H = (1/N) sum_i hess loss_i`` of a Linear-only model.  # [P, P]

    Same matrix as ``hvp(loss, params, data).dense()`` (``loss_i = loss_fn(module(x_i),
    y_i)`` on a batch of one), built from per-layer factors instead of ``P`` Hessian-vector
    products (module docstring: the formula, the cost and the limits).

    Args:
        module: the model, within the module docstring's limits (its Linear layers captured
            by :mod:`dattri_fn.transforms.capture`).
        loss_fn: ``loss_fn(output, target) -> Tensor[]`` on a batch of one example.
        params: ``dict[str, Tensor]`` of weights (and optionally biases) of the module's Linear
            layers; their order is the ravel order of ``H``'s rows and columns.
        data: a Batch ``(*inputs, target)`` or a re-iterable of them (list, DataLoader).
        chunk_size: examples per batched pass (its memory: ``chunk_size x D x (D + sum_l
            (2 in_l + 1))`` numbers, ``D = sum_l out_l``); ``None``: as many as keep that within
            ``2**24``. Layer-pair products are split further to keep each intermediate there.
        tapped: :func:`linear_tap` of the same module and params, to trace once across
            calls; ``None`` traces anew.
        batch_rows: merge consecutive batches into passes of at least this many examples.

    Returns:
        ``[P, P]`` Tensor, symmetric up to rounding, in the params' dtype and device.

    Raises:
        TypeError, ValueError: bad module, loss_fn, params, data, chunk_size or batch_rows.
        FactoredCurvatureError (a ValueError): a model outside the module docstring's limits,
            including a first batch whose factored Hessian-vector product differs from
            autodiff's through the module.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
        >>> p = {k: v.detach() for k, v in net.named_parameters()}
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> H = linear_hessian(net, torch.nn.functional.cross_entropy, p, (x, y))
        >>> from dattri_fn import functional_model, hvp
        >>> fm = functional_model(net, torch.nn.functional.cross_entropy)
        >>> torch.allclose(H, hvp(fm.loss, p, (x, y)).dense())
        True
    """
    func = "linear_hessian"
    state, tapped, batches, chunk_size, layout, module, params = _setup(
        func, module, loss_fn, params, data, chunk_size, tapped, batch_rows)
    P = sum(v.numel() for v in params.values())
    like = state[f"{tapped.layers[0]}.weight"]
    if chunk_size is None:  # bound the per-chunk [B, D, D] and the D vmapped tangents
        D = sum((ws.stop - ws.start) // inp for ws, _, inp in layout.values())
        per_row = D * (D + sum(2 * inp + 1 for _, _, inp in layout.values()))
        chunk_size = max(1, _BLOCK // per_row)
    check_dense_fits(func, P, like.dtype, like.device)
    H = like.new_zeros(P, P)
    n_seen = 0
    for part, rows in _chunks(func, batches, batch_rows, chunk_size):
        step = lambda part=part: _accumulate(H, layout, *_hessian_terms(
            tapped, loss_fn, state, part, like, layout, func), feeds=True)
        if n_seen:
            step()
        else:
            _first_pass(func, step)
            done, sig = _verified(tapped, "hessian", part, loss_fn)
            if sig not in done:
                flat0, _, total = _autodiff(module, loss_fn, state, list(params), part)
                v = _probe_vector(P, like)
                ref = vjp(grad(total), flat0)[1](v)[0]  # H symmetric; reverse mode only
                _check_close(func, "the Hessian-vector product", H @ v, ref)
                done.add(sig)
        n_seen += rows
    if n_seen == 0:
        raise ValueError(_msg(func, "data", "at least one batch", "no batches"))
    return H.div_(n_seen)


class FactoredOperator(LinOp):
    """A :class:`~dattri_fn._types.LinOp` whose ``dense()`` assembles ``[P, P]`` from its
    factors (per layer pair, ``2 N P_l P_m`` flops) instead of applying it to ``P`` unit rows;
    ``dense``'s ``chunk_size`` is accepted and unused."""

    __slots__ = ("_dense",)

    def __init__(self, matmat, dense, dim, dtype, device, name="LinOp"):
        super().__init__(matmat, dim, dtype, device, name)
        self._dense = dense

    def dense(self, chunk_size: int | None = 256) -> Tensor:
        return self._dense()


def _gn_terms(tapped, loss_fn, state, batch, like: Tensor, layout: dict, func: str,
              out_hessian=None):
    """Return ``(a, J, A)`` for one batch: ``{layer: [B, in(+1)]}`` (augmented with a column
    of ones when the bias is a param), ``{layer: [B, C, d]}`` and ``[B, C, C]``."""
    names = tapped.layers
    args, kwargs, target = unpack_example(batch)
    shapes = _flat_shapes(func, tapped, state, args, kwargs, like, batch_size(func, "data", batch))
    probes = {n: like.new_zeros(shapes[n]) for n in names}
    out, pull, acts = vjp(lambda pr: tapped(state, pr, *args, **kwargs), probes, has_aux=True)
    if not isinstance(out, Tensor) or out.ndim != 2:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise _refuse(func, "module", "an output [B, C]", f"{got}")
    B, C = out.shape
    eye = torch.eye(C, dtype=out.dtype, device=out.device)[:, None, :].expand(C, B, C)
    cols = vmap(pull)(eye)[0]
    J = {n: cols[n].transpose(0, 1).contiguous() for n in names}
    if out_hessian is not None:
        A = out_hessian(out, target)
    elif target is None:
        A = vmap(hessian(lambda o: loss_fn(o[None])))(out)
    else:
        A = vmap(hessian(lambda o, t: loss_fn(o[None], t[None])))(out, target)
    return _augment(acts, layout), J, A


def _keep(factors, cache: bool | int) -> list | None:
    """Return the list of ``factors`` under the cache rule, or None to rebuild them per call."""
    if cache is False:
        return None
    kept, size = [], 0
    for item in factors:
        kept.append(item)
        size += sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(item))
        if cache is not True and size > cache:
            return None
    return kept


def _verified(tapped, kind: str, batch, *extra) -> tuple[set, tuple]:
    """Return ``(the trace's set of checked signatures, this call's signature)``: the first-batch
    check runs once per trace, loss and input layout (shapes past the batch dim, dtypes)."""
    leaves = torch.utils._pytree.tree_leaves(batch)
    sig = (kind, *map(id, extra), tuple((tuple(t.shape[1:]), t.dtype, t.device)
                                        if isinstance(t, Tensor) else repr(t) for t in leaves))
    if not hasattr(tapped, "verified"):
        tapped.verified = set()
    return tapped.verified, sig


def linear_gnvp(module: nn.Module, loss_fn: Callable, params, data, *,
                chunk_size: int | None = None, batch_rows: int | None = None, tapped=None,
                cache: bool | int = True, out_hessian: Callable | None = None) -> LinOp:
    """Return ``V -> G V``, ``G = (1/N) sum_i J_i^T A_i J_i``, of a Linear-only model.  # [k, P] -> [k, P]

    The operator of :func:`~dattri_fn.operators.curvature.gnvp` with ``forward`` the module and
    ``out_loss`` the ``loss_fn`` of one example (``A_i`` its Hessian w.r.t. the output ``[C]``),
    applied through each layer's inputs and the ``[C, D]`` output Jacobian w.r.t. the layer
    outputs (module docstring), not by a forward and backward pass per row.

    Args:
        module, loss_fn, params, data, chunk_size, batch_rows, tapped: as
            :func:`linear_hessian`; the module's output must be ``[B, C]``.
        cache: ``True``: keep every batch's factors (``N x (C D + C^2 + sum_l in_l)``
            numbers, built here, once); ``False``: rebuild them from ``data`` on every call
            (memory of one batch's factors; on the digits MLP as fast as ``gnvp``, 0.083 against
            0.059 s per 16-row call at 16k examples, and at P = 1M 2.8 against 4.5 s for
            ``gnvp``); an int: a byte budget, keep them if they fit in it, else rebuild.
        out_hessian: optional closed form ``out_hessian(output, target) -> [B, C, C]``, each
            example's Hessian of ``loss_fn`` w.r.t. its output row (e.g. ``diag(p) - p p^T``
            for softmax cross-entropy); it must equal the autodiff one it replaces (~1.4 of
            1.8 ms per 64-row batch of the digits MLP).

    Returns:
        A :class:`~dattri_fn._types.LinOp` in the params' dtype and device.

    Raises:
        TypeError, ValueError: as :func:`linear_hessian`.
        FactoredCurvatureError (a ValueError): a model outside the module docstring's limits,
            found here, at construction, from the first batch.
    """
    func = "linear_gnvp"
    state, tapped, batches, chunk_size, layout, module, params = _setup(
        func, module, loss_fn, params, data, chunk_size, tapped, batch_rows)
    if not isinstance(cache, int):
        raise TypeError(_msg(func, "cache", "a bool or a byte budget (int)",
                             type(cache).__name__))
    if not isinstance(cache, bool) and cache < 0:
        raise ValueError(_msg(func, "cache", "a byte budget >= 0", repr(cache)))
    if out_hessian is not None and not callable(out_hessian):
        raise TypeError(_msg(func, "out_hessian", "None or a callable (output, target) -> "
                             "[B, C, C]", type(out_hessian).__name__))
    names = tapped.layers
    like = state[f"{names[0]}.weight"]
    P = sum(v.numel() for v in params.values())
    bias = {n: layout[n][1] is not None for n in names}

    def factors():
        for part, _ in _chunks(func, batches, batch_rows, chunk_size):
            yield _gn_terms(tapped, loss_fn, state, part, like, layout, func, out_hessian)

    def apply(V: Tensor, items, n_total: int | None) -> Tensor:
        V = V.contiguous()  # the per-layer views below need row-major rows
        k = V.shape[0]
        blocks = {}  # layer -> V's rows as [k * d, in(+1)]
        for name in names:
            ws, bs, inp = layout[name]
            w = V[:, ws].view(k, -1, inp)
            blocks[name] = (torch.cat([w, V[:, bs, None]], 2) if bias[name] else w).reshape(
                -1, inp + bias[name])
        grads = {name: None for name in names}
        n = 0
        for a, J, A in items:
            B = A.shape[0]
            JU = sum((a[name] @ blocks[name].T).view(B, k, -1) @ J[name].mT for name in names)
            HJU = JU @ A
            for name in names:
                step = (HJU @ J[name]).view(B, -1).T @ a[name]
                grads[name] = step if grads[name] is None else grads[name].add_(step)
            n += B
        out = torch.empty_like(V)
        for name in names:
            ws, bs, inp = layout[name]
            g = grads[name].view(k, -1, inp + bias[name])
            out[:, ws].view(k, -1, inp).copy_(g[:, :, :inp])
            if bias[name]:
                out[:, bs].copy_(g[:, :, inp])
        return out.div_(n if n_total is None else n_total)

    first = peek(batches)  # read without losing it, even from data readable only once
    if first is None:
        raise ValueError(_msg(func, "data", "at least one batch", "no batches"))
    first = (first, batch_size(func, "data", first))
    done, sig = _verified(tapped, "gnvp", first[0], loss_fn, out_hessian)
    if sig not in done:
        few = batch_slice(first[0], 0, min(first[1], _CHECK_ROWS))
        terms = _first_pass(func, lambda: _gn_terms(tapped, loss_fn, state, few, like,
                                                    layout, func, out_hessian))
        v = _probe_vector(P, like)
        flat0, out_fn, _ = _autodiff(module, loss_fn, state, list(params), few)
        out, pull = vjp(out_fn, flat0)
        Jv = vjp(lambda u: pull(u)[0], torch.zeros_like(out))[1](v)[0]  # reverse mode only
        target = unpack_example(few)[2]
        out_grad = grad(lambda o: per_example_losses(loss_fn, o, target).sum())
        ref = pull(vjp(out_grad, out)[1](Jv)[0])[0]
        _check_close(func, "the Gauss-Newton-vector product (out_hessian included)",
                     apply(v[None], [terms], 1)[0], ref)
        done.add(sig)
    kept = _keep(factors(), cache)
    n_total = None if kept is None else sum(A.shape[0] for _, _, A in kept)

    def matmat(V: Tensor) -> Tensor:
        if kept is None:
            return apply(V, factors(), n_total)
        # Rows in blocks whose [B, k d] intermediates stay near 2**22 numbers: at P = 9,610 and
        # B = 1,000 one 200-row product took 0.38 s, ten 20-row ones 0.26 s (one CPU thread).
        width = max(A.shape[0] for _, _, A in kept) * max(
            (layout[n][0].stop - layout[n][0].start) // layout[n][2] for n in names)
        step = max(1, _ROW_BLOCK // max(1, width))
        if step >= V.shape[0]:
            return apply(V, kept, n_total)
        return torch.cat([apply(V[r:r + step], kept, n_total)
                          for r in range(0, V.shape[0], step)])

    def dense() -> Tensor:
        check_dense_fits(f"{func}.dense", P, like.dtype, like.device)
        H = like.new_zeros(P, P)
        n = 0
        for a, J, A in (factors() if kept is None else kept):
            Jc = torch.cat([J[name] for name in names], dim=-1)
            _accumulate(H, layout, a, Jc.mT @ A @ Jc)
            n += A.shape[0]
        return H.div_(n if n_total is None else n_total)

    return FactoredOperator(matmat, dense, P, like.dtype, like.device, name=func)
