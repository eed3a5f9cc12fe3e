"""TRAK's capture pass for a plain MLP and its classification margin, without the capture engine.

For ``nn.Linear`` or ``nn.Sequential(Linear, act..., Linear, ..., Linear)`` as
:func:`~dattri_fn.transforms.mlp_io.mlp_chain` certifies it (exact types, no hooks, each Linear
and parameter used once, activations in :data:`~dattri_fn.transforms.mlp_io.ACTIVATIONS`) and the
loss :func:`~dattri_fn.attribute.outputs.classification_margin_loss` on int64 labels, one pass at
checkpoint ``c`` gives every layer's input ``a_l`` and output gradient ``g_l = dm/dz_l`` of the
summed margins ``m``:

    z_1 = a_1 W_1^T + b_1                  (no graph: no tensor of it requires grad)
    z_1 -> act -> z_2 -> ... -> z_L -> m   (graph from the leaf z_1 onward)
    (g_1, ..., g_L) = autograd.grad(sum_i m_i, (z_1, ..., z_L))

the capture engine's graph (:func:`~dattri_fn.transforms.layers.batched_io`) from its first
layer's output on: there that output is its own probe (a leaf weight alias, never run
backward), every later layer's output is a probe reached through the same ``F.linear`` and
activation nodes, and the loss is the same call, ``summed_losses(loss_fn, z_L, target, rows=)``.
The same kernels run on the same operands, so ``(a, g)`` and the per-example margins are the
engine's bit for bit (tests/test_trak_mlp.py); what it saves is the engine's ``functional_call``,
capture mode and probes.

Its plan is decided without the plan check's autodiff comparison (the lead's decision for
mlp_io-certified MLPs, issue 14, stop 25, carried here to the margin, a loss of each row alone):
each Linear runs once on ``[B, in]``, so example ``i``'s weight gradient is ``g_i a_i^T``
exactly. What the check refuses besides the comparison is left to it: the pass declines (the
engine and its check run, raising as before) on anything it does not certify, and a first
batch of one example (checked, not held, as before).

The decided plan is the check's except where the check itself would have gone dense on
rounding alone: it compares the batched pass with batch-of-1 autodiff rows, and on logits of
~1e5 and more with nearly tied classes their GEMM rounding can exceed its tolerance (it warns
and decides ``dense=True``). Here the plan stays flat, silently: the scores are the same
(torch.equal, both layouts hold the same ``g_i a_i^T``) but ``TRAKState.plan`` and the state's
hash differ from the check's (review RB F2, stop 25).

A batch input that requires grad is read detached, as the engine's probes read it: no state or
score carries a graph into the caller's tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import bridge_of, default_unpack
from ..transforms import mlp_io as _mlp_io
from ..transforms.layer_grads import LayerPlan, PlanDecisions, decided_plan
from ..transforms.layer_grads_paths import _assemble
from ..transforms.layers_losses import summed_losses
from ..transforms.mlp_io import ACTIVATIONS, mlp_chain
from .outputs import _class_labels, _gather_labels, classification_margin_loss


def margin_io(plan: LayerPlan, params: dict, batch, losses: list | None = None,
              memo: dict | None = None) -> dict | None:
    """``{layer: (a [B, in], g [B, out])}`` of ``plan``'s Linear layers at ``params`` (one
    checkpoint), the capture engine's bit for bit (module docstring), or None where that is not
    certain (nothing has run then). ``losses``: receives the per-example margins ``[B]``.
    ``memo``: a dict one batch's checkpoints share (:func:`margin_pass`): what does not depend
    on the params (the gate, the certified chain, the unpacked batch, the checked labels) is
    found by the first checkpoint's call and read by the others."""
    model = plan.model
    if memo and "chain" in memo:
        chain, x, target = memo["chain"], memo["x"], memo["target"]
    else:
        if model.loss_fn is not classification_margin_loss or not _mlp_io.plain_context():
            return None
        chain = mlp_chain(model.module)
        if chain is None or set(plan.layers) != {n for n, _, _ in chain}:
            return None
        args, kwargs, target = (model.unpack or default_unpack)(batch)
        if len(args) != 1 or kwargs:
            return None
        x = args[0]
        if memo is not None:
            memo.update(chain=chain, x=x, target=target)
    weights = _mlp_io.chain_weights(chain, {**model.fixed, **params}, x, target, frozen=True)
    if weights is None or x.shape[1] != weights[0][0].shape[1]:  # the engine raises its own error
        return None
    ins, outs = [], []
    with torch.no_grad():
        z = F.linear(x, *weights[0])
    with torch.enable_grad():
        h = z.requires_grad_(len(chain) > 1)
        ins.append(x.detach())  # the engine's probes read the input detached
        outs.append(z)
        for i, (_, _, acts) in enumerate(chain):
            if i:
                ins.append(h.detach())
                h = F.linear(h, *weights[i])
                outs.append(h)
            for act in acts:
                h = ACTIVATIONS[act][0](h)
        if h.shape[1] < 2:  # one logit (a binary margin): the loss's own graph
            if not h.requires_grad:  # a bare Linear: h is the leaf z
                h.requires_grad_()
            value = summed_losses(model.loss_fn, h, target, rows=losses)
            grads = torch.autograd.grad(value, outs)
        else:
            with torch.no_grad():
                rows, g, lab = _margin_head(h.detach(), target, None if not memo else
                                            memo.get("lab"))
            if memo is not None:
                memo["lab"] = lab
            if losses is not None:
                losses.append(rows)
            grads = (*torch.autograd.grad(h, outs[:-1], g), g) if len(outs) > 1 else (g,)
    return {name: (a, g) for (name, _, _), a, g in zip(chain, ins, grads, strict=True)}


def example_ok(plan: LayerPlan | None, fn, params: dict, batch) -> bool:
    """Whether ``fn(params, example 0 of batch)`` (TRAK's boundary call of ``output_fn``,
    :func:`~dattri_fn.attribute.boundary.check_example_fn`) certainly returns a scalar without
    raising: ``fn`` the loss of ``plan``'s model and :func:`~dattri_fn.model.functional_model`'s
    own loss closure of the margin (not a replaced ``loss``), bound to that model's module with
    the default unpack, the module a plain MLP that :func:`~dattri_fn.transforms.mlp_io.mlp_chain`
    certifies whose parameter names are still the bound ones, ``params`` the bound keys and
    shapes, ``batch`` an ``(x [B, in], y [B])`` pair that :func:`mlp_io.chain_weights` takes,
    the layers' widths chained from ``in`` to ``K >= 2`` logits and ``0 <= y_0 < K``. Then that
    call is one Linear/activation forward of ``x_0`` and the margin of its label: a scalar (NaN
    inputs give a NaN scalar, not an error). False (not certain): the caller makes the call."""
    model = None if plan is None else plan.model
    if model is None or model.loss is not fn or type(batch) not in (tuple, list) \
            or len(batch) != 2 or not _mlp_io.plain_context():
        return False
    # what the call reads is what its closure bound (its Bridge mark), not the model's fields:
    # a replaced loss (fm._replace(loss=...)) may return anything (review RA H1, stop 26)
    bound = bridge_of(fn)
    if bound is None or bound.loss_fn is not classification_margin_loss \
            or bound.module is not model.module or bound.unpack is not default_unpack \
            or bound.ties or bound.shared or params.keys() != bound.expected \
            or any(v.shape != bound.shapes[k] for k, v in params.items()):
        return False
    chain, fixed = mlp_chain(model.module), bound.fixed
    # a module edited after binding (a bias set to None): its strict call refuses the bound
    # names, so the chain must read exactly those (review RA L1)
    if chain is None or _chain_names(model.module, chain) != fixed.keys() | bound.expected:
        return False
    x, y = batch
    weights = _mlp_io.chain_weights(chain, {**fixed, **params}, x, y, frozen=True)
    if weights is None:
        return False
    width = x.shape[1]
    for W, b in weights:
        if W.ndim != 2 or W.shape[1] != width or (b is not None and b.shape != W.shape[:1]):
            return False
        width = W.shape[0]
    return width >= 2 and y.shape[0] > 0 and 0 <= int(y[0]) < width


def _chain_names(module, chain: list) -> set | None:
    """The state names a certified chain's Linear layers hold (weight, and bias where set), or
    None where ``module`` holds any other parameter, buffer or submodule (a strict call would
    want its name too): a walk of the slot dicts, not of ``named_parameters``."""
    names = set()
    for name, lin, _ in chain:
        pre = f"{name}." if name else ""
        names.add(pre + "weight")
        if lin._parameters["bias"] is not None:
            names.add(pre + "bias")
    held = 0
    for m in (module,) if type(module) is nn.Linear else (module, *module._modules.values()):
        d = vars(m)
        if d["_buffers"] or (d["_modules"] and (m is not module or type(m) is nn.Linear)):
            return None
        for v in d["_parameters"].values():
            if v is not None:
                held += 1
    return names if held == len(names) else None


def _margin_head(z: Tensor, target: Tensor, lab: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``(m, dm/dz, labels [B, 1])`` of the margins ``m = z_y - logsumexp(z with z_y = -inf)`` of ``[B, K]``
    logits (``K >= 2``), the same bits as :func:`~dattri_fn.attribute.outputs.margins` and
    autograd's backward of ``sum(m)``: the same labels check, gather, scatter and logsumexp,
    then the backward's nodes as autograd's formulas write them: logsumexp's ``grad * (s -
    r).exp()`` with ``grad = -1`` (an exact negation), scatter's ``grad.scatter(1, y, 0)`` and
    gather's ``zeros.scatter_add(1, y, 1)``, summed: ``-e`` off the label plus ``+0`` (which
    turns a ``-0`` into ``+0``), ``0 + 1`` at it."""
    func = "classification_margin_loss"
    if lab is None:  # ``lab``: the same target's labels, checked for these K logits already
        lab = _class_labels(func, target, z.shape[1], batched=True)[:, None]
    own = _gather_labels(func, z, lab, "labels").squeeze(1)
    s = z.scatter(1, lab, float("-inf"))
    r = s.logsumexp(1)
    g = (s - r[:, None]).exp_().neg_()
    return own - r, g.scatter_(1, lab, 0.0).add_(0.0).scatter_(1, lab, 1.0), lab


def fast_plan(plan: LayerPlan) -> bool:
    """Whether a checked (or decided) ``plan`` keeps flat Linear layers only: the pass applies."""
    return (plan.checked and not (plan.dense or plan.loop or plan.rest or plan.autodiff
                                  or plan.tie_factors or plan.norms or plan.ties or plan.bare)
            and len(plan.layout) == len(plan.layers)
            and all(kind == "flat" for _, kind in plan.layout)
            and all(plan.tapped.specs[n].kind == "linear" for n in plan.layers))


def pass_plan(plan: LayerPlan) -> LayerPlan | None:
    """The plan :func:`margin_pass` runs under for TRAK's ``plan`` (checked all-flat, or an
    unchecked one it may certify), else None: the capture engine and its check. (Tests and
    benchmarks/trak_mlp_ab.py switch the pass off by replacing this function.)"""
    return plan if fast_plan(plan) else certified(plan)


def certified(plan: LayerPlan) -> LayerPlan | None:
    """The decided all-flat plan of an unchecked ``plan`` whose model the pass may certify
    (then the first batch decides), else None."""
    if (plan.checked or not plan.layers or plan.rest or plan.norms or plan.ties or plan.bare
            or plan.tie_biases or plan.tie_factors
            or plan.model.loss_fn is not classification_margin_loss
            or any(plan.tapped.specs[n].kind != "linear" for n in plan.layers)
            or mlp_chain(plan.model.module) is None):
        return None
    return decided_plan(plan, PlanDecisions(plan.captured, False, False,
                                            tuple((n, "flat") for n in plan.layers)))


def margin_pass(plan: LayerPlan, stacked: dict, batch, losses: list | None = None, *,
                first: bool = False):
    """The :class:`~dattri_fn.transforms.factored_grads.LayerGrads` of ``batch`` at every
    checkpoint of ``stacked`` (``{key: [C, ...]}``) by :func:`margin_io`, as the capture
    engine's ``_factored`` assembles them under ``plan`` (decided, all flat), or None where a
    checkpoint's pass declines. ``losses``: its contents replaced by the C margins ``[B]`` on
    success. ``first``: the batch decides an unchecked plan: None unless it has 2 or more
    examples (the plan check then runs as before). No finiteness guard is needed there: a
    non-finite input is refused at TRAK's batch boundary before any pass, and finite inputs
    whose rows ``g_i a_i^T`` overflow reach TRAK's own scan of the captured rows, which names
    the parameter with the check's NonFiniteGradient message (tests/test_trak_mlp.py)."""
    C = next(iter(stacked.values())).shape[0]
    got = [] if losses is not None else None
    raw, memo = None, {}
    for c in range(C):
        io = margin_io(plan, {k: v[c] for k, v in stacked.items()}, batch, got, memo)
        if io is None or (first and c == 0 and next(iter(io.values()))[0].shape[0] < 2):
            return None
        if raw is None:
            raw = {n: tuple(t.new_empty((C, *t.shape)) for t in pair) for n, pair in io.items()}
        for n, pair in io.items():
            for dst, t in zip(raw[n], pair, strict=True):
                dst[c] = t
        del io
    if losses is not None:
        losses[:] = got
    return _assemble(plan, {n: raw[n] for n in plan.layers}, {}, lead=2)[0]
