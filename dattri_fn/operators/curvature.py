"""Curvature operators ``V -> C V`` of a per-example loss, averaged over a data set.

Every factory returns a :class:`~dattri_fn._types.LinOp` on raveled params (dict order) that
handles ``k`` right-hand sides at once (``vmap`` over rows) and streams over the data in
mini-batches: ``C = (1/N) sum_batches sum_{i in batch} C_i``. Nothing ``[P, P]`` is formed.
``batch_rows`` merges consecutive data batches into calls of at least that many examples: one
call has a fixed ``torch.func`` cost (1-2 ms on one CPU thread), so small batches pay mostly it;
memory per call grows like ``k x batch_rows x`` (activations of one example).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map

from .._checks import (
    _msg,
    batch_leaves,
    batch_size,
    batch_to,
    blame_data,
    check_optional_int,
    check_order,
    check_params,
    iter_batches,
    peek,
    regroup,
)
from .._order import SEEDED_ORDER
from .._types import Batch, LinOp, Loss, Params
from ..model import marked_module
from ..module_call import call_module, shared_slots
from ..transforms.grad import check_randomness, per_sample_grad_unchecked, seeded, summed_loss
from ..tree import ravel, ravel_batched


def _prepare(func: str, params: Params, data, chunk_size, batch_rows=None):
    check_params(func, "params", params)
    check_optional_int(func, "chunk_size", chunk_size)
    check_optional_int(func, "batch_rows", batch_rows)
    batches = iter_batches(func, "data", data, ordered=False)  # a sum over rows
    first = peek(batches)
    if first is None:
        raise ValueError(f"{func}(data=...): expected at least one batch, got an empty iterable.")
    batch_size(func, "data", first)
    flat0, unravel = ravel({k: v.detach() for k, v in params.items()})
    return batches, flat0, unravel


def _streamed(func: str, per_batch: Callable[[Tensor, Batch], Tensor], flat0: Tensor, batches,
              batch_rows: int | None = None, seed: int | None = None):
    """Build the LinOp ``V -> (1/N) sum_batches per_batch(V, batch)`` (``seed``: every call
    replays the same random draws, see :func:`~dattri_fn.transforms.grad.seeded`)."""
    device = flat0.device

    def matmat(V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        n = 0
        with seeded(seed, device):
            for batch in regroup(batches, batch_rows, func):
                batch = batch_to(batch, device)
                with blame_data(func, "data", batch):
                    out = out + per_batch(V, batch)
                n += batch_leaves(batch)[0].shape[0]
        return out / n

    return LinOp(matmat, flat0.numel(), flat0.dtype, device, name=func)


HVP_MODES = ("fwd-rev", "rev-rev")


def _summed_rows(rows, batch: Batch) -> Tensor:
    """``rows.sum()`` after checking ``rows`` is ``[B]`` for the batch's ``B`` examples."""
    n = batch_leaves(batch)[0].shape[0]
    if not isinstance(rows, Tensor) or tuple(rows.shape) != (n,):
        got = f"shape {list(rows.shape)}" if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"hvp(batched=...): expected one loss per example, shape [{n}], got "
                         f"{got}.")
    return rows.sum()


def hvp(loss: Loss, params: Params, data, *, chunk_size: int | None = None,
        mode: str = "rev-rev", batch_rows: int | None = None, randomness: str = "error",
        seed: int | None = None, batched: Callable[[Params, Batch], Tensor] | None = None) -> LinOp:
    """Return ``V -> H V`` with ``H = (1/N) sum_i hess loss(params, x_i)``.  # [k, P] -> [k, P]

    ``mode="rev-rev"`` (default): ``vjp`` of ``grad`` of the batch-summed loss, linearised once
    per batch and call, then ``vmap``-ed over the ``k`` rows (one forward/backward shared by all
    rows). ``mode="fwd-rev"``: forward-over-reverse, ``jvp`` of ``grad`` ``vmap``-ed over rows.
    Both give the same operator; rev-rev measured 1.2-2.6x faster on the digits MLP and CNN for
    k = 1..64 rows on one CPU thread (forward-over-reverse was faster only for the CNN at
    k = 16, by 5%), so it is the default.

    Args:
        loss: per-example loss ``loss(params, example) -> Tensor[]``.
        params: point of linearisation ``dict[str, Tensor]``; defines P and the ravel order.
        data: one Batch or a re-iterable of Batches (list, DataLoader), re-read on every call.
        chunk_size: rows of ``V`` per vmap call (bounds memory); None = all ``k`` at once.
        mode: ``"fwd-rev"`` or ``"rev-rev"``, as above; both give the same operator.
            ``"fwd-rev"`` silently runs rev-rev where ``loss`` is functional_model's own (or a
            ``functools.wraps`` of it) and ``params`` holds an ``nn.Embedding(padding_idx=...)``
            weight (forward mode moves the padding row reverse mode freezes: that H would not
            be symmetric).
        batch_rows: merge consecutive batches into calls of at least this many examples
            (see the module docstring); None = one call per batch as given.
        randomness, seed: for a loss that samples (dropout), as in
            :func:`~dattri_fn.transforms.grad.per_sample_grad`; with a ``seed`` every call of the operator
            replays the same draws, so it stays one linear map (what CG needs).
        batched: optional ``batched(params, batch) -> [B]``, every example's ``loss`` from ONE
            call (e.g. :func:`~dattri_fn.model.batched_loss`): ``H`` is then linearised from
            its sum instead of ``vmap(loss)`` over the examples (digits-lr, 64 rows: 1.4 ms
            against 2.1 ms). The caller vouches that it equals ``loss`` example by example
            (a module whose examples do not interact: eval mode); not with ``randomness``.

    Note:
        ``H`` of a non-convex loss is indefinite; pass ``damping`` to the solver, not here.
    """
    if mode not in HVP_MODES:
        raise ValueError(f"hvp(mode=...): expected one of {list(HVP_MODES)}, got {mode!r}.")
    check_randomness("hvp", randomness, seed)
    if randomness != "error" and mode == "fwd-rev":
        raise ValueError("hvp(mode=...): expected 'rev-rev' for a loss that samples (the "
                         "forward-over-reverse product re-runs the loss per row), got 'fwd-rev'.")
    if batched is not None and not callable(batched):
        raise TypeError(f"hvp(batched=...): expected None or a callable (params, batch) -> [B], "
                        f"got {type(batched).__name__}.")
    if batched is not None and randomness != "error":
        raise ValueError(f"hvp(batched=...): expected None for a loss that samples (one batched "
                         f"call draws once for all examples), got a callable with "
                         f"randomness={randomness!r}.")
    if seed is not None:  # the seeded masks fall on rows by position (review RH LOW-2)
        check_order("hvp", "data", data, why=SEEDED_ORDER.format(what="dropout", of="operator"))
    batches, flat0, unravel = _prepare("hvp", params, data, chunk_size, batch_rows)
    # the module of functional_model's loss, or of a functools.wraps copy of it (review RF M2):
    # rev-rev is right either way, so only this decision reads a mark it cannot vouch for
    module = marked_module(loss)
    if mode == "fwd-rev" and module is not None and padding_rows(module, params):
        mode = "rev-rev"  # forward mode moves padding rows reverse mode freezes: H not symmetric

    def batch_loss(flat: Tensor, batch: Batch) -> Tensor:
        if batched is None:
            return summed_loss("hvp", loss, unravel(flat), batch, randomness)
        return _summed_rows(batched(unravel(flat), batch), batch)

    grad_fn = torch.func.grad(batch_loss)

    def per_batch(V: Tensor, batch: Batch) -> Tensor:
        # batched double backward through max-pooling asks is_contiguous inside vmap, which
        # torch has only for the default format: channels-last images are copied (RU3 M3)
        batch = _contiguous(batch)
        # as batch_gnvp: SDPA's fused CPU/GPU kernels have no second derivative (RU2 M4)
        with sdpa_kernel(SDPBackend.MATH):
            return _hvp_rows(V, batch)

    def _hvp_rows(V: Tensor, batch: Batch) -> Tensor:
        if mode == "rev-rev" and randomness == "error" and \
                torch._C._functorch.maybe_current_level() is None:
            return _plain_rev_rev(batch_loss, flat0, V, batch, chunk_size)
        if mode == "rev-rev":
            _, vjp_fn = vjp(lambda f: grad_fn(f, batch), flat0)
            return vmap(lambda v: vjp_fn(v)[0], chunk_size=chunk_size)(V)

        def one(v: Tensor) -> Tensor:
            return jvp(lambda f: grad_fn(f, batch), (flat0,), (v,))[1]

        return vmap(one, chunk_size=chunk_size)(V)

    return _streamed("hvp", per_batch, flat0, batches, batch_rows, seed)


def attributed_embeddings(module: torch.nn.Module, params: Params):
    """``(module name, module, key)`` for each ``nn.Embedding``/``nn.EmbeddingBag`` of ``module``
    whose weight is ``params[key]``, in module order."""
    names = {id(t): n for n, t in module.named_parameters()}
    return [(name, m, names[id(m.weight)]) for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            and names.get(id(m.weight)) in params]


def padding_rows(module: torch.nn.Module, params: Params) -> dict[str, int]:
    """``{key: p}`` for each weight in ``params`` of an ``nn.Embedding(padding_idx=p)`` of
    ``module`` (reverse mode gives row ``p`` no gradient; ``jvp`` gives it one)."""
    return {key: m.padding_idx for _, m, key in attributed_embeddings(module, params)
            if m.padding_idx is not None}


def _contiguous(batch: Batch) -> Batch:
    """``batch`` with its tensors in the default memory format (a flat tuple of contiguous
    tensors, the common case, returned as it is without a pytree walk)."""
    if isinstance(batch, tuple) and all(not isinstance(t, Tensor) or t.is_contiguous()
                                        for t in batch):
        return batch
    return tree_map(lambda t: t.contiguous() if isinstance(t, Tensor) else t, batch)


def _plain_rev_rev(batch_loss, flat0: Tensor, V: Tensor, batch: Batch,
                   chunk_size: int | None) -> Tensor:
    """``H V`` by plain autograd: the gradient with its graph, then one batched backward per
    chunk of rows. The same products as ``vmap`` of ``vjp(grad)`` (bit for bit on digits-lr),
    without ``torch.func``'s per-call wrapping (2.1 -> 1.8 ms for 64 rows and 50 right-hand
    sides on one CPU thread); only outside ``torch.func`` transforms."""  # [k, P] -> [k, P]
    flat = flat0.detach().requires_grad_()
    with torch.enable_grad():
        (g,) = torch.autograd.grad(batch_loss(flat, batch), flat, create_graph=True,
                                   materialize_grads=True)
        if not g.requires_grad:  # a loss linear in the params (or constant): H = 0
            return torch.zeros_like(V)
        size = V.shape[0] if chunk_size is None else chunk_size
        parts = [torch.autograd.grad(g, flat, grad_outputs=V[s:s + size], retain_graph=True,
                                     is_grads_batched=True, materialize_grads=True)[0]
                 for s in range(0, V.shape[0], size)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _integer_target(example):
    """The label of one example (last item of a tuple/list, or ``"labels"``) if integer, else None."""
    if isinstance(example, dict):
        y = example.get("labels")
    elif isinstance(example, (tuple, list)) and example:
        y = example[-1]
    else:
        return None
    return y if isinstance(y, Tensor) and not y.is_floating_point() else None


def _kind(x) -> str:
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def cross_entropy_out_hvp(out: Tensor, example, u: Tensor, *,
                          ignore_index: int = -100) -> Tensor:
    """Return ``H u`` for ``H`` the Hessian of softmax cross-entropy w.r.t. the logits.  # [..., K]

    ``out``: one example's logits ``[..., K]``, classes LAST (leading positions, e.g. tokens,
    averaged as ``F.cross_entropy``'s default mean does). Per position ``H = diag(p) - p p^T``
    with ``p = softmax(logits)``, independent of the label. When the example's integer target
    (its last item, or ``"labels"``) has one entry per position, positions whose target is
    ``ignore_index`` are skipped and the mean runs over the others, as in ``F.cross_entropy``.
    For :func:`gnvp`'s ``out_hvp``; not for class weights or label smoothing.
    """
    if not (isinstance(out, Tensor) and out.is_floating_point() and out.ndim >= 1):
        raise TypeError(f"cross_entropy_out_hvp(out=...): expected floating logits [..., K], "
                        f"got {_kind(out)}.")
    if not isinstance(u, Tensor) or u.shape != out.shape:
        raise ValueError(f"cross_entropy_out_hvp(u=...): expected a tensor shaped like out "
                         f"{list(out.shape)}, got {_kind(u)}.")
    p = torch.softmax(out, dim=-1)
    hu = p * u - p * (p * u).sum(-1, keepdim=True)
    y = _integer_target(example)
    if y is not None and y.shape == out.shape[:-1]:
        keep = (y != ignore_index).to(out.dtype)
        return hu * keep[..., None] / keep.sum().clamp_min(1)
    return hu / (out.numel() // out.shape[-1])


def cross_entropy_out_hessian(out: Tensor, target=None) -> Tensor:
    """Return ``diag(p) - p p^T``, ``p = softmax(out)``: each row's Hessian of softmax
    cross-entropy w.r.t. its logits.  # [B, K] -> [B, K, K]

    For :func:`~dattri_fn.operators.linear_curvature.linear_gnvp`'s ``out_hessian`` with
    ``F.cross_entropy`` on ``[B, K]`` logits (no ignored targets, class weights or label
    smoothing); ``target`` is unused (the Hessian does not depend on the label).
    """
    if not (isinstance(out, Tensor) and out.is_floating_point() and out.ndim == 2):
        raise ValueError(f"cross_entropy_out_hessian(out=...): expected floating logits "
                         f"[B, K], got {_kind(out)}.")
    p = torch.softmax(out, dim=-1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def gnvp(forward: Callable, out_loss: Callable, params: Params, data, *,
         chunk_size: int | None = None, batch_rows: int | None = None,
         out_hvp: Callable[[Tensor, Batch, Tensor], Tensor] | None = None) -> LinOp:
    """Return ``V -> G V`` with the Gauss-Newton ``G = (1/N) sum_i J_i^T H_i J_i``.  # [k, P] -> [k, P]

    ``J_i`` is the Jacobian of ``forward(params, x_i)`` w.r.t. the params and ``H_i`` the Hessian of
    ``out_loss(output, x_i)`` w.r.t. the output. For softmax cross-entropy ``G`` is the true Fisher.

    Args:
        forward: ``forward(params, example) -> output`` for one example (any output shape).
        out_loss: ``out_loss(output, example) -> Tensor[]``, convex in ``output``.
        params, data, chunk_size, batch_rows: as in :func:`hvp`.
        out_hvp: optional closed form ``out_hvp(output, example, u) -> H_i u`` for one example
            (e.g. :func:`cross_entropy_out_hvp`); it must equal the Hessian of ``out_loss``. It
            replaces the autodiff linearisation of ``out_loss`` (about 1/3 of a call's time on
            the digits MLP).
    """
    batches, flat0, unravel = _prepare("gnvp", params, data, chunk_size, batch_rows)
    if out_hvp is not None and not callable(out_hvp):
        raise TypeError(f"gnvp(out_hvp=...): expected None or a callable (output, example, u) "
                        f"-> H u, got {type(out_hvp).__name__}.")
    if not callable(out_loss):
        raise TypeError(f"gnvp(out_loss=...): expected a callable (output, example) -> Tensor[], "
                        f"got {type(out_loss).__name__}.")
    example = tree_map(lambda t: t[0] if isinstance(t, Tensor) else t, peek(batches))
    with torch.no_grad(), blame_data("gnvp", "data", peek(batches)):
        value = out_loss(forward(unravel(flat0), example), example)
    if not isinstance(value, Tensor) or value.ndim != 0:
        got = f"shape {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"gnvp(out_loss=...): expected a 0-d Tensor for one example's output, "
                         f"got {got}. Reduce it to a scalar (e.g. .sum()).")
    out_grad = torch.func.grad(out_loss)

    def per_batch(V: Tensor, batch: Batch) -> Tensor:
        # Linearise once per batch and reuse for all k rows: J V by k jvps, H_out as the vjp of
        # the per-example output gradients (H_out is symmetric), J^T by k vjps through the one
        # stored graph. Linearising H_out once took half the time of k nested grad/jvp vmaps.
        f = lambda flat: vmap(forward, in_dims=(None, 0))(unravel(flat), batch)
        out, vjp_fn = vjp(f, flat0)
        JV = vmap(lambda v: jvp(f, (flat0,), (v,))[1], chunk_size=chunk_size)(V)
        if out_hvp is None:
            _, h_vjp = vjp(lambda o: vmap(out_grad)(o, batch), out)
            HJV = vmap(lambda u: h_vjp(u)[0], chunk_size=chunk_size)(JV)
        else:
            HJV = vmap(lambda u: vmap(out_hvp)(out, batch, u), chunk_size=chunk_size)(JV)
        return vmap(lambda u: vjp_fn(u)[0], chunk_size=chunk_size)(HJV)

    return _streamed("gnvp", per_batch, flat0, batches, batch_rows)


def batch_gnvp(model, params: Params, data, *, batch_rows: int | None = None) -> LinOp:
    """Return ``V -> G V``, the Gauss-Newton of ``model``'s loss, by batch products.  # [k, P] -> [k, P]

    ``G = (1/N) sum_batches J^T H J`` with ``J`` the Jacobian of the model's output on the whole
    batch (one forward, every tensor leaf of a structured output) and ``H`` the Hessian of the
    summed per-example losses w.r.t. that output (block-diagonal over examples): the same
    operator as :func:`gnvp`, but no ``vmap`` over examples, so any forward runs (transformers'
    SDPA attention, outputs holding a KV cache). ``J v`` is a reverse-over-reverse product
    (``vjp`` of ``J^T u``), so only reverse mode is needed; the ``k`` rows are ``vmap``-ed, or
    looped where a backward has no batching rule.

    Args:
        model: a :class:`~dattri_fn.model.FunctionalModel` with a ``loss_fn`` convex in the
            output (cross-entropy, ``causal_lm_loss``...).
        params, data, batch_rows: as in :func:`hvp`.
    """
    from torch.utils._pytree import tree_unflatten

    from ..model import default_unpack
    from ..transforms.layers import per_example_losses

    func = "batch_gnvp"
    if getattr(model, "loss_fn", None) is None:
        raise TypeError(f"{func}(model=...): expected a FunctionalModel built with a loss_fn, "
                        f"got {type(model).__name__}.")
    batches, flat0, unravel = _prepare(func, params, data, None, batch_rows)
    unpack = model.unpack or default_unpack
    slots = shared_slots(model.module)

    def per_batch(V: Tensor, batch: Batch) -> Tensor:
        # The math kernel of scaled_dot_product_attention has second derivatives; the fused
        # CPU/GPU kernels do not (J v here is a vjp of a vjp). Same function, same values.
        with sdpa_kernel(SDPBackend.MATH):
            return _batch_gn_rows(V, batch)

    def _batch_gn_rows(V: Tensor, batch: Batch) -> Tensor:
        args, kwargs, target = unpack(batch)
        spec_box = {}

        def out_leaves(flat: Tensor):
            out = call_module(model.module, {**model.fixed, **unravel(flat)}, args, kwargs,
                              strict=True, shared=slots)
            leaves, spec = tree_flatten(out)
            keep = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)
                    and t.is_floating_point()]
            spec_box.update(spec=spec, leaves=leaves, keep=keep)
            return tuple(leaves[i] for i in keep)

        outs, vjp_fn = vjp(out_leaves, flat0)

        def total(leaves_kept):
            leaves = list(spec_box["leaves"])
            for i, t in zip(spec_box["keep"], leaves_kept, strict=True):
                leaves[i] = t
            return per_example_losses(model.loss_fn, tree_unflatten(leaves, spec_box["spec"]),
                                      target).sum()

        _, h_vjp = vjp(torch.func.grad(total), outs)
        zeros = tuple(torch.zeros_like(t) for t in outs)
        _, jv_fn = vjp(lambda u: vjp_fn(u)[0], zeros)
        row = lambda v: vjp_fn(h_vjp(jv_fn(v)[0])[0])[0]  # J^T H (J v)
        try:
            return vmap(row)(V)
        except RuntimeError:  # a backward with no batching rule: one row at a time
            return torch.stack([row(v) for v in V])

    return _streamed(func, per_batch, flat0, batches, batch_rows)


def fvp(loss: Loss, params: Params, data, *, chunk_size: int | None = None,
        batch_rows: int | None = None) -> LinOp:
    """Return ``V -> F V`` with the empirical Fisher ``F = (1/N) sum_i g_i g_i^T``.  # [k, P] -> [k, P]

    ``g_i`` is the per-example gradient; each batch's ``[B, P]`` gradients live only while that
    batch is processed. ``chunk_size`` bounds the per-sample gradient ``vmap``; ``batch_rows``
    as in :func:`hvp`.
    """
    flat0, unravel = ravel({k: v.detach() for k, v in params.items()})
    p = unravel(flat0)  # the views fvp always differentiated (same bits as before RU2 M2)

    def rows(batch: Batch) -> Tensor:
        try:
            return ravel_batched(per_sample_grad_unchecked(loss, p, batch, chunk_size=chunk_size,
                                                           func="fvp"))
        except RuntimeError as err:
            if not str(err).startswith("vmap:"):
                raise
            raise ValueError(_msg("fvp", "loss", "a loss torch.func.vmap can run per example "
                                  "(the empirical Fisher's rows)", f"vmap's refusal: "
                                  f"{str(err)[:160]}...", "Pass the FunctionalModel itself "
                                  "(e.g. influence(fm, curvature='fisher')): its layer plan "
                                  "loops over examples where vmap cannot run. A loss replaced "
                                  "by fm._replace(loss=...) has no layer plan: make that loss "
                                  "vmappable.")) from err

    return gram(rows, params, data, batch_rows=batch_rows, func="fvp", chunk_size=chunk_size)


def gram(rows: Callable[[Batch], Tensor], params: Params, data, *,
         batch_rows: int | None = None, func: str = "gram", chunk_size: int | None = None
         ) -> LinOp:
    """Return ``V -> (1/N) sum_i g_i g_i^T V`` from ``rows(batch) -> [B, P]`` gradients (the
    empirical Fisher of :func:`fvp`, or of a layer plan's rows).  # [k, P] -> [k, P]"""
    batches, flat0, _ = _prepare(func, params, data, chunk_size, batch_rows)

    def per_batch(V: Tensor, batch: Batch) -> Tensor:
        G = rows(batch)
        return (V @ G.T) @ G

    return _streamed(func, per_batch, flat0, batches, batch_rows)
