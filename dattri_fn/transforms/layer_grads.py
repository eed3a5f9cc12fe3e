"""Per-example gradients with Linear-like layers kept in factored form (hook-free).

For a layer ``z = W a + b`` applied at positions ``t`` (one position for a plain ``[B, in]``
input), example ``i``'s gradient is ``dW_i = sum_t g_it a_it^T``, ``db_i = sum_t g_it``, with
``a`` the layer input and ``g = dloss_i / dz``. With ``ã = [a, 1]`` (bias appended) two
examples' gradients meet without ever forming ``dW``:

    <grad_i, grad_j>_layer = sum_{t,s} (ã_it . ã_js) (g_it . g_js)

which costs ``in + out`` per pair instead of ``in * out`` (no ``[B, P]`` matrix, no
``[B, P] x [P, n]`` product). ``a`` and ``g`` come from ONE batched forward and backward through
the capture engine (:mod:`dattri_fn.transforms.capture`: zero probes on the layer outputs, no
trace, no hooks), for ``nn.Linear``, HF ``Conv1D`` (transposed weight), ``nn.Conv2d``
(unfolded patches) and ``nn.Embedding`` (whose rows are materialised per example from the
same pass; so are an affine ``nn.LayerNorm``'s, written into the dense block); every other
attributed parameter keeps dense ``vmap(grad)`` gradients (a loop of one backward pass per
example where vmap cannot run the model).

Plans are values, built once and applied many times: :func:`layer_plan` selects the layers,
:func:`check_plan` checks them on an example batch and returns a NEW, checked plan that records
every decision below; :func:`layer_grads_stacked` and :func:`per_sample_layer_grads` only read a
plan. One checked plan gives the same gradients for any batch, in any order, on any call.

Assumption of the batched path: the module treats the examples of a batch independently
(``module(X)[i] == module(X[i:i+1])[0]``), as every model in eval mode does. Layers with
several positions whose factored product would cost more than the dense one
(``T^2 (in + out) >= in * out``, T of the example batch) are materialised per example.

Safety (the check): a layer whose tensors the example batch shows used in a way the engine
cannot factor (a tied weight read by another op, a non-batch-first input, a grouped
convolution...) is computed densely after one warning naming it. The check then compares a few
examples' gradients with per-example autodiff; if they differ (a layer applied to a ``[T, B, d]``
tensor with ``T = B``, examples mixed inside the batch, ...) it warns and the checked plan
computes every gradient densely. A later batch that takes a path the example did not is
computed densely, that batch alone, after a warning. One exception to "the check saw the
path": a held checked plan of a plain softmax cross-entropy MLP (flat Linear layers only, at
any number of checkpoints) takes its batches' ``(a, g)`` from
:func:`~dattri_fn.transforms.mlp_io.mlp_io` (:func:`layer_grads_stream`), which the check does
not run; that path's equality with the engine rests on mlp_io's structural certification
(None, hence the engine, wherever it cannot certify it) and tests/test_mlp_io.py, as LoGra's
and FactGraSS's do. For the same reason such a model's plan is decided without the check at
all (:func:`certified_plan`, issue 14: every layer flat, at C >= 1 checkpoints; used by
:func:`check_plan`, the stream and Grad-Dot's prepare), the check still deciding wherever
mlp_io declines or the first examples' rows may not be finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .._checks import _msg, batch_size, batch_slice, batch_to
from .._types import Batch, Params
from ..model import FunctionalModel, check_bridged, check_eval
from . import capture
from .factored_grads import LayerGrads
from .layer_grads_certified import (  # noqa: F401  (certified_plan and its core, issue 14)
    _certified,
    _certified_grads,
    _mlp_factors,
    _mlp_grads,
    certified_plan,
)
from .layer_grads_gap import (  # noqa: F401  (the check's comparisons)
    _device_type,
    _gap,
    _gap_sums,
    _mismatch,
    _overall,
    tolerance,
)
from .layer_grads_narrow import _all_finite, _narrowed, _warn_dense

# every path helper stays importable from here, as before the split
from .layer_grads_paths import (  # noqa: F401
    _assemble,
    _autodiff_rows,
    _dense,
    _example_rows,
    _factored,
    _factored_and_rows,
    _loop_grads,
    _one_call_ok,
    _raw_batched,
    _raw_per_example,
    _raw_split,
    _shapes,
    _unpack,
    _vmap_failed,
    _warn_loop,
)
from .layer_grads_plan import (  # noqa: F401  (the plan as a value, importable from here)
    LayerPlan,
    PlanDecisions,
    _plan_of,
    decided_plan,
    keep_tie_factors,
    layer_plan,
    plan_decisions,
)
from .layers import input_signature


class NonFiniteExamples(ValueError):
    """The plan check's refusal of a batch whose first examples' own autodiff (``vmap(grad)``)
    gradients are NaN or inf: no gradient is right there, dense or factored. A ``ValueError``
    (callers that catch one are unchanged) naming ``layer_grads(batch=...)``; callers that name
    their own argument (TRAK) catch this class, not the message."""


def check_plan(plan: LayerPlan, params: Params, batch: Batch) -> LayerPlan:
    """Return ``plan`` checked on the example ``batch``: a new plan with every decision made.

    The check (module Note) drops the layers ``batch`` shows cannot be captured, runs one
    factored pass over ``batch`` at ``params`` and compares its first 3 examples' gradients with
    per-example autodiff, and fixes the layout of sequence layers and the vmap/loop fallback
    (its cost: that pass, 3 single-example forwards and one backward over their losses). On a
    batch of at most 3 examples at one checkpoint without dense parameters (what a method's
    ``prepare`` checks) it compares example 0's gradient with its autodiff row and the sum of
    the captured rows with the pass's own parameter gradient instead, one forward of one
    example and one autograd engine call in all (:func:`_gap_sums`: what each part catches,
    and the one case of the three rows it does not). Hold the returned plan:
    :func:`layer_grads_stacked` and :func:`per_sample_layer_grads` then apply it without
    checking again. A plan already checked is returned as it is.

    Args:
        plan: from :func:`layer_plan`.
        params: the attributed parameters ``{key: tensor}`` (``model.params``' keys), or ``C``
            checkpoints stacked ``{key: [C, ...]}``: with ``C >= 2`` the check also runs the
            path that maps over checkpoints.
        batch: an example Batch of at least 2 examples, laid out as the model's ``unpack``
            expects (one example cannot show examples mixed within a batch).

    Returns:
        the checked :class:`LayerPlan` (``checked=True``).

    Raises:
        TypeError, ValueError: a bad plan, params or batch; a batch that per-example autodiff
            rejects too (a wrong dtype or width) raises and leaves nothing decided.
    """
    func = "check_plan"
    if not isinstance(plan, LayerPlan):
        raise TypeError(_msg(func, "plan", "a LayerPlan from layer_plan(model)",
                             type(plan).__name__))
    if plan.checked:
        return plan
    stacked = _stacked(func, plan.model, params)
    n = batch_size(func, "batch", batch)
    if n < 2:
        raise ValueError(_msg(func, "batch", "at least 2 examples (one example cannot show "
                              "examples mixed within a batch)", f"{n}"))
    batch = batch_to(batch, next(iter(stacked.values())).device)
    return certified_plan(plan, stacked, batch) or _check(plan, stacked, batch)[0]


def _stacked(func: str, model: FunctionalModel, params: Params) -> Params:
    """``{key: [C, ...]}`` from params or stacked checkpoints, keys and shapes checked."""
    from .._checks import check_params

    params = check_params(func, "params", params)
    if list(params) != list(model.params):
        raise ValueError(_msg(func, "params", f"the keys {list(model.params)}", f"{list(params)}"))
    if all(v.shape == model.params[k].shape for k, v in params.items()):
        return {k: v.detach()[None] for k, v in params.items()}
    C = {v.shape[0] if v.ndim else None for v in params.values()}
    if len(C) == 1 and all(v.shape[1:] == model.params[k].shape for k, v in params.items()):
        return {k: v.detach() for k, v in params.items()}
    got = {k: list(v.shape) for k, v in params.items()}
    raise ValueError(_msg(func, "params", "model.params' shapes, or [C, *shape] for C stacked "
                          "checkpoints", f"{got}"))


def _check(plan: LayerPlan, stacked: Params, batch: Batch, *, keep_shapes: bool = True,
           losses: list | None = None, n: int | None = None) -> tuple[LayerPlan, LayerGrads]:
    """:func:`check_plan`'s bare core (``batch`` of 2 or more examples, on the params' device):
    the checked plan and ``batch``'s gradients at ``stacked`` from the pass that checked it.
    ``keep_shapes=False``: the plan's probe shapes are left out (a caller that keeps only
    :func:`plan_decisions`, which drop them anyway, skips the unpack and signature).
    ``losses``: as :func:`~dattri_fn.transforms.layer_grads_paths._factored`'s (the factored
    passes over the whole batch record them). ``n``: ``batch_size("layer_grads", "batch",
    batch)`` where the caller ran it already (its scan is not repeated)."""
    first = {k: v[:1] for k, v in stacked.items()}
    if n is None:
        n = batch_size("layer_grads", "batch", batch)
    k = min(n, 3)
    head = batch if n == k else batch_slice(batch, 0, k)
    # Plain torch.autograd.grad, not vmap: vmap's nll_loss batching rule imports sympy (~0.9
    # s on a first call) and some models (transformers' SDPA) refuse vmap. Examples that plain
    # autodiff rejects too (a wrong dtype or width) raise here and decide nothing: a bad batch
    # must not make a good model dense.
    ties = getattr(plan.tapped, "ties_any", True)
    why, active, loop, layout, shapes, lg = None, None, False, (), None, None
    passed = ref = sums = drop = None
    bad_data = False
    if n == k and _one_call_ok(plan, stacked):
        # the factored pass over the compared examples, the first one's reference row and the
        # pass's own parameter gradients, one engine call (_gap_sums); any error takes the two
        # separate calls below, which raise or decide as ever
        try:
            passed, ref, sums = _factored_and_rows(plan, stacked, batch, ties, n,
                                                   ref_at=(0, k - 1))
        except capture.CaptureError as err:  # the layers this very batch shows refused
            passed = ref = sums = None
            drop = err.problems
        except Exception:  # decided below, as without this shortcut
            passed = ref = sums = None
    if ref is None:
        ref = _example_rows(plan.model, {key: v[0] for key, v in first.items()}, head, ties)
    if n == k and passed is None and drop is None:
        # The batch is the examples compared: a factored pass that raises no CaptureError shows
        # what the narrowing forward would (no layer to drop), so that forward is skipped; any
        # error takes the full procedure below, which decides as before.
        try:
            passed = _factored(plan, stacked, batch, losses=losses)
        except capture.CaptureError as err:
            passed, drop = None, err.problems
        except Exception:  # decided below, as without this shortcut
            passed = None
    try:
        # a refusal on the compared examples themselves (n == k) names the layers the
        # narrowing forward would: they are dropped without that forward
        active = plan if passed is not None else _narrowed(plan, head, first, drop=drop)
        if active is not None and passed is None:
            # the narrowing forward can pass a layer the factored pass refuses: one on
            # sequence-first [T, B, D] tensors reads as batch-first where T = B, on the k head
            # examples (T = k) or, under vmap(grad) for dense parameters, where each example
            # is a batch of one (T = 1 = B fails, T = B = k passed). Such a refusal drops the
            # layers it names, once, and only those (a forward re-checks ties on this path)
            try:
                passed = _factored(active, stacked, batch, losses=losses)
            except capture.CaptureError as err:
                active = _narrowed(active, batch, first, drop=err.problems)
        if active is not None:
            # the whole batch in one factored pass: its first rows are checked, all are kept
            lg, loop, layout, shapes = passed or _factored(active, stacked, batch, losses=losses)
            gaps = (_gap(lg, ref, k, keyed=True) if sums is None
                    else _gap_sums(lg, ref, sums, k, at=(0, k - 1), keyed=True))
            err, scale = _overall(gaps)
            if sums is not None and not math.isfinite(err) and _all_finite(ref) \
                    and not _all_finite(sums):
                # review R5 F2: the rows compared are finite, the summed gradient is not (a
                # middle example's row, or only the float sum of finite rows, overflows): each
                # example's own row decides, as without the sum identity
                ref = _example_rows(plan.model, {key: v[0] for key, v in first.items()}, head,
                                    ties)
                gaps = _gap(lg, ref, k, keyed=True)
                err, scale = _overall(gaps)
            if not (math.isfinite(err) and math.isfinite(scale)):
                # review R4 F4: a tolerance of inf passed anything. Autodiff's own rows not
                # finite: no answer is right (refused below, outside this try); else the
                # captured rows are what is not finite: a mismatch
                bad_data = not _all_finite(ref)
                if not bad_data:
                    why = (f"they are not finite on its first examples where vmap(grad)'s are "
                           f"(max difference {err:.3g}, gradient scale {scale:.3g})")
            else:  # each key against its own scale (review RF2 MED-1)
                why = _mismatch(gaps, _device_type(stacked))
    except Exception as e:  # whatever the model's forward raises with probes
        why = f"the capture pass over this batch failed ({type(e).__name__}: {e})"
    if bad_data:
        raise NonFiniteExamples(_msg(
            "layer_grads", "batch", "examples whose per-example gradients are finite",
            f"NaN or inf in autodiff's gradient of its first {k} examples",
            "Their loss overflows or is undefined there: fix or drop those examples, or "
            "compute in float64."))
    base = plan if active is None else active
    dense = active is None or why is not None
    if why is not None:
        _warn_dense(plan, why)
    if dense:
        layout, shapes = (), None
        lg, loop = _dense(base, stacked, batch)
    known = ()
    if keep_shapes and shapes is not None and not loop:
        args, kwargs, _ = _unpack(plan.model)(batch)
        known = ((input_signature(args, kwargs), shapes),)
    return base._replace(checked=True, dense=dense, loop=loop, layout=layout, shapes=known,
                         tie_factors=plan.tie_factors), lg


def layer_grads_stacked(plan: LayerPlan, stacked: Params, batch: Batch) -> LayerGrads:
    """Return per-example gradients at ``C`` stacked checkpoints ``{key: [C, ...]}``, unchecked.

    A checked plan (:func:`check_plan`) is only read. An unchecked one is checked on this
    ``batch`` on every call (the checking pass gives the gradients): hold
    ``check_plan(plan, stacked, batch)`` or use :func:`layer_grads_fn` to pay that once.
    Blocks of different layouts still meet in :meth:`LayerGrads.scores`,
    :meth:`LayerGrads.row_dots` and :meth:`LayerGrads.cat`.
    """
    if not plan.checked:
        # a batch of one is checked too (its factors against autodiff on that example): it
        # cannot show examples mixed within a batch, but needs no dense [C, 1, P] either; a
        # certified MLP's is decided without the check (issue 14), the batch validated first
        # as the check does (review RA F1: a NaN past the first 3 examples is refused)
        n = batch_size("layer_grads", "batch", batch)
        checked, lg = _certified_grads(plan, stacked, batch, None)
        return lg if checked is not None else _check(plan, stacked, batch, n=n)[1]
    if plan.dense:
        return _dense(plan, stacked, batch)[0]
    try:
        return _factored(plan, stacked, batch)[0]
    except capture.CaptureError as err:  # this batch takes a path the example did not
        _warn_dense(plan, str(err), batch_only=True)
        return _dense(plan, stacked, batch)[0]


def layer_grads_fn(plan: LayerPlan) -> Callable[[Params, Batch], LayerGrads]:
    """Return ``(stacked, batch) -> LayerGrads`` for one stream of batches (one prepare or score).

    It checks ``plan`` (:func:`check_plan`) on the first batch of 2 or more examples it
    receives and applies that checked plan to every later batch, at any stacked checkpoints
    (a batch of one before it is checked on its own and not held: one example cannot show
    examples mixed within a batch); a plan already checked is applied from the first batch.
    ``plan`` itself is never changed: build one function per stream so each stream is checked
    on its own data, or pass a checked plan (:func:`decided_plan` of a state's decisions).
    """
    return layer_grads_stream(plan)[0]


def layer_grads_stream(plan: LayerPlan) -> tuple[Callable[[Params, Batch], LayerGrads],
                                                  Callable[[], LayerPlan]]:
    """Return ``(apply, held)``: :func:`layer_grads_fn`'s ``apply`` and ``held() -> LayerPlan``,
    the plan it applies now (checked once a batch of 2 or more examples has come), for a caller
    that keeps the check in its state (:func:`plan_decisions`).

    Within the stream the held plan also gains the probe shapes of each input signature it
    meets (the paths under ``torch.func`` transforms, e.g. dense parameters, then run one
    no-grad forward per signature, not per batch) and the loop fallback where vmap first fails
    on a batch; the same gradients as :func:`layer_grads_stacked` with the plan it was given.
    Once checked, a plain softmax cross-entropy MLP's batches take their factors from
    :func:`~dattri_fn.transforms.mlp_io.mlp_io` (bit for bit the engine's, :func:`_plain_mlp`).
    """
    held = [plan]  # this stream's checked plan, once a batch of >= 2 examples has come

    def apply(stacked: Params, batch: Batch, *, losses: list | None = None) -> LayerGrads:
        # losses: receives the batched passes' per-example losses [B] per checkpoint where the
        # factored path ran them (layer_grads_paths._factored); left as it was otherwise
        if not held[0].checked:
            n = batch_size("layer_grads", "batch", batch)  # before either path, as the check
            checked, lg = _certified_grads(held[0], stacked, batch, losses)
            if checked is None:
                checked, lg = _check(held[0], stacked, batch, losses=losses, n=n)
            if n >= 2:
                held[0] = checked
            return lg
        if held[0].dense:
            return _dense(held[0], stacked, batch)[0]
        if losses is None and (lg := _plain_mlp(held[0], stacked, batch)) is not None:
            return lg
        try:
            lg, loop, _, shapes = _factored(held[0], stacked, batch, losses=losses)
        except capture.CaptureError as err:  # this batch takes a path the example did not
            _warn_dense(held[0], str(err), batch_only=True)
            return _dense(held[0], stacked, batch)[0]
        if loop and not held[0].loop:  # vmap failed here (warned): later batches loop at once
            held[0] = held[0]._replace(loop=True, shapes=())
        elif shapes is not None and not loop:
            # the probe shapes of this input signature, kept for the stream's later batches
            # (the paths under torch.func transforms need them: one forward per signature)
            args, kwargs, _ = _unpack(held[0].model)(batch)
            sig = input_signature(args, kwargs)
            if all(known != sig for known, _ in held[0].shapes):
                held[0] = held[0]._replace(shapes=(*held[0].shapes, (sig, shapes)))
        return lg

    return apply, lambda: held[0]


def _plain_mlp(plan: LayerPlan, stacked: Params, batch: Batch) -> LayerGrads | None:
    """A checked plan's gradients of a plain softmax cross-entropy MLP at its C checkpoints from
    :func:`~dattri_fn.transforms.mlp_io.mlp_io`'s ``(a, g)``, bit for bit the capture engine's
    (tests/test_mlp_io.py), without its ``functional_call``, probes and autograd graph (its
    saving: benchmarks/RESULTS.md, issue 14); None wherever mlp_io does not certify that
    equality, or the plan keeps anything but flat Linear layers (then :func:`_factored` runs)."""
    if (plan.loop or plan.rest or plan.autodiff or plan.tie_factors
            or any(kind != "flat" for _, kind in plan.layout)
            or len(plan.layout) != len(plan.layers)):
        return None
    io = _mlp_factors(plan, stacked, batch)
    return None if io is None else _mlp_grads(plan, io)


def per_sample_layer_grads(model: FunctionalModel, params: Params, batch: Batch, *,
                           plan: LayerPlan | None = None) -> LayerGrads:
    """Return every example's gradient with Linear layers factored.  # -> LayerGrads, C = 1

    ``per_sample_layer_grads(fm, p, batch).to_dense()[0]`` equals
    ``per_sample_grad(fm.loss, p, batch)``; ``.scores(other)`` gives the Grad-Dot matrix
    without forming either ``[B, P]`` matrix. Without ``plan`` each call builds and checks a
    plan on ``batch`` (module Note; a batch of one example is checked on that example): pass
    ``plan=check_plan(layer_plan(fm), p, example_batch)`` to apply a held plan instead.

    Args:
        model: a :class:`~dattri_fn.model.FunctionalModel` with a ``loss_fn``.
        params: the attributed parameters (the keys of ``model.params``).
        batch: a Batch laid out as the model's ``unpack`` expects.
        plan: a :class:`LayerPlan` of ``model`` (checked, or checked on ``batch`` per call).

    Raises:
        TypeError, ValueError: a bad model, params, batch or plan; a model without a Linear
            layer that can be factored (use :func:`~dattri_fn.transforms.grad.per_sample_grad`).
    """
    from .._checks import check_params

    func = "per_sample_layer_grads"
    if plan is None:
        if isinstance(model, FunctionalModel) and model.loss_fn is not None:
            check_bridged(func, "model", model, fix=", or use per_sample_grad(model.loss, ...)")
        plan = layer_plan(model)
        if plan is None:
            raise ValueError(f"{func}(model=...): expected a model with an attributed "
                             f"nn.Linear, Conv1D, Conv2d or Embedding layer, got none. Use "
                             f"per_sample_grad for this model.")
    elif not isinstance(plan, LayerPlan) or plan.model is not model:
        got = "a plan of another model" if isinstance(plan, LayerPlan) else type(plan).__name__
        raise ValueError(_msg(func, "plan", "a LayerPlan of this model (layer_plan(model))", got))
    check_eval(func, "model", model)  # train-mode Dropout: random gradients (review RF M1)
    params = check_params(func, "params", params)
    if list(params) != list(model.params):
        raise ValueError(f"{func}(params=...): expected the keys {list(model.params)}, got "
                         f"{list(params)}.")
    batch_size(func, "batch", batch)
    device = next(iter(params.values())).device
    stacked = {k: v.detach()[None] for k, v in params.items()}
    return layer_grads_stacked(plan, stacked, batch_to(batch, device))


__all__ = ["LayerGrads", "LayerPlan", "PlanDecisions", "certified_plan", "check_plan",
           "decided_plan", "layer_grads_fn", "layer_grads_stacked", "layer_grads_stream", "layer_plan",
           "per_sample_layer_grads", "plan_decisions"]
