"""K-FAC and EK-FAC statistics: the factor passes over the data and the states they return
(see :mod:`dattri_fn.operators.kfac` for the method and its conventions)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._checks import _msg, batch_size, check_optional_int, regroup
from .._order import SEEDED_ORDER, check_order
from ..model import check_eval_module
from ..transforms import capture
from ..transforms.layers import _stream_layer_io
from ..transforms.padding import Positions, real_gram
from .kfac_check import Rows, mismatched
from .kfac_diag import diagonal_sums, warn_outside
from .kfac_fisher import _expected_io, _ExpectedLoss, fisher_losses
from .kfac_layers import _capture_layers, _check_call_parts, _keys
from .kfac_moves import (  # noqa: F401 (old import paths)
    _OTHERS,
    _check_dtype,
    _check_reduce,
    _count,
    _fill_unreached,
    _reduced,
    _refuse,
    _uncaptured,
    _without,
    _zero_factor,
)
from .kfac_tied import tied_steps

__all__ = ["KFACFactors", "EKFACFactors", "kfac_factors", "ekfac_factors"]  # noqa: F822 (__getattr__)


class KFACFactors(NamedTuple):
    """K-FAC state: per-layer Kronecker factors and the raveled layout they act on.

    Fields:
        A: ``{layer: [in(+1), in(+1)]}`` input second moments (``+1`` when the bias is a param).
        G: ``{layer: [out, out]}`` output-gradient second moments.
        param_names: the selected params' names in ravel order (defines the operator's layout).
        num_examples: ``N``, the examples the factors average over (int64 scalar tensor).
        transposed: layers whose weight is stored ``[in, out]`` (Hugging Face ``Conv1D``).
        diagonal: ``{key: [*shape]}`` the Fisher diagonal ``E[g^2]`` of each param outside the
            Kronecker layers (:mod:`.kfac_diag`); empty when every param is a layer's.
    """

    A: dict[str, Tensor]
    G: dict[str, Tensor]
    param_names: tuple[str, ...]
    num_examples: Tensor
    transposed: tuple[str, ...] = ()
    diagonal: dict[str, Tensor] = {}  # noqa: RUF012 (never mutated: states are values)


class EKFACFactors(NamedTuple):
    """EK-FAC state: per-layer Kronecker eigenbases, corrected eigenvalues and the layout.

    Fields:
        QA: ``{layer: [in(+1), in(+1)]}`` eigenvectors of ``A`` (columns).
        QG: ``{layer: [out, out]}`` eigenvectors of ``G`` (columns).
        Lambda: ``{layer: [out, in(+1)]}`` ``E[(Q_G^T DW_n Q_A)^2]``, the Fisher's diagonal in
            that basis.
        param_names: the selected params' names in ravel order.
        num_examples: ``N`` (int64 scalar tensor).
        transposed: layers whose weight is stored ``[in, out]`` (Hugging Face ``Conv1D``).
        diagonal: ``{key: [*shape]}`` as :class:`KFACFactors`' (EK-FAC's rule in the identity
            basis).
    """

    QA: dict[str, Tensor]
    QG: dict[str, Tensor]
    Lambda: dict[str, Tensor]
    param_names: tuple[str, ...]
    num_examples: Tensor
    transposed: tuple[str, ...] = ()
    diagonal: dict[str, Tensor] = {}  # noqa: RUF012 (never mutated: states are values)


_LAMBDA_ENTRIES = 2**16  # entries of one chunk of rotated gradient blocks in the Lambda pass


def _tokens(a: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """Flatten per-example token dims: ``a -> [B, T, in(+1)]``, ``g -> [B, T, out]``."""
    B = a.shape[0]
    a = a.reshape(B, -1, a.shape[-1])
    g = g.reshape(B, -1, g.shape[-1])
    if bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a, g


def _passes(func, batches, tapped, loss_fn, state, chunk_size, step, batch_rows=None,
            on_input=None, pooled=None, rows: Rows | None = None,
            positions: Positions | None = None):
    """Run ``step(layer, a, g)`` on every batch; return the number of examples seen.

    Each layer's step runs as its ``g`` arrives in the backward pass
    (:func:`~dattri_fn.transforms.layers.streamed_io`), so the layers' gradients are never all
    held at once. ``pooled(group, parts)``: a tied group's step (:func:`.kfac_tied.tied_steps`).
    ``rows``: receives the first batch (:mod:`.kfac_check`). ``positions``: started at every
    batch (its padding, :mod:`dattri_fn.transforms.padding`).
    """
    n = 0
    stream = _expected_io if isinstance(loss_fn, _ExpectedLoss) else _stream_layer_io
    # a tied group is one pooled layer
    step, on_input = tied_steps(tapped, step, on_input, pooled)
    for batch in regroup(batches, batch_rows, func):
        if rows is not None and rows.first is None:
            rows.first = batch
        n += batch_size(func, "data", batch, first=n)
        if positions is not None:
            positions.start(batch)
        stream(tapped, loss_fn, state, batch, chunk_size, step, on_input)
    if n == 0:
        raise ValueError(_msg(func, "data", "at least one batch", "no batches"))
    return n


def _transposed(tapped) -> tuple[str, ...]:
    return tuple(n for n, sp in tapped.specs.items() if sp.kind == "conv1d")


_HELD_ENTRIES = 2**22
_TAKE = object()  # on_input's mask: the batch's, as the layer's rows take it


def _own(t: Tensor) -> Tensor:
    """``t``, or a copy when it is a view into a larger storage (a head on ``h[:, 0]``): a held
    view would keep its whole base alive, past what ``_HELD_ENTRIES`` counts."""
    return t if t.untyped_storage().nbytes() <= t.numel() * t.element_size() else t.clone()


def _kfac_core(func, state, names, param_names, batches, tapped, loss_fn, chunk_size,
               batch_rows=None, reduce=None, held: list | None = None,
               rows: Rows | None = None):
    """The K-FAC pass (:func:`_kfac_sums`), its sums reduced over processes and divided by
    ``N``: the factors."""
    A, G, n = _kfac_sums(func, state, names, param_names, batches, tapped, loss_fn, chunk_size,
                         batch_rows, held, rows)
    sums, n = _reduced(func, reduce, {**{f"A:{k}": A[k] for k in names},
                                      **{f"G:{k}": G[k] for k in names}}, n)
    A = {k: sums[f"A:{k}"] / n for k in names}
    G = {k: sums[f"G:{k}"] / n for k in names}
    return KFACFactors(A, G, param_names, torch.tensor(n, dtype=torch.int64), _transposed(tapped))


def _kfac_sums(func, state, names, param_names, batches, tapped, loss_fn, chunk_size,
               batch_rows=None, held: list | None = None, rows: Rows | None = None):
    """The K-FAC pass over this process's data: ``(A sums, G sums, examples)``. ``held``: a
    list that receives every ``(layer, a, g)`` the pass captures, in the order a second pass
    would see them, while they total at most ``_HELD_ENTRIES`` entries (past it the list is
    emptied and ``None`` appended). ``rows``: receives the first batch and each layer's first
    rows of ``(a, g)`` (:mod:`.kfac_check`)."""
    bias = {n: _keys(n)[1] in param_names for n in names}
    A, G = {}, {}
    inputs: dict[str, list] = {}  # held layer inputs waiting for their g
    count = [0]

    def hold(t: Tensor) -> bool:
        count[0] += t.numel()
        if count[0] <= _HELD_ENTRIES:
            return True
        if not held or held[-1] is not None:
            held.clear()
            inputs.clear()
            held.append(None)
        return False

    # A is taken from each layer's input right after the forward, G as each g arrives in the
    # backward: no layer input is held through the backward pass (unless ``held`` asks).
    def on_input(layer, a, real=_TAKE):
        if rows is not None:
            rows.on_input(layer, a)
        if held is not None and hold(a):
            inputs.setdefault(layer, []).append(_own(a))
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        if real is _TAKE:
            real = positions.take(layer, a)
        if real is not None:
            dA = real_gram(a, real, bias[layer])
        else:
            if bias[layer]:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            a2 = a.reshape(-1, a.shape[-1])
            dA = (a2.T @ a2).div_(a.shape[1])  # scaled after the product: no [B, T, in] copy
        if layer in A:
            A[layer] += dA
        else:
            A[layer] = dA

    def step(layer, _, g):
        if rows is not None:
            rows.on_grad(layer, g)
        if held is not None and hold(g):
            held.append((layer, inputs[layer].pop(0), _own(g)))
        g2 = g.reshape(-1, g.shape[-1])
        dG = g2.T @ g2
        if layer in G:
            G[layer] += dG
        else:
            G[layer] = dG

    def pooled(group, parts):  # a tied group: G's one-hot share is diag(token counts)
        if rows is not None:
            rows.on_pooled(group, parts)
        a_p, T = parts.ins(), parts.h.shape[1]
        real = positions.take(group, a_p, (T, parts.u.shape[1]))
        if real is not None:  # a pad's one-hot "out" is not counted in G (its u is 0)
            parts = parts._replace(ids=parts.ids.masked_fill(~real[:, T:], -1))
        on_input(group, a_p, real)
        dG = parts.gram()
        G[group] = dG if group not in G else G[group].add_(dG)

    positions = Positions(func, tapped.module)
    n = _passes(func, batches, tapped, loss_fn, state, chunk_size, step, batch_rows, on_input,
                pooled if not isinstance(loss_fn, _ExpectedLoss) else None, rows, positions)
    _fill_unreached(func, tapped, names, A, G)
    return A, G, n


def kfac_factors(module: nn.Module, loss_fn: Callable, params, data, *,
                 layers: str | Iterable[str] | None = None,
                 chunk_size: int | None = None, tapped=None,
                 batch_rows: int | None = None,
                 fisher: str = "empirical", seed: int = 0,
                 sampler: Callable | None = None, reduce: Callable | None = None,
                 dtype: torch.dtype | None = None, others: str | None = None) -> KFACFactors:
    """Return K-FAC factors ``A = E[(1/T) sum_t a a^T]``, ``G = E[sum_t g g^T]`` per Linear layer.

    ``T``: the example's positions; in a batch with an ``attention_mask``, its real ones only
    (:mod:`dattri_fn.transforms.padding`: pads do not enter ``A``).

    One pass over ``data``, accumulating running sums batch by batch (activations are never
    held beyond one batch). ``a`` is augmented to ``[a, 1]`` for layers whose bias is in
    ``params``. See the module docstring for the sequence convention.

    Args:
        module: the model (its layers captured by :mod:`dattri_fn.transforms.capture`).
        loss_fn: ``loss_fn(output, target) -> Tensor[]`` on a batch of one example.
        params: ``dict[str, Tensor]``, the weights (and optionally biases) of the Linear layers
            to precondition, in the order of the raveled vectors the operator will act on.
            The module's other parameters are its own. A weight tied between an Embedding and
            a Linear (GPT-2's ``transformer.wte.weight`` = ``lm_head.weight``) is one pooled
            ``[V, d]`` layer named after the Embedding (:mod:`.kfac_tied`).
        data: a Batch ``(*inputs, target)`` or a re-iterable of them (list, DataLoader); other
            layouts as :func:`dattri_fn.transforms.layers.unpack_example`.
        layers: Linear, Conv1D or Conv2d layer names; ``None`` selects the layers owning
            ``params``.
        chunk_size: examples per ``vmap`` chunk; ``None`` for a whole batch.
        tapped: :func:`kfac_tap` of the selected layers, to reuse across calls; ``None``
            builds it anew.
        batch_rows: merge consecutive batches into calls of at least this many examples (one
            batched forward/backward has a fixed cost of ~0.3 ms on one CPU thread); ``None``
            takes the batches as given.
        fisher: ``"empirical"`` (``g`` of the data's targets), ``"true"`` (``g`` of targets
            drawn from the model's predictive distribution, one draw per example and pass,
            kronfluence's default) or ``"expected"`` (the exact expectation over that
            distribution: ``G = E[J^T H J]`` with ``H`` the loss's Hessian in the output, the
            layer blocks of the Gauss-Newton; ``K`` backprops per example of the columns of
            ``H = B B^T``, ``A`` counted once): softmax cross-entropy on ``[B, C]`` logits
            (``H = diag(p) - p p^T``, ``K = C``) or ``F.mse_loss`` (``H = (2/D) I``, ``K = D``
            output entries); other losses are refused.
        seed: the true Fisher's draws: a ``torch.Generator`` seeded with it starts every pass,
            so equal data give equal draws.
        sampler: ``sample(output, target, generator) -> target'`` on a batch (see
            :mod:`dattri_fn.losses`); None = ``loss_fn.sample`` if the loss has one, else
            :func:`~dattri_fn.losses.sample_categorical` for softmax cross-entropy (logits
            ``[B, K]``), :func:`~dattri_fn.losses.sample_bernoulli` for one-logit
            ``binary_cross_entropy_with_logits``; ``fisher="true"`` on any other loss is
            refused (pass a sampler, or ``fisher="empirical"``).
        reduce: ``reduce(sums, count) -> (sums, count)``, called once per pass with this
            process's statistic sums over its examples (a dict of tensors whose keys carry
            their pass's prefix: ``"A:"``/``"G:"`` for the K-FAC pass, ``"D:"`` for the
            diagonal pass, which runs when params lie outside the Kronecker layers) and its
            example count; returns the sums and count over every process (an all-reduce:
            :func:`dattri_fn.distributed.all_reduce_stats`). None: this process's data is all.
            The K-FAC pass's call also carries ``"R:<layer>"`` (a scalar: 1 where this
            process's data made the layer leave the Kronecker layers, by the per-example check
            of :mod:`.kfac_check` or the capture engine's refusal, else 0; that layer's ``A``/``G``
            are then zeros) for every selected layer: a layer with a nonzero total takes the
            diagonal block on EVERY process, so all of them send the same keys to every call.
        dtype: store the factors in this dtype (e.g. ``torch.bfloat16``: half the memory, the
            statistics still accumulated in the model's dtype); the inverses compute in their
            operand's dtype. None: the model's dtype.
        others: the params outside the selected Kronecker layers (LayerNorms, a positional
            ``nn.Embedding``, a bias without its layer's weight, a tied weight that cannot be
            pooled): ``None`` (default) gives them their exact Fisher diagonal ``E[g^2]`` as a
            block of its own (:mod:`.kfac_diag`, one more pass over ``data``) after ONE warning
            naming each key and why it is outside; ``"diagonal"`` does the same without the
            warning; ``"error"`` refuses them (the behaviour before stop 20).

    Returns:
        :class:`KFACFactors`.

    Raises:
        TypeError, ValueError: bad module, loss_fn, layer names, data, chunk_size or
            others; params with keys that are not module parameters; with ``others="error"``,
            keys that are not weights/biases of the selected layers or a tied weight that
            cannot be pooled (the keys are named); ``fisher="expected"`` with a tied weight or
            with params outside the Kronecker layers.

    References:
        Martens & Grosse 2015, arXiv:1503.05671; Grosse et al. 2023, arXiv:2308.03296.
    """
    kf, _ = _checked_kfac_pass("kfac_factors", module, loss_fn, params, data, layers, chunk_size,
                               tapped, batch_rows, fisher, seed, sampler, reduce, dtype, others)
    if dtype is None:
        return kf
    return kf._replace(A={k: v.to(dtype) for k, v in kf.A.items()},
                       G={k: v.to(dtype) for k, v in kf.G.items()},
                       diagonal={k: v.to(dtype) for k, v in kf.diagonal.items()})


def _checked_kfac_pass(func, module, loss_fn, params, data, layers, chunk_size, tapped,
                       batch_rows, fisher, seed, sampler, reduce, dtype, others=None,
                       held: list | None = None):
    """Validate the factor builders' arguments and run the K-FAC pass (and the diagonal pass of
    the params outside the Kronecker layers): ``(KFACFactors, (state, names, pnames, batches,
    tapped, chunk_size, losses))``, the latter for a second pass. ``held``: as
    :func:`_kfac_core`'s, filled only for the empirical or true Fisher without tied layers
    (the passes whose second run would capture the same ``(a, g)``)."""
    if others not in _OTHERS:
        raise ValueError(_msg(func, "others", "None, 'diagonal' or 'error'", repr(others)))
    check_eval_module(func, "module", module)  # train-mode Dropout: random A, G (review RF M1)
    (state, names, pnames, batches, tapped, chunk_size), rest = _check_call_parts(
        func, module, loss_fn, params, data, layers, chunk_size, tapped, tied=True,
        others="error" if others == "error" else "diagonal")
    check_optional_int(func, "batch_rows", batch_rows)
    _check_reduce(func, reduce)
    _check_dtype(func, dtype)
    losses = fisher_losses(func, loss_fn, fisher, seed, sampler)
    if fisher == "true":  # the seeded labels fall on rows by position (review RH LOW-2)
        check_order(func, "data", data, why=SEEDED_ORDER.format(what="label", of="factors"))
    if fisher == "expected" and tapped.tied:
        raise ValueError(_msg(func, "fisher", "'empirical' or 'true' with a tied weight in "
                              "params (its pooled A would take the embedding's gradients once "
                              "per output direction)", f"'expected' with tied layers "
                              f"{[list(t) for t in tapped.tied]}", "Use fisher='true', or "
                              "leave the tied weight out of params."))
    if rest and fisher == "expected":
        diagonal_sums(func, module, losses(), state, list(rest), (), chunk_size)  # refuses
    # Every decision that drops a Kronecker layer (the capture engine's refusal, the check) is
    # taken on this process's data BEFORE its sums are reduced, and reduced with them as a
    # count "R:<layer>" over the layers every process selected (zeros for the ones it dropped):
    # under a sharded ``reduce`` each process then sends the same keys and drops the same
    # layers, whatever its own data showed.
    chosen, local, tap0 = list(names), {}, tapped
    keep = held if fisher != "expected" and not tapped.tied else None
    A, G, n = {}, {}, 0
    while chosen:
        live = [m for m in chosen if m not in local]
        rows, loss = Rows(), losses()
        if not live:
            n = _count(func, batches, batch_rows) if reduce is not None else 0
            break
        try:
            A, G, n = _kfac_sums(func, state, live, pnames, batches, tapped, loss, chunk_size,
                                 batch_rows, keep, rows)
        except capture.CaptureError as err:  # a layer the engine refuses on this data
            new = _uncaptured(live, tapped, err)
            if reduce is None:  # alone: refuse now, not after the pass
                _refuse(func, new, fisher, others)
            local.update(new)
            tapped = capture.tap(module, _capture_layers(
                module, [m for m in chosen if m not in local], params), tied=True)
            if keep is not None:
                keep.clear()
            continue  # the pass again, without them, from its first batch
        local.update(mismatched(func, module, loss, state, live, pnames, tapped, rows))
        break
    bad = local
    if chosen and reduce is not None:
        A = {m: A[m] if m in A else _zero_factor(tap0, m, pnames, state, 0) for m in chosen}
        G = {m: G[m] if m in G else _zero_factor(tap0, m, pnames, state, 1) for m in chosen}
        sums, n = _reduced(func, reduce, {
            **{f"A:{m}": A[m] for m in chosen}, **{f"G:{m}": G[m] for m in chosen},
            **{f"R:{m}": A[m].new_tensor(float(m in local)) for m in chosen}},
            n)
        A = {m: sums[f"A:{m}"] for m in chosen}
        G = {m: sums[f"G:{m}"] for m in chosen}
        bad = {m: local.get(m, f"layer {m!r}: another process's data moved it (the check or "
                               "the capture engine, see that process)")
               for m in chosen if float(sums[f"R:{m}"]) > 0}
    if bad:
        names, rest = _without(func, chosen, pnames, rest, bad, fisher, others)
        if held:  # the Lambda replay takes the Kronecker layers only
            held[:] = [h for h in held if h is None or h[0] in names]
    if names:
        kf = KFACFactors({m: A[m] / n for m in names}, {m: G[m] / n for m in names}, pnames,
                         torch.tensor(n, dtype=torch.int64),
                         tuple(m for m in _transposed(tapped) if m in names))
    else:  # every param outside Kronecker layers: the diagonal is the whole operator
        kf = KFACFactors({}, {}, pnames, torch.tensor(0, dtype=torch.int64), ())
    if rest and others is None:
        warn_outside(func, rest)
    if rest:
        sums, n = diagonal_sums(func, module, losses(), state, list(rest), batches, chunk_size,
                                batch_rows)
        sums, n = _reduced(func, reduce, {f"D:{k}": v for k, v in sums.items()}, n)
        if names and n != int(kf.num_examples):
            raise ValueError(_msg(func, "data", f"the same {int(kf.num_examples)} examples on "
                                  "every pass", f"{n} on the diagonal pass"))
        kf = kf._replace(diagonal={k: sums[f"D:{k}"] / n for k in rest},
                         num_examples=torch.tensor(n, dtype=torch.int64))
    return kf, (state, names, pnames, batches, tapped, chunk_size, losses)


def __getattr__(name: str):
    """``ekfac_factors`` moved to :mod:`.kfac_ekfac` (stop 25); imported on first use here, as
    that module reads this one's names at call time (so tests' patches of ``_passes`` apply)."""
    if name == "ekfac_factors":
        from .kfac_ekfac import ekfac_factors

        return ekfac_factors
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
