"""The Gauss-Newton curvature of a model, as a builder that picks its own fast path.

``gauss_newton(fm)`` returns ``build(params, data) -> LinOp`` for ``G = (1/N) sum_i J_i^T A_i J_i``
(``J_i`` the Jacobian of the output w.r.t. the params, ``A_i`` the Hessian of the loss w.r.t.
the output: positive semi-definite for a convex loss, the Hessian itself for a GLM). The builder,
not the caller, chooses how:

* a model whose params are all Linear weights/biases (within
  :mod:`~dattri_fn.operators.linear_curvature`'s limits) gets
  :func:`~dattri_fn.operators.linear_curvature.linear_gnvp`: per-layer factors from the capture engine,
  kept between products when they fit the memory budget;
* any other model gets :func:`~dattri_fn.operators.curvature.gnvp` (autodiff ``J V``, ``J^T u``, vmapped
  over examples), or, where ``vmap`` cannot run the model (transformers' SDPA attention, an
  output holding a KV cache: probed on the first two examples),
  :func:`~dattri_fn.operators.curvature.batch_gnvp` (the same operator from one forward per batch);
* the padding row of an attributed ``nn.Embedding(padding_idx=p)`` weight, which reverse mode
  freezes and ``jvp`` does not, is masked in and out of ``gnvp`` (``P G P``: symmetric, equal to
  the reverse-mode Gauss-Newton); where a vjp moves the row (a tied head), ``batch_gnvp``. An
  attributed ``nn.EmbeddingBag`` is refused (torch has no second-order product for it);
* softmax cross-entropy on ``[B, C]`` logits (``F.cross_entropy``, or a loss carrying the
  batched form ``per_example`` as :func:`~dattri_fn.eval.tasks.classification_loss` does) uses the
  closed-form output Hessian ``diag(p) - p p^T`` in both;
* data batches are merged into calls of ``max(B, min(2048, 2**24 // P))`` examples (a
  ``torch.func`` call has a fixed cost of a few ms on CPU; the cap keeps a call's ``k x rows``
  activations to tens of MiB).

The memory budget is one setting: ``memory=`` bytes, default the environment variable
``DATTRI_FN_MEMORY`` (bytes; ``256M``/``2G`` suffixes allowed) or 256 MiB.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from .._checks import _msg, batch_leaves, is_batch
from .._types import LinOp
from ..model import FunctionalModel, check_bridged, check_eval, default_unpack
from ..transforms.layers import cross_entropy_rows
from .curvature import (
    attributed_embeddings,
    batch_gnvp,
    cross_entropy_out_hessian,
    cross_entropy_out_hvp,
    gnvp,
    padding_rows,
)
from .linear_curvature import FactoredCurvatureError, linear_gnvp, linear_tap

__all__ = ["curvature_rows", "gauss_newton", "memory_budget"]

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def memory_budget(memory: int | str | None = None) -> int:
    """Return the memory budget in bytes: ``memory``, else ``$DATTRI_FN_MEMORY``, else 256 MiB.

    Raises:
        ValueError: a budget that is not a positive number of bytes (``"512M"``, ``2**28``).
    """
    value = os.environ.get("DATTRI_FN_MEMORY", "256M") if memory is None else memory
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    number = text[:-1] if unit else text
    try:
        out = int(float(number) * _UNITS[unit])
    except ValueError:
        out = 0
    if out <= 0:
        arg = "memory" if memory is not None else "DATTRI_FN_MEMORY"
        raise ValueError(_msg("memory_budget", arg, "a positive number of bytes such as "
                              "268435456, '256M' or '2G'", repr(value)))
    return out


def curvature_rows(num_params: int, batch_size: int) -> int:
    """Examples per curvature call: ``max(batch_size, min(2048, 2**24 // P))``."""
    return max(batch_size, min(2048, 2**24 // max(1, num_params)))


def _is_softmax_cross_entropy(loss_fn) -> bool:
    return loss_fn is F.cross_entropy or getattr(loss_fn, "per_example", None) is cross_entropy_rows


def _first_rows(data) -> int:
    """Rows of ``data``'s first batch (a Batch or a list of them); 1 for other iterables."""
    if not is_batch(data):
        data = data[0] if isinstance(data, (list, tuple)) and data else None
    leaves = batch_leaves(data) if data is not None and is_batch(data) else []
    return leaves[0].shape[0] if leaves and leaves[0].ndim else 1


def _fallback(fm: FunctionalModel, err: Exception) -> None:
    """The one warning of a builder whose model the factored product cannot take."""
    # the refusal's own advice ("Use the autodiff hvp/gnvp") is what this fallback does (RU2 L2)
    why = str(err).replace(" Use the autodiff hvp/gnvp for this model.", "")
    warnings.warn(f"gauss_newton: the factored Gauss-Newton does not apply to "
                  f"{type(fm.module).__name__} ({why}); using the autodiff product gnvp "
                  f"instead (exact, slower).", RuntimeWarning, stacklevel=4)


def gauss_newton(fm: FunctionalModel, *, memory: int | str | None = None,
                 batch_rows: int | None = None) -> Callable[..., LinOp]:
    """Return ``build(params, data) -> LinOp``: ``V -> G V`` of ``fm``'s loss.  # [k, P] -> [k, P]

    The fast path is chosen here (module docstring): factored for Linear-only models, the
    closed-form softmax cross-entropy Hessian, merged batches; a model outside the factored
    limits gets autodiff after one ``RuntimeWarning`` per params selection, naming why (see
    :func:`~dattri_fn.operators.linear_curvature.linear_gnvp`). An attributed
    ``nn.Embedding(padding_idx=...)`` weight that another module holds too, or whose padding row
    a vjp on the first two examples moves (a tied head), silently takes the reverse-only
    :func:`~dattri_fn.operators.curvature.batch_gnvp` (the same operator, one forward per batch).

    Args:
        fm: a :class:`~dattri_fn.model.FunctionalModel` with a ``loss_fn`` (a batch loss such as
            ``F.cross_entropy``, convex in the output).
        memory: bytes the factors may keep between products (see :func:`memory_budget`).
        batch_rows: examples per curvature call; ``None``: :func:`curvature_rows` of the params
            and the first batch.

    Raises:
        TypeError: ``fm`` is not a FunctionalModel with a loss_fn.
        ValueError: ``fm`` is not bridged (a replaced loss) or has a Dropout in training mode.
    """
    if not isinstance(fm, FunctionalModel) or fm.loss_fn is None:
        raise TypeError(_msg("gauss_newton", "fm", "a FunctionalModel built with a loss_fn",
                             type(fm).__name__))
    check_bridged("gauss_newton", "fm", fm)  # G is formed from module and loss_fn
    check_eval("gauss_newton", "fm", fm)  # train-mode Dropout: a random G (review RF M1)
    budget = memory_budget(memory)
    loss_fn = fm.loss_fn
    unpack = fm.unpack or default_unpack

    def out_loss(out, ex):
        target = unpack(ex)[2]
        out = tree_map(lambda t: t[None] if isinstance(t, Tensor) else t, out)  # ModelOutput too
        return loss_fn(out) if target is None else loss_fn(out, tree_map(
            lambda t: t[None] if isinstance(t, Tensor) else t, target))

    out_hvp = out_hessian = None
    if _is_softmax_cross_entropy(loss_fn):  # one example's logits: classes on dim 0
        out_hvp = lambda out, ex, u: cross_entropy_out_hvp(
            out.movedim(0, -1), ex, u.movedim(0, -1)).movedim(-1, 0)
        out_hessian = cross_entropy_out_hessian
    taps: dict = {}  # params' keys -> the capture for linear_gnvp, or None outside its limits

    def build(params, data) -> LinOp:
        rows = batch_rows or curvature_rows(sum(v.numel() for v in params.values()),
                                            _first_rows(data))
        key = tuple(params)
        bag = no_second_order(fm, params)
        if bag is not None:
            raise ValueError(_msg("gauss_newton", "fm", "a model autodiff can differentiate "
                                  "twice", f"nn.EmbeddingBag {bag!r} with its weight attributed "
                                  "(torch has neither its forward-mode derivative nor its "
                                  "double backward)", "Use the empirical Fisher "
                                  "(influence(curvature='fisher')) or solver 'kfac'/'ekfac'."))
        if key not in taps:
            try:
                if fm.unpack not in (None, default_unpack):
                    raise FactoredCurvatureError("a custom unpack")
                taps[key] = linear_tap(fm.module, params)
            except (FactoredCurvatureError, ValueError) as err:
                taps[key] = None
                _fallback(fm, err)
        if taps[key] is not None:
            try:
                return linear_gnvp(fm.module, loss_fn, params, data, batch_rows=rows,
                                   tapped=taps[key], out_hessian=out_hessian, cache=budget)
            except FactoredCurvatureError as err:
                taps[key] = None
                _fallback(fm, err)
        if key not in vmappable:
            vmappable[key] = _vmaps(fm, params, data)
        if not vmappable[key]:  # transformers' SDPA, a KV-cache output: batch-level products
            return batch_gnvp(fm, params, data, batch_rows=rows)
        if key not in frozen:
            frozen[key] = _frozen_rows(fm, params, data)
        if frozen[key] is False:  # a padding row reverse mode moves (a tied head): reverse only
            return batch_gnvp(fm, params, data, batch_rows=rows)
        op = gnvp(fm.forward, out_loss, params, data, batch_rows=rows, out_hvp=out_hvp)
        return op if frozen[key] is None else _masked(op, frozen[key])

    vmappable: dict = {}  # params' keys -> whether vmap over examples runs the model
    frozen: dict = {}  # params' keys -> flat indices of padding rows, None, or False (above)
    # its factored operators keep their factors within the budget: a caller may build one on
    # all its data and draw the Gauss-Newton of row subsets from it (FactoredOperator.on_rows)
    build.keeps_factors = True
    return build


def no_second_order(fm: FunctionalModel, params) -> str | None:
    """The name of an ``nn.EmbeddingBag`` whose weight is in ``params`` (its Gauss-Newton and
    Hessian products need forward AD or a double backward, which torch does not have), else None."""
    return next((name for name, m, _ in attributed_embeddings(fm.module, params)
                 if isinstance(m, torch.nn.EmbeddingBag)), None)


def _frozen_rows(fm: FunctionalModel, params, data) -> Tensor | None | bool:
    """Flat indices of the padding rows of ``params`` (``None``: no such row).

    Reverse mode gives a padding row no gradient, forward mode (``jvp``) gives it one, so
    ``gnvp`` alone is ``J_rev^T H J_fwd``, not symmetric. With ``P`` zeroing these rows,
    ``P (J_rev^T H J_fwd) P = J_rev^T H J_rev``, the operator reverse mode's gradients live in.
    ``False`` where the weight is held by another module too, or a vjp on the first two
    examples moves a padding row (the weight is also used elsewhere, e.g. a tied output head):
    then only a reverse-only product is consistent. A weight read by the forward outside its
    modules is seen only where those first examples read it.
    """
    from torch.func import vjp, vmap

    from .._checks import batch_size, batch_slice, iter_batches

    pads = padding_rows(fm.module, params)
    if not pads:
        return None
    own = dict(fm.module.named_parameters())
    uses = Counter(id(t) for _, t in fm.module.named_parameters(remove_duplicate=False))
    if any(uses[id(own[k])] > 1 for k in pads):
        return False  # held by another module too: the first examples cannot rule its use out
    first = next(iter(iter_batches("gauss_newton", "data", data, ordered=False)))
    head = batch_slice(first, 0, min(2, batch_size("gauss_newton", "data", first)))
    out, vjp_fn = vjp(lambda p: vmap(fm.forward, in_dims=(None, 0))(p, head), dict(params))
    gen = torch.Generator().manual_seed(0)
    grads = vjp_fn(tree_map(lambda t: torch.rand(t.shape, generator=gen, dtype=t.dtype).to(
        t.device) if isinstance(t, Tensor) and t.is_floating_point() else t, out))[0]
    index, start = [], 0
    for k, v in params.items():
        if k in pads:
            if grads[k][pads[k]].count_nonzero():
                return False
            width = v[0].numel()
            index.append(torch.arange(start + pads[k] * width, start + (pads[k] + 1) * width))
        start += v.numel()
    return torch.cat(index).to(next(iter(params.values())).device)


def _masked(op: LinOp, index: Tensor) -> LinOp:
    """``V -> P op(P V)``, ``P`` zeroing the columns ``index`` (see :func:`_frozen_rows`)."""
    return LinOp(lambda V: op.matmat(V.index_fill(1, index, 0)).index_fill_(1, index, 0),
                 op.dim, op.dtype, op.device, name=op.name)


def _vmaps(fm: FunctionalModel, params, data) -> bool:
    """Whether ``vmap(fm.forward)`` runs on the first two examples of ``data`` (a probe)."""
    from .._checks import batch_size, batch_slice, blame_data, iter_batches

    first = next(iter(iter_batches("gauss_newton", "data", data, ordered=False)))
    head = batch_slice(first, 0, min(2, batch_size("gauss_newton", "data", first)))
    with torch.no_grad(), blame_data("gauss_newton", "data", head):
        fm.forward(params, tree_map(lambda t: t[0] if isinstance(t, Tensor) else t, head))
    try:  # the examples are fine: only vmap itself can fail below
        with torch.no_grad():
            torch.func.vmap(fm.forward, in_dims=(None, 0))(params, head)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True
