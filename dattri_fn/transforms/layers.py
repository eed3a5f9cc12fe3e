"""Linear-layer selection and the batched ``(a, g)`` pass shared by K-FAC and the curvatures.

A K-FAC style method needs, per example and per Linear layer, the layer input ``a`` and the
gradient of the loss w.r.t. the layer output ``g``: the per-sample weight gradient is then
``sum_t g_t a_t^T`` (and the bias gradient ``sum_t g_t``). Both come from the per-layer capture
engine (:mod:`dattri_fn.transforms.capture`: zero probes added to the layer outputs inside
``functional_call``, no trace and no hooks) as a pure function

    tapped(params_and_buffers, probes, *inputs) -> (output, {layer: input})

At ``probes = 0`` the output is unchanged, and ``torch.func.grad`` w.r.t. the probes is exactly
``g``. Modules that update buffers in ``forward`` (BatchNorm in train mode) must be put in
``eval()`` first: the examples of a batch must not interact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from .._checks import _msg, batch_leaves, batch_size, batch_slice, check_optional_int, check_params
from . import capture

# the loss helpers live in layers_losses; every name stays importable from here
from .layers_losses import (  # noqa: F401
    cross_entropy_rows,
    per_example_losses,
    summed_losses,
    tree_unsqueeze,
)

TappedFn = Callable[..., tuple[object, dict[str, Tensor]]]


def linear_layers(module: nn.Module, include: str | Iterable[str] | None = None) -> list[str]:
    """Return the qualified names of the ``nn.Linear`` submodules, in ``named_modules`` order.

    Args:
        module: the model.
        include: a name or names to select (validated); ``None`` selects every Linear.

    Returns:
        ``list[str]`` of qualified names (``"0"``, ``"encoder.proj"``, ...).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or ``include`` not a str/iterable of str.
        ValueError: an unknown name, a duplicate, a non-Linear submodule, a Linear whose
            ``forward`` is overridden, or a root module that is itself a Linear.
    """
    return select_linear("linear_layers", "include", module, include)


def layer_names(func: str, arg: str, modules: Mapping[str, nn.Module], include,
                allowed: list[str], kind: str, listing: str) -> list[str]:
    """Return the names ``include`` selects among ``allowed`` (all when None), in ``allowed``'s
    order; errors name ``func(arg=...)``, the ``kind`` of layer expected and the ``listing``."""
    if include is None:
        return list(allowed)
    if isinstance(include, str):
        include = [include]
    if not isinstance(include, Iterable):
        raise TypeError(_msg(func, arg, "a layer name or an iterable of names",
                             type(include).__name__))
    include = list(include)
    bad_kind = [n for n in include if not isinstance(n, str)]
    if bad_kind:
        raise TypeError(_msg(func, arg, "layer names (str)", repr(bad_kind[0])))
    if not include:
        raise ValueError(_msg(func, arg, "at least one layer name", "an empty list"))
    unknown = [n for n in include if n not in modules or (n == "" and n not in allowed)]
    if unknown:
        raise ValueError(_msg(func, arg, "names of submodules", f"unknown {unknown}",
                              f"{listing} are {allowed}."))
    other = [f"{n!r} ({type(modules[n]).__name__})" for n in include if n not in allowed]
    if other:
        raise ValueError(_msg(func, arg, f"names of {kind} submodules", ", ".join(other),
                              f"{listing} are {allowed}."))
    dup = sorted({n for n in include if include.count(n) > 1})
    if dup:
        raise ValueError(_msg(func, arg, "distinct names", f"duplicates {dup}"))
    chosen = set(include)
    return [n for n in allowed if n in chosen]


def select_linear(func: str, arg: str, module: nn.Module, include) -> list[str]:
    """:func:`linear_layers` with errors naming ``func(arg=...)``."""
    if not isinstance(module, nn.Module):
        raise TypeError(_msg(func, "module", "an nn.Module", type(module).__name__))
    modules = dict(module.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if "" in linears:
        raise ValueError(_msg(func, "module", "a model containing nn.Linear submodules",
                              "a bare nn.Linear", "Wrap it: nn.Sequential(module)."))
    names = layer_names(func, arg, modules, include, linears, "nn.Linear", "Linear layers")
    overridden = [n for n in names if type(modules[n]).forward is not nn.Linear.forward]
    if overridden:
        raise ValueError(_msg(func, arg, "Linear layers using nn.Linear.forward",
                              f"overridden forward in {overridden}",
                              "Select only plain affine layers."))
    return names


def tap_layers(module: nn.Module, layers: str | Iterable[str] | None = None) -> TappedFn:
    """Return ``tapped(params_and_buffers, probes, *inputs, **kw) -> (output, {layer: input})``.

    ``tapped`` runs ``module`` functionally (``torch.func.functional_call``) with each selected
    Linear output ``z`` replaced by ``z + probes[layer]``; passing zeros of ``z``'s shape leaves
    the output unchanged, and ``torch.func.grad`` w.r.t. ``probes`` gives ``dL/dz``.
    ``params_and_buffers`` may hold any subset of the module's parameters and buffers (missing
    ones are the module's own); ``tapped.state_keys`` lists the names it accepts. Built on
    :func:`dattri_fn.transforms.capture.tap` (no trace: any forward ``functional_call`` runs).

    Args:
        module: the model.
        layers: Linear layer names (see :func:`linear_layers`); ``None`` taps every Linear.

    Returns:
        the pure function ``tapped``, with attributes ``layers`` (the tapped names, in module
        order), ``specs`` and ``module``.

    Raises:
        TypeError, ValueError: as :func:`linear_layers`; calling ``tapped`` raises
        :class:`~dattri_fn.transforms.capture.CaptureError` for a layer used in a way that
        cannot be factored (a tied weight read by another op, a non-batch-first input, ...).
    """
    return capture.tap(module, select_linear("tap_layers", "layers", module, layers))


def module_state(func: str, module: nn.Module, params) -> dict[str, Tensor]:
    """Return the module's detached parameters and buffers overridden by ``params``.

    Raises ValueError naming keys of ``params`` that are not module parameters or whose shape
    differs, so ``functional_call`` never silently falls back to the module's own tensors.
    """
    params = check_params(func, "params", params)
    own = dict(module.named_parameters())
    unknown = [k for k in params if k not in own]
    if unknown:
        raise ValueError(_msg(func, "params", "names of the module's parameters",
                              f"unknown keys {unknown}",
                              "Build params from dict(module.named_parameters())."))
    shape = [f"{k}: {list(v.shape)} vs {list(own[k].shape)}" for k, v in params.items()
             if v.shape != own[k].shape]
    if shape:
        raise ValueError(_msg(func, "params", "the module's parameter shapes",
                              "; ".join(shape)))
    state = {k: v.detach() for k, v in module.named_buffers()}
    # (a parameter that params overrides is not detached first: the same keys, in the same order)
    state.update({k: params[k] if k in params else v.detach() for k, v in own.items()})
    return state


def unpack_example(example) -> tuple[tuple, dict, object]:
    """Split an example into ``(args, kwargs, target)``, as ``dattri_fn.model.default_unpack``.

    A Tensor is the only input (no target); a tuple/list is ``(*inputs, target)`` (no target
    when of length 1); a dict gives keyword inputs and the target under ``"labels"``.
    """
    if isinstance(example, Tensor):
        return (example,), {}, None
    if isinstance(example, Mapping):
        return (), {k: v for k, v in example.items() if k != "labels"}, example.get("labels")
    if len(example) < 2:
        return tuple(example), {}, None
    return tuple(example[:-1]), {}, example[-1]


def input_signature(args, kwargs) -> tuple:
    """Return what probe shapes depend on: each input leaf's shape, dtype and device (a
    non-tensor leaf by its ``repr``). Equal signatures give equal :func:`output_shapes`."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else repr(t)
                 for t in leaves)


def output_shapes(tapped: TappedFn, state, args, kwargs, like: Tensor) -> dict[str, tuple]:
    """Return each tapped layer's output shape ``[B, ..., out]`` from one no-grad forward.

    Every call runs that forward (nothing is cached on ``tapped``): hold the result for
    batches of one :func:`input_signature`. Outside ``torch.func`` transforms
    :func:`batched_io` and :func:`streamed_io` need no shapes at all (pass ``None``).
    """
    zeros = {n: like.new_zeros(()) for n in tapped.layers}
    with torch.no_grad():
        _, acts = tapped(state, zeros, *args, **kwargs)
    return capture.probe_shapes(tapped, acts)


def batched_io(tapped: TappedFn, loss_fn, state, args, kwargs, target, shapes,
               like: Tensor, *, losses: list | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Return ``{layer: (a, g)}`` from ONE batched forward and backward.  # a [B, ..., in]

    ``g = d loss_i / d z_i`` w.r.t. zero probes on the layer outputs, with the per-example
    losses summed: exact when the module treats the examples of a batch independently (eval
    mode). Outside ``torch.func`` transforms plain autograd does it at about half the overhead.
    ``shapes``: :func:`output_shapes` of these inputs, or ``None``: outside transforms each
    call's probe then takes that call's output shape (no extra forward); inside, the shapes
    come from one no-grad forward first.
    ``losses``: a list that receives this pass's per-example losses ``l_i`` ``[B]`` (detached;
    :func:`per_example_losses` of the pass's own output, the values a separate batched forward
    gives), appended outside ``torch.func`` transforms only (inside, nothing is appended);
    ``(a, g)`` are the same bit for bit with or without it.
    """
    def total(pr):
        out, acts = tapped(state, pr, *args, **kwargs)
        rows = per_example_losses(loss_fn, out, target)
        if losses is not None and plain:
            losses.append(rows.detach())
        return rows.sum(), acts

    plain = torch._C._functorch.maybe_current_level() is None
    if plain and shapes is None:
        with torch.enable_grad():
            run = tapped.probed(state, *args, **kwargs)
            edges, zeros, calls = _edges(tapped, run.probes)
            out, acts, fold = run.output, run.acts, run.fold
            del run  # the probes (layer outputs) need not live through the loss or the backward
            value = summed_losses(loss_fn, out, target, rows=losses)
            del out
            # a loss that reaches no probe (every layer under no_grad or unused): all g are 0
            grads = (torch.autograd.grad(value, edges, allow_unused=True) if value.requires_grad
                     else [None] * len(edges))
        # a call whose output never reaches the loss has g = 0
        grads = iter([z() if g is None else g for g, z in zip(grads, zeros, strict=True)])
        g = fold({n: [next(grads) for _ in range(calls[n])] for n in tapped.layers})
        return {n: (acts[n].detach(), g[n]) for n in tapped.layers}
    if shapes is None:
        shapes = output_shapes(tapped, state, args, kwargs, like)
    if plain:
        probes = {n: like.new_zeros(shapes[n], requires_grad=True) for n in tapped.layers}
        with torch.enable_grad():
            value, acts = total(probes)
            grads = torch.autograd.grad(value, list(probes.values()))
        return {n: (acts[n].detach(), g) for n, g in zip(probes, grads, strict=True)}
    probes = {n: like.new_zeros(shapes[n]) for n in tapped.layers}
    g, acts = torch.func.grad(total, has_aux=True)(probes)
    return {n: (acts[n], g[n]) for n in tapped.layers}


def streamed_io(tapped: TappedFn, loss_fn, state, args, kwargs, target, shapes, like: Tensor,
                step: Callable[[str, Tensor | None, Tensor], None],
                on_input: Callable[[str, Tensor], None] | None = None) -> None:
    """Call ``step(layer, a, g)`` for every tapped layer from ONE batched forward and backward,
    each as soon as its ``g`` arrives in the backward pass.

    Same ``(a, g)`` as :func:`batched_io`, but only the layers whose gradients are in flight
    are alive at once: each probe is a zero-stride expansion of a scalar, and a hook on it
    receives ``g`` (a hook on our own probe tensor: the model has no hooks); ``step`` runs
    under ``torch.no_grad``. With ``on_input``, ``on_input(layer, a)`` runs for every layer
    after the forward and ``step(layer, None, g)`` in the backward: the layer inputs are dropped
    before the backward starts (what K-FAC's ``A`` statistic needs). Inside a torch.func
    transform every layer's ``(a, g)`` comes from :func:`batched_io` first. ``shapes=None``: one
    probe per call of each layer, ``tapped.probed``'s (the call's output itself, the hook a
    tensor hook on it; no probe shapes needed); a layer's ``step`` runs once the gradients of
    all its calls have arrived.
    """
    if torch._C._functorch.maybe_current_level() is not None:
        for n, (a, g) in batched_io(tapped, loss_fn, state, args, kwargs, target, shapes,
                                    like).items():
            if on_input is not None:
                on_input(n, a)
                a = None
            step(n, a, g)
        return
    if shapes is None:
        _streamed_per_call(tapped, loss_fn, state, args, kwargs, target, step, on_input)
        return
    bases = {n: like.new_zeros((), requires_grad=True) for n in tapped.layers}
    probes = {n: b.expand(shapes[n]) for n, b in bases.items()}
    acts: dict[str, Tensor] = {}

    def hook(name):
        def on_grad(g):
            with torch.no_grad():  # the layer's input is dropped once its g is used
                step(name, acts.pop(name, None), g.detach())

        return on_grad

    with torch.enable_grad():
        for n, pr in probes.items():
            pr.register_hook(hook(n))
        out, captured = tapped(state, probes, *args, **kwargs)
        if on_input is None:
            acts.update({n: a.detach() for n, a in captured.items()})
        else:
            with torch.no_grad():
                for n in list(captured):
                    on_input(n, captured.pop(n).detach())
        del captured
        value = summed_losses(loss_fn, out, target)
        del out
        torch.autograd.grad(value, list(bases.values()))


def _edges(tapped: TappedFn, probes) -> tuple[list, list, dict[str, int]]:
    """``(autograd edges of the probes in layer order, a zeros maker per probe, calls per
    layer)``: gradients taken at the edges hold no probe (a layer output) alive."""
    flat = [p for n in tapped.layers for p in probes[n]]
    zeros = [partial(torch.zeros, p.shape, dtype=p.dtype, device=p.device) for p in flat]
    return ([get_gradient_edge(p) for p in flat], zeros,
            {n: len(probes[n]) for n in tapped.layers})


def _streamed_per_call(tapped: TappedFn, loss_fn, state, args, kwargs, target, step,
                       on_input) -> None:
    """:func:`streamed_io` with the probes made per call (``shapes=None``, plain autograd)."""
    arrived: dict[str, list] = {}
    done: set[str] = set()

    def hook(name, i, calls):
        def on_grad(g):
            parts = arrived.setdefault(name, [None] * calls)
            parts[i] = g.detach()
            if all(p is not None for p in parts):
                done.add(name)
                with torch.no_grad():  # the layer's input is dropped once its g is used
                    step(name, acts.pop(name, None), fold({name: arrived.pop(name)})[name])

        return on_grad

    with torch.enable_grad():
        run = tapped.probed(state, *args, **kwargs)
        fold, acts, captured = run.fold, {}, run.acts
        for n in tapped.layers:
            calls = len(run.probes[n])
            for i in range(calls):
                run.probes[n][i].register_hook(hook(n, i, calls))
        bases, zeros, counts = _edges(tapped, run.probes)
        out = run.output
        del run
        if on_input is None:
            acts.update({n: a.detach() for n, a in captured.items()})
        else:
            with torch.no_grad():
                for n in list(captured):
                    on_input(n, captured.pop(n).detach())
        del captured
        value = summed_losses(loss_fn, out, target)
        del out
        if value.requires_grad:  # else no output reaches the loss: every g is zero
            torch.autograd.grad(value, bases, allow_unused=True)
    # a call whose output never reaches the loss gets no hook call: its g is zero, of its own
    # probe's shape (another call's g can differ: a layer called on [B, D] and [B, T, D]); a
    # layer none of whose calls reaches the loss (an unused output, a call under no_grad) too
    at = 0
    for name in tapped.layers:
        if name not in done:
            parts = arrived.pop(name, None) or [None] * counts[name]
            with torch.no_grad():
                step(name, acts.pop(name, None), fold({name: [
                    zeros[at + j]() if p is None else p for j, p in enumerate(parts)]})[name])
        at += counts[name]


def _chunks(batch, chunk_size):
    """Yield ``(args, kwargs, target)`` of ``batch`` taken ``chunk_size`` rows at a time. Every
    caller checked ``batch`` (``batch_size``: layer_io, kfac_stats' passes, kfac_diag): its rows
    are read, not scanned again; a batch that is one chunk is taken unsliced."""
    n = batch_leaves(batch)[0].shape[0]
    size = n if chunk_size is None else chunk_size
    for start in range(0, n, size):
        yield unpack_example(batch if size >= n else batch_slice(batch, start, start + size))


def layer_chunks(tapped: TappedFn, state, batch, chunk_size):
    """Yield ``(args, kwargs, target, shapes, like)`` for ``batch`` taken ``chunk_size`` rows at a
    time: the unpacked chunk, its probe shapes and the tensor probes are made like. The shapes
    come from one no-grad forward per distinct chunk signature within this call."""
    like = state[tapped.specs[tapped.layers[0]].weight]
    known: dict[tuple, dict] = {}  # this call's chunks only: a full chunk and the last one
    for args, kwargs, target in _chunks(batch, chunk_size):
        key = input_signature(args, kwargs)
        if key not in known:
            known[key] = output_shapes(tapped, state, args, kwargs, like)
        yield args, kwargs, target, known[key], like


def _stream_layer_io(tapped: TappedFn, loss_fn, state, batch, chunk_size, step,
                     on_input=None) -> None:
    """:func:`streamed_io` over ``batch``, ``chunk_size`` rows at a time (bare core)."""
    like = state[tapped.specs[tapped.layers[0]].weight]
    for args, kwargs, target in _chunks(batch, chunk_size):
        streamed_io(tapped, loss_fn, state, args, kwargs, target, None, like, step, on_input)


def _layer_io(tapped: TappedFn, loss_fn, state, batch, chunk_size):
    """Bare core of :func:`layer_io` (no validation): batched, ``chunk_size`` rows at a time."""
    like = state[tapped.specs[tapped.layers[0]].weight]
    parts = []
    for args, kwargs, target in _chunks(batch, chunk_size):
        parts.append(batched_io(tapped, loss_fn, state, args, kwargs, target, None, like))
    if len(parts) == 1:
        return parts[0]
    return {k: (torch.cat([p[k][0] for p in parts]), torch.cat([p[k][1] for p in parts]))
            for k in tapped.layers}


def layer_io(module: nn.Module, loss_fn: Callable[[object, Tensor], Tensor],
             layers: str | Iterable[str] | None, params, batch, *,
             chunk_size: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Return per-example ``{layer: (a, g)}``: Linear inputs, dloss/doutput.  # a [B, (T,) in]

    ``g`` is ``[B, (T,) out]``. For example ``i`` with inputs ``x_i = example[:-1]`` and
    target ``y_i = example[-1]`` the loss is ``loss_fn(module(*x_i[None]), y_i[None])``, a
    batch of one like ``F.cross_entropy`` expects. Other layouts follow :func:`unpack_example`
    (a Tensor example has no target and gives ``loss_fn(output)``; a dict passes keyword
    inputs, target ``"labels"``). Per-sample gradients follow as ``dW_i = sum_t g_it a_it^T``
    and ``db_i = sum_t g_it`` (no sum for 2-D layer inputs). Computed by one batched forward
    and backward w.r.t. zero probes added to the layer outputs (no hooks), which assumes the
    module treats the examples of a batch independently (eval mode).

    Args:
        module: the model (see :func:`tap_layers` for the tracing limits).
        loss_fn: ``loss_fn(output, target) -> Tensor[]`` (or ``loss_fn(output)`` when the
            example has no target) on a batch of one.
        layers: Linear layer names, or ``None`` for all.
        params: ``dict[str, Tensor]`` of (a subset of) the module's parameters to use.
        batch: a Batch with leading dim ``B``, usually ``(*inputs, target)``.
        chunk_size: examples per forward/backward (bounds memory); ``None`` for all at once.

    Returns:
        ``{layer: (a, g)}`` in module order; ``a`` has the layer input's per-example shape,
        ``g`` the layer output's.

    Raises:
        TypeError, ValueError: for a bad module, layer name, params, batch or chunk_size.
    """
    func = "layer_io"
    if not callable(loss_fn):
        raise TypeError(_msg(func, "loss_fn", "a callable loss_fn(output, target)",
                             type(loss_fn).__name__))
    chunk_size = check_optional_int(func, "chunk_size", chunk_size)
    tapped = capture.tap(module, select_linear(func, "layers", module, layers))
    state = module_state(func, module, params)
    batch_size(func, "batch", batch)
    return _layer_io(tapped, loss_fn, state, batch, chunk_size)
