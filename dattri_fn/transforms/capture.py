"""Per-layer capture of layer inputs ``a`` and output gradients ``g``, without tracing the model.

A layer ``z = W a + b`` applied at positions ``t`` has the per-example gradients
``dW_i = sum_t g_it a_it^T`` and ``db_i = sum_t g_it`` with ``g = dloss_i / dz``. To get ``a`` and
``g`` for selected layers, the model runs under ``torch.func.functional_call`` inside a
:class:`torch.overrides.TorchFunctionMode` that recognises each selected layer's weight **by
identity** where a torch function consumes it, records that call's input and adds a zero probe
to its output. At probes ``= 0`` the output is unchanged and the derivative of the loss w.r.t.
a probe is ``g``. Outside ``torch.func`` (``tapped.probed``) the probe of an output that has a
graph is the output itself, whose gradient is the same ``g`` with no add (unless an in-place op
touches the output: then zeros are added as above); an output without one gets an added zero.
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
  elementwise, ``dW = sum_t g_t * xhat_t``, ``db = sum_t g_t`` (:mod:`.capture_norm`).

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
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

# the call kinds, all importable from here as before the split
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
from .capture_norm import Broadcast, hold, watched_call

__all__ = ["CaptureError", "LayerSpec", "Probed", "bias_grad", "check", "layer_specs", "probe_shapes",
           "tap", "weight_grad"]

KINDS = ("linear", "conv1d", "conv2d", "embedding", "layernorm")


class CaptureError(ValueError):
    """A selected layer was used in a way the engine cannot factor (``.problems``: layer -> why)."""

    def __init__(self, problems: Mapping[str, str]):
        self.problems = dict(problems)
        text = "; ".join(f"{n or '<root>'}: {why}" for n, why in self.problems.items())
        super().__init__(f"capture: layers outside the per-layer capture engine: {text}.")


class LayerSpec(NamedTuple):
    """A capturable layer: its kind, state keys and output width (``g``'s last dim)."""

    kind: str
    weight: str
    bias: str | None
    out_features: int


def _spec(name: str, m: nn.Module, norms: bool = False) -> LayerSpec | None:
    prefix = f"{name}." if name else ""
    bias = f"{prefix}bias" if getattr(m, "bias", None) is not None else None
    if isinstance(m, nn.LayerNorm):
        if not norms or m.weight is None:
            return None
        return LayerSpec("layernorm", f"{prefix}weight", bias, m.weight.numel())
    if isinstance(m, nn.Linear):
        return LayerSpec("linear", f"{prefix}weight", bias, m.out_features)
    if isinstance(m, nn.Conv2d):
        return LayerSpec("conv2d", f"{prefix}weight", bias, m.out_channels)
    if isinstance(m, nn.Embedding):
        return LayerSpec("embedding", f"{prefix}weight", None, m.embedding_dim)
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(w, Tensor) and w.ndim == 2:
        return LayerSpec("conv1d", f"{prefix}weight", bias, w.shape[1])
    return None


def layer_specs(module: nn.Module, *, norms: bool = False) -> dict[str, LayerSpec]:
    """Return ``{name: LayerSpec}`` of every capturable submodule, in ``named_modules`` order.

    A module reached under several names (shared) is listed once, under its first name; the
    root module counts (name ``""``). ``norms=True`` adds each ``nn.LayerNorm`` with an affine
    weight (kind ``"layernorm"``, whose gradients are elementwise, not ``sum_t g_t a_t^T``:
    only for consumers that know it, via :func:`weight_grad` / :func:`bias_grad`).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"layer_specs(module=...): expected an nn.Module, got "
                        f"{type(module).__name__}.")
    return {n: s for n, m in module.named_modules() if (s := _spec(n, m, norms)) is not None}


_BENIGN_GETTERS = frozenset({"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda",
                             "layout", "is_sparse", "is_quantized", "is_meta", "names"})
_BENIGN_METHODS = frozenset({"size", "dim", "numel", "__len__", "is_floating_point",
                             "is_complex", "stride", "element_size", "get_device",
                             "is_contiguous", "ndimension", "nelement", "data_ptr",
                             "storage_offset", "__hash__", "__format__", "__repr__"})


def _benign(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "") in _BENIGN_GETTERS
    return name in _BENIGN_METHODS


def _name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    return name


class Probed(NamedTuple):
    """One forward of :func:`tap`'s ``tapped.probed``: every selected call has its own probe.

    Attributes:
        output: the model's output (unchanged: the probes are zeros).
        acts: ``{layer: a}`` as ``tapped`` returns it.
        probes: ``{layer: (probe per call, in call order)}``, each a tensor whose gradient is
            the call's ``dL/dout``: the call's output itself where it has a graph
            (:meth:`_Capture._own`), or a zero-stride expansion of a 0-d zero leaf to the
            output's shape, added to it (an output without a graph, every output after an
            in-place op on one, a broadcast Embedding). Plain autograd w.r.t. them (inputs of
            ``autograd.grad``, or ``register_hook``) gives ``g``.
        fold: ``{layer: (dL/dprobe per call)} -> {layer: g}`` in ``tapped``'s ``g`` layout
            (``[B, out]`` flat, else ``[B, T, out]`` with the calls' positions concatenated).
    """

    output: object
    acts: dict[str, Tensor]
    probes: dict[str, tuple[Tensor, ...]]
    fold: Callable[[Mapping[str, Sequence[Tensor]]], dict[str, Tensor]]


class _Record(NamedTuple):
    a: Tensor  # [B, T, in] (or [B, T] indices); [B, in] (or [B]) when flat
    flat: bool  # the call's input was [B, in] / [B]


class _Capture(TorchFunctionMode):
    """Records selected layers' inputs and adds their probes (see the module docstring)."""

    def __init__(self, specs: Mapping[str, LayerSpec], state: Mapping[str, Tensor],
                 probes: Mapping[str, Tensor] | None, batch: int | None, tied: bool = False,
                 keyed: Sequence[tuple[str, str, str]] | None = None):
        super().__init__()
        self.specs, self.probes, self.batch = specs, probes, batch
        if keyed is None:
            keyed = _keyed(specs)
        self.problems: dict[str, str] = {}
        self.group: dict[str, tuple[str, ...]] = {}
        self.by_kind: dict[str, dict[int, tuple[str, str]]] = {}
        self.roles = {id(state[k]): (n, role) for k, n, role in keyed}
        if len(self.roles) < len(keyed):  # one tensor under two roles: sharing or tying
            self._shared(specs, state, keyed, tied)
        self.base = self.roles
        self.records: dict[str, list[_Record]] = {n: [] for n in specs}
        # outputs of Embedding calls shared by the batch, and of flat ones (capture_norm)
        self.pending: dict[int, object] = {}
        self.watch: dict[int, tuple[str, Tensor]] = {}
        self.offsets = dict.fromkeys(specs, 0)
        self.made: dict[str, list[Tensor]] = {n: [] for n in specs}
        self.versions: list[tuple[Tensor, int]] = []

    def _shared(self, specs, state, keyed, tied: bool) -> None:
        """The roles of tensors read by several selected layers (problems, or tied groups)."""
        self.roles = {}
        shared: dict[int, list[str]] = {}  # a weight tensor -> the layers reading it as weight
        for key, n, role in keyed:
            other = self.roles.setdefault(id(state[key]), (n, role))
            if other[0] == n:
                continue
            if tied and role == other[1] == "weight":
                shared.setdefault(id(state[key]), [other[0]]).append(n)
                continue
            # one tensor, two layers: neither factor is the layer's own
            self.problems.setdefault(other[0], f"shares its {role} with layer {n}")
            self.problems.setdefault(n, f"shares its {role} with layer {other[0]}")
        # A tied weight (tied=True) is attributed call by call to the member of the call's
        # kind: F.embedding to the Embedding, F.linear to the Linear. Two members of one kind
        # could not be told apart, so they stay problems.
        for t, members in shared.items():
            kinds = [specs[m].kind for m in members]
            if len(set(kinds)) < len(kinds):
                for m in members:
                    self.problems.setdefault(m, f"shares its weight with layer(s) "
                                                f"{[o for o in members if o != m]} of the same kind")
                continue
            for m, k in zip(members, kinds, strict=True):
                self.group[m] = tuple(members)
                self.by_kind.setdefault(k, dict(self.roles))[t] = (m, "weight")

    def _hits(self, args, kwargs) -> list[tuple[str, str]]:
        # Looked up by id without a type test first: the selected tensors stay alive for the
        # whole forward (state holds them), so no other live object can share their ids.
        roles, out = self.roles, []
        for x in (*args, *kwargs.values()) if kwargs else args:
            role = roles.get(id(x))
            if role is not None:
                out.append(role)
            elif isinstance(x, (list, tuple)):
                out.extend(roles[id(t)] for t in x if id(t) in roles)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if not self.roles:
            return func(*args, **kwargs)
        if self.pending or self.watch:
            done = watched_call(self, func, args, kwargs)
            if done is not self:
                return done
        if self.by_kind:  # a tied weight's reader is the member of this call's kind
            call = _CALLS.get(func)
            self.roles = self.by_kind.get(call[0], self.base) if call else self.base
        hits = self._hits(args, kwargs)
        if not hits or _benign(func):
            return func(*args, **kwargs)
        layers = {n for n, _ in hits}
        name = next(iter(layers))
        call = _CALLS.get(func)
        why = None
        if len(layers) > 1:
            why = f"shares a {_name(func)} call with layer(s) {sorted(layers - {name})}"
        elif call is None or call[0] != self.specs[name].kind:
            why = f"its tensors are used by {_name(func)}"
        if why is None:
            why = call[1](self, name, args, kwargs)
        if isinstance(why, str):  # a tied weight's misuse is every member's problem
            for n in {m for layer in layers for m in self.group.get(layer, (layer,))}:
                self.problems.setdefault(n, why)
            return func(*args, **kwargs)
        if isinstance(why, Broadcast):
            return hold(self, name, func(*args, **kwargs), why.idx)
        a, flat, T = why
        out = func(*args, **kwargs)
        self.records[name].append(_Record(a, flat))
        out = call[2](self, name, out, T)
        if flat and call[0] == "embedding":
            self.watch[id(out)] = (name, out)
        return out

    def _own(self, name: str, out: Tensor) -> Tensor:
        """A probe made per call that is the call's output itself: autograd's gradient w.r.t.
        it is ``dL/dout`` with no zero added (no add in the forward, none in the backward).

        An output without a graph (the first selected layer's, parameters without gradient,
        or a frozen part run under ``torch.no_grad``) gets an added zero probe, made with grad
        enabled, as before: made a leaf, an output computed under no_grad would get a gradient
        its weights do not have (review R4), and a leaf held by autograd stays alive through
        the backward. Every other output's version is checked after the forward, since after
        an in-place op its gradient would be the modified tensor's."""
        if not out.requires_grad:
            with torch.enable_grad():
                p = out.new_zeros((), requires_grad=True).expand(out.shape)
            self.made[name].append(p)
            return out + p  # under no_grad: off the graph, so g = 0
        self.versions.append((out, out._version))
        self.made[name].append(out)
        return out

    def _probe(self, name: str, T: int, out: Tensor | None = None) -> Tensor | None:
        """The slice of ``probes[name]`` for this call's ``T`` positions (None: no probes), or,
        for probes made per call, a new zero probe of ``out``'s shape."""
        if self.probes is None:
            return None
        if self.probes is _PER_CALL or self.probes is _ADDED:
            # zero-stride: no memory; its gradient is the call's dL/dout whatever the layout
            # (made with grad enabled: under a model's no_grad it has a grad_fn all the same)
            with torch.enable_grad():
                p = out.new_zeros((), requires_grad=True).expand(out.shape)
            self.made[name].append(p)
            return p
        p = self.probes[name]
        if p.ndim == 0:
            return p
        if p.ndim == 2:
            if T != 1 or self.offsets[name]:
                raise CaptureError({name: "a flat probe [B, out] for a layer with several "
                                          "positions or calls; build probes from probe_shapes"})
            self.offsets[name] = 1
            return p
        off = self.offsets[name]
        self.offsets[name] = off + T
        return p[:, off:off + T]

    def rows_of(self, x: Tensor) -> int | str:
        """``B`` when ``x`` is batch-first, else the reason it is not."""
        if self.batch is None or x.ndim == 0 or x.shape[0] != self.batch:
            got = list(x.shape) if x.ndim else "a scalar"
            return f"an input {got} that is not batch-first (B = {self.batch})"
        return self.batch


def _keyed(specs: Mapping[str, LayerSpec]) -> tuple[tuple[str, str, str], ...]:
    """``(state key, layer, role)`` of every selected weight and bias, in layer order."""
    return tuple((key, n, role) for n, s in specs.items()
                 for role, key in (("weight", s.weight), ("bias", s.bias)) if key is not None)


def _batch_rows(args, kwargs) -> int | None:
    """The first input leaf's leading size (``B``), None without one."""
    if args and isinstance(args[0], Tensor) and args[0].ndim:  # the usual (x, ...) call
        return args[0].shape[0]
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, Tensor) and t.ndim:
            return t.shape[0]
    return None


def _acts(mode: _Capture) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Return ``({layer: a}, problems)`` from a finished mode (module docstring's shapes)."""
    acts, problems = {}, dict(mode.problems)
    for n, recs in mode.records.items():
        if n in problems:
            continue
        if not recs:
            problems[n] = "not called in this forward (or its weight reached a call as a copy)"
        elif len(recs) == 1:  # the call's own input (or a view of it): no copy
            acts[n] = recs[0].a
        else:
            acts[n] = torch.cat([r.a[:, None] if r.flat else r.a for r in recs], 1)
    return acts, problems


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
    view) would change what its gradient means: it is detected (the leaf's error, or the
    output's version after the forward) and the forward reruns with zero probes added, the
    same ``g``. ``torch.func`` transforms need probes as inputs: use ``tapped`` with
    :func:`probe_shapes` there.

    ``tied=True``: selected layers of different kinds that read one weight tensor (GPT-2's
    ``wte``, an Embedding, and ``lm_head``, a Linear) are each captured from their own calls
    (each call attributed to the member of its kind), so the tensor's per-example gradient is
    the SUM of the members' :func:`weight_grad`; ``tapped.tied`` lists those groups (tuples
    of layer names, module order). A consumer that treats each layer's gradient as its
    weight's whole gradient must not pass it (the default: a tie is a problem).

    Attributes of ``tapped``: ``layers`` (names, module order), ``specs``, ``module``,
    ``state_keys`` (the names ``functional_call`` accepts), ``tied``, ``ties_any`` (whether
    the module holds one tensor under two names, decided once), ``check`` and ``probed``.
    It holds no state: every call is independent of the ones before.
    """
    specs_all = layer_specs(module, norms=True)
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
            out = torch.func.functional_call(module, state, args, kwargs, tie_weights=ties)
        return out, mode

    def tapped(state: Mapping[str, Tensor], probes: Mapping[str, Tensor], *args, **kwargs):
        out, mode = run(state, probes, args, kwargs)
        acts, problems = _acts(mode)
        if problems:
            raise CaptureError(problems)
        return out, acts

    def probed(state: Mapping[str, Tensor], *args, **kwargs) -> Probed:
        try:
            out, mode = run(state, _PER_CALL, args, kwargs)
            changed = any(t._version != v for t, v in mode.versions)
        except RuntimeError as err:  # an in-place op on an output made a leaf
            if "in-place" not in str(err):
                raise
            changed = True
        if changed:
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


def probe_shapes(tapped, acts: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Return each layer's probe (= ``g``) shape from its ``a`` (one forward's ``acts``)."""
    out = {}
    for n, a in acts.items():
        spec = tapped.specs[n]
        lead = a.shape if spec.kind == "embedding" else a.shape[:-1]
        out[n] = (*lead, spec.out_features)
    return out


def _tokens(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``a``, ``g`` with a positions dim: ``[B, T, in]`` (``[B, T]`` indices), ``[B, T, out]``."""
    if g.ndim == 2:
        return a[:, None], g[:, None]
    return a, g


def weight_grad(spec: LayerSpec, a: Tensor, g: Tensor, weight_shape) -> Tensor:
    """Return the per-example weight gradients ``sum_t g_t a_t^T`` in the weight's shape.  # [B, *W]

    LayerNorm: ``sum_t g_t * xhat_t`` (elementwise; ``a`` = ``xhat``)."""
    a, g = _tokens(a, g)
    if spec.kind == "layernorm":
        return (g * a).sum(1).reshape(g.shape[0], *weight_shape)
    if spec.kind == "embedding":
        V = weight_shape[0]
        rows = torch.where(a < 0, V, a)[..., None].expand(-1, -1, g.shape[-1])
        out = g.new_zeros(g.shape[0], V + 1, g.shape[-1]).scatter_add(1, rows, g)
        return out[:, :V]
    if spec.kind == "conv1d":
        return torch.einsum("bti,bto->bio", a, g)
    return torch.einsum("bto,bti->boi", g, a).reshape(g.shape[0], *weight_shape)


def bias_grad(spec: LayerSpec, g: Tensor) -> Tensor:
    """Return the per-example bias gradients ``sum_t g_t``.  # [B, out]"""
    return g if g.ndim == 2 else g.sum(1)
