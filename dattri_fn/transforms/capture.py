"""Per-layer capture of layer inputs ``a`` and output gradients ``g``, without tracing the model.

A layer ``z = W a + b`` applied at positions ``t`` has the per-example gradients
``dW_i = sum_t g_it a_it^T`` and ``db_i = sum_t g_it`` with ``g = dloss_i / dz``. To get ``a`` and
``g`` for selected layers, the model runs under ``torch.func.functional_call`` inside a
:class:`torch.overrides.TorchFunctionMode` that recognises each selected layer's weight **by
identity** where a torch function consumes it, records that call's input and adds a zero probe
to its output. At probes ``= 0`` the output is unchanged and the derivative of the loss w.r.t.
a probe is ``g``. Outside ``torch.func`` (``tapped.probed``) the probe of an output that has a
graph is the output itself, whose gradient is the same ``g`` with no add (unless an in-place op
touches the output: then zeros are added as above). A flat Linear call with no input that
requires grad (the first selected layer) is run on a detached alias of its weight that requires
grad, the same kernel with a graph, so its output is its own probe too; any other output
without a graph gets an added zero.
No ``torch.fx`` trace, no module hooks, no patched ``forward``: any model
``functional_call`` can run works (Python control flow, ``**kwargs``, attention masks, stock
Hugging Face models), and a layer called several times gets one record per call, summed.

Recognised calls (the "kinds"), each normalised to a linear form ``dW = sum_t g_t a_t^T``:

* ``linear``: ``F.linear(a, W, b)`` on ``[B, ..., in]`` (``nn.Linear`` and subclasses);
* ``conv1d``: ``torch.addmm(b, x, W)`` with ``W`` ``[in, out]`` on rows ``[B * T, in]``
  (Hugging Face ``Conv1D``); ``dW = sum_t a_t g_t^T`` (transposed);
* ``conv2d``: ``F.conv2d(x, W, b, ...)`` with ``groups = 1``; ``a`` = the unfolded patches
  ``[B, L, C_in kh kw]``, ``g`` ``[B, L, C_out]`` (``L`` output positions);
* ``embedding``: ``F.embedding(idx, W, padding_idx)``; ``a`` holds the indices ``[B, T]``
  (``-1`` where ``padding_idx`` gets no gradient), ``dW[v] = sum_{t: idx_t = v} g_t``; indices
  shared by the batch (GPT-2's ``wpe`` reads ``[1, T]`` position ids) are captured where their
  output is broadcast over the batch (:mod:`.capture_norm`);
* ``layernorm`` (asked for with ``layer_specs(..., norms=True)``): ``F.layer_norm`` with an
  affine weight; ``a`` = the normalised input ``xhat`` ``[B, T, D]`` and the gradients are
  elementwise, ``dW = sum_t g_t * xhat_t``, ``db = sum_t g_t`` (:mod:`.capture_norm`); an
  RMSNorm's scale is this kind with no bias: ``F.rms_norm`` (``nn.RMSNorm``), or the one 1-D
  parameter of a norm module (HF's ``LlamaRMSNorm``, T5's ``T5LayerNorm``) read by ``w * x``
  with ``x`` batch-first, ``a = x``.
* ``bare`` (asked for with ``layer_specs(..., bare=True)``, named by the parameter's key): a
  1-D or 2-D ``nn.Parameter`` of a hand-written module read by rows: ``W[index]`` with a
  slice, an int or integer ids on dim 0 (text-lm's ``self.pos[:T]``), ``F.embedding(ids, W)``,
  or ``W`` itself added or subtracted (all rows, ids ``0..V-1``): ``a`` holds the row ids as
  an Embedding's, ``dW[v] = sum_{t: id_t = v} g_t`` (a 1-D weight: rows of width 1); rows
  shared by the batch are captured where they are added to a batch-first tensor. A bare
  weight the forward never reads by rows (``x * s``, ``x @ W``) is a problem starting with
  ``NOT_ROWS``: a plan drops it without a warning (it keeps ``vmap(grad)``).

Shapes: a layer with one call on a ``[B, in]`` input (or ``[B]`` indices) is *flat*: ``a``
``[B, in]``, ``g`` ``[B, out]``; otherwise the calls' positions are concatenated: ``a``
``[B, T, in]``, ``g`` ``[B, T, out]`` (``T`` summed over calls). Anything else that touches a
selected weight or bias (a tied weight read by another op, ``W.t()``, a non-batch-first input,
``max_norm``, grouped convolutions, ...) is a *problem*: :func:`check` lists them per layer so a
caller can compute those layers densely (after one warning), and ``tapped`` raises
:class:`CaptureError` rather than return wrong factors. One weight read by an Embedding and a
Linear (GPT-2's tied ``wte`` = ``lm_head``) is a problem too, unless the tap asks for
``tied=True``: each use is then captured under its own layer and the weight's gradient is
their sum (what K-FAC/EK-FAC's pooled factors need, :mod:`dattri_fn.operators.kfac_tied`).
Batch-first inputs are assumed to hold one example per row and the examples to be independent
(eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode  # noqa: F401 (importable from here as before)
from torch.utils._pytree import tree_leaves  # noqa: F401

from ..module_call import call_module, shared_slots

# the call kinds, the mode and the specs, all importable from here as before the splits
from .capture_kinds import (  # noqa: F401
    _ADDED,
    _CALLS,
    _PER_CALL,
    _add_positions,
    _addmm_inspect,
    _arg,
    _conv2d_inspect,
    _conv2d_probe,
    _embedding_inspect,
    _input_of,
    _linear_inspect,
)
from .capture_mode import (  # noqa: F401
    _BENIGN_GETTERS,
    _BENIGN_METHODS,
    _acts,
    _batch_rows,
    _benign,
    _Capture,
    _keyed,
    _name,
    _Record,
)
from .capture_norm import Broadcast, hold, watched_call  # noqa: F401
from .capture_specs import (  # noqa: F401
    KINDS,
    NOT_ROWS,
    CaptureError,
    LayerSpec,
    _spec,
    _tokens,
    bias_grad,
    grouped,
    layer_specs,
    module_problems,
    probe_shapes,
    weight_grad,
)

__all__ = ["CaptureError", "LayerSpec", "Probed", "bias_grad", "check", "layer_specs", "probe_shapes",
           "tap", "weight_grad"]


class Probed(NamedTuple):
    """One forward of :func:`tap`'s ``tapped.probed``: every selected call has its own probe.

    Attributes:
        output: the model's output (unchanged: the probes are zeros).
        acts: ``{layer: a}`` as ``tapped`` returns it.
        probes: ``{layer: (probe per call, in call order)}``, each a tensor whose gradient is
            the call's ``dL/dout``: the call's output itself where it has a graph
            (:meth:`_Capture._own`; a first flat Linear's gets one from its weight's alias), or
            a zero-stride expansion of a 0-d zero leaf to the output's shape, added to it (any
            other output without a graph, every output after an in-place op on one, a
            broadcast Embedding). Plain autograd w.r.t. them (inputs of ``autograd.grad``, or
            ``register_hook``) gives ``g``.
        fold: ``{layer: (dL/dprobe per call)} -> {layer: g}`` in ``tapped``'s ``g`` layout
            (``[B, out]`` flat, else ``[B, T, out]`` with the calls' positions concatenated).
    """

    output: object
    acts: dict[str, Tensor]
    probes: dict[str, tuple[Tensor, ...]]
    fold: Callable[[Mapping[str, Sequence[Tensor]]], dict[str, Tensor]]


def tap(module: nn.Module, layers: Iterable[str], *, tied: bool = False):
    """Return ``tapped(state, probes, *args, **kwargs) -> (output, {layer: a})`` for ``layers``.

    ``tapped`` calls ``functional_call(module, state, args, kwargs)`` with each selected layer's
    probe added to its outputs (module docstring); ``torch.func.grad`` w.r.t. the probes gives
    ``g``. ``probes[layer]`` has :func:`probe_shapes`' shape, or is a 0-d zero (no gradient
    wanted). ``state`` must hold every selected layer's weight and bias (tied keys may be
    missing: ``functional_call`` ties them). Raises :class:`CaptureError` if a layer is used in
    a way the engine cannot factor (:func:`check` lists them without raising).

    ``tapped.probed(state, *args, **kwargs) -> Probed`` runs the same forward with one probe
    per call, shaped as that call's output: the output itself (no zero added, no add in
    the forward or the backward), so plain autograd w.r.t. them gives ``g`` with no probe
    shapes known beforehand (no extra forward); ``Probed.fold`` lays the per-call gradients
    out as ``g``. An in-place op on a selected call's output (``relu_``, ``+=`` on it or a
    view) would change what its gradient means: it is detected (the output's version after
    the forward) and the forward reruns with zero probes added, the same ``g``; that tap's
    later ``probed`` calls add them from the start (one forward each, the same numbers).
    ``torch.func`` transforms need probes as inputs: use ``tapped`` with :func:`probe_shapes`
    there.

    ``tied=True``: selected layers of different kinds that read one weight tensor (GPT-2's
    ``wte``, an Embedding, and ``lm_head``, a Linear) are each captured from their own calls
    (each call attributed to the member of its kind), so the tensor's per-example gradient is
    the SUM of the members' :func:`weight_grad`; ``tapped.tied`` lists those groups (tuples
    of layer names, module order). A consumer that treats each layer's gradient as its
    weight's whole gradient must not pass it (the default: a tie is a problem).

    Attributes of ``tapped``: ``layers`` (names, module order), ``specs``, ``module``,
    ``state_keys`` (the names ``functional_call`` accepts), ``tied``, ``ties_any`` (whether
    the module holds one tensor under two names, decided once), ``check`` and ``probed``.
    Its one memory is that flag (whether an in-place op on a selected output was seen): every
    call's numbers are independent of the ones before.
    """
    specs_all = layer_specs(module, norms=True, bare=True)
    names = list(layers)
    unknown = [n for n in names if n not in specs_all]
    if unknown:
        raise ValueError(f"tap(layers=...): expected names of capturable layers "
                         f"({', '.join(KINDS)}), got {unknown}. Capturable: {list(specs_all)}.")
    order = {n: i for i, n in enumerate(specs_all)}
    names = sorted(set(names), key=order.__getitem__)
    specs = {n: specs_all[n] for n in names}
    state_keys = frozenset([k for k, _ in module.named_parameters(remove_duplicate=False)]
                           + [k for k, _ in module.named_buffers(remove_duplicate=False)])
    holders: dict[int, list[str]] = {}
    for k, v in module.named_parameters(remove_duplicate=False):
        holders.setdefault(id(v), []).append(k)
    aliases = {k: ks for ks in holders.values() for k in ks}
    shared: dict[int, int] = {}
    for _, v in (*module.named_parameters(remove_duplicate=False),
                 *module.named_buffers(remove_duplicate=False)):
        shared[id(v)] = shared.get(id(v), 0) + 1
    # Decided once, from the module as built: without tied tensors functional_call's untying
    # (a walk over every submodule, about 0.1 ms a call) has nothing to do.
    ties = any(c > 1 for c in shared.values())
    slots = shared_slots(module) if ties else ()
    keyed = _keyed(specs)
    needed = [k for k, _, _ in keyed]

    def run(state, probes, args, kwargs):
        state = {k: v for k, v in state.items() if k in state_keys}
        missing = [k for k in needed if k not in state]
        if missing and ties:  # a tied key missing from state is its alias's tensor
            for k in missing:
                present = [a for a in aliases.get(k, ()) if a in state]
                if present:
                    state[k] = state[present[0]]
            missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(f"tapped(state=...): expected the selected layers' weights and "
                             f"biases, missing {missing}.")
        mode = _Capture(specs, state, probes, _batch_rows(args, kwargs), tied, keyed)
        with mode:
            out = call_module(module, state, args, kwargs, tie_weights=ties, shared=slots)
        return out, mode

    def tapped(state: Mapping[str, Tensor], probes: Mapping[str, Tensor], *args, **kwargs):
        out, mode = run(state, probes, args, kwargs)
        acts, problems = _acts(mode)
        if problems:
            raise CaptureError(problems)
        return out, acts

    # Whether a forward showed an in-place op on a selected output: from then on this tap adds
    # zero probes from the start (one forward a batch, not two; the rerun's numbers). Kept per
    # tap, i.e. per module and layer selection, never shared between taps or models.
    added: list[bool] = []

    def probed(state: Mapping[str, Tensor], *args, **kwargs) -> Probed:
        out, mode = run(state, _ADDED if added else _PER_CALL, args, kwargs)
        if not added and any(t._version != v for t, v in mode.versions):
            added.append(True)
            out, mode = run(state, _ADDED, args, kwargs)
        acts, problems = _acts(mode)
        if problems:
            raise CaptureError(problems)
        # the fold keeps only layouts, not the mode's records (their inputs can be freed early)
        flat = {n: len(r) == 1 and r[0].flat for n, r in mode.records.items()}
        return Probed(out, acts, {n: tuple(mode.made[n]) for n in names},
                      partial(_fold, specs, mode.batch, flat))

    def check_fn(state, *args, **kwargs) -> dict[str, str]:
        with torch.no_grad():
            _, mode = run(state, None, args, kwargs)
        return _acts(mode)[1]

    tapped.layers = names
    tapped.specs = specs
    tapped.tied = _tied_groups(module, specs) if tied else ()
    tapped.ties_any = ties
    tapped.module = module
    tapped.state_keys = state_keys
    tapped.check = check_fn
    tapped.probed = probed
    return tapped


def _tied_groups(module: nn.Module, specs: Mapping[str, LayerSpec]) -> tuple[tuple[str, ...], ...]:
    """The selected layers that read one weight Parameter of ``module``, grouped (module order;
    only groups of distinct kinds, the ones ``tied=True`` captures)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    by_tensor: dict[int, list[str]] = {}
    for n, s in specs.items():
        if s.weight in params:
            by_tensor.setdefault(id(params[s.weight]), []).append(n)
    return tuple(tuple(ms) for ms in by_tensor.values()
                 if len(ms) > 1 and len({specs[m].kind for m in ms}) == len(ms))


def _fold(specs: Mapping[str, LayerSpec], B: int, flat: Mapping[str, bool],
          grads: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
    """``{layer: g}`` from each call's ``dL/dout`` (see :class:`Probed`).  # -> [B, (T,) out]"""
    out = {}
    for n, parts in grads.items():
        if flat[n]:  # a LayerNorm over several dims: [B, *shape] -> [B, out]
            out[n] = parts[0] if parts[0].ndim == 2 else parts[0].reshape(B, -1)
            continue
        d = specs[n].out_features
        # conv2d outputs are [B, C_out, H, W]: positions last, channels first
        parts = [p.reshape(B, d, -1).transpose(1, 2) if specs[n].kind == "conv2d"
                 else p.reshape(B, -1, d) for p in parts]
        out[n] = torch.cat(parts, 1) if len(parts) > 1 else parts[0].contiguous()
    return out


def check(tapped, state: Mapping[str, Tensor], *args, **kwargs) -> dict[str, str]:
    """Return ``{layer: why}`` for the layers of ``tapped`` that one no-grad forward on
    ``(args, kwargs)`` shows cannot be captured (empty: every layer is captured)."""
    return tapped.check(state, *args, **kwargs)

