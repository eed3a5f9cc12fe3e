"""The model bridge: ``nn.Module`` + batch loss -> pure ``(params, loss, forward)``.

An example is one element of a Batch. By default a tuple/list example ``(x1, ..., xm, y)`` feeds
``x1..xm`` to the module and ``y`` to the loss; a dict example feeds every key but ``"labels"`` as
keyword arguments; a bare Tensor example is the only input (no target). Pass ``unpack`` for any
other layout. The module is called on a batch of one (``unsqueeze(0)``), so ordinary modules and
ordinary batch losses (``F.cross_entropy``) work unchanged under ``vmap``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from types import FunctionType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ._blame import _CHECKPOINT_REMEDY, require_grads_error, target_dtype_error
from ._checks import _msg, check_params
from ._types import Params
from .module_call import call_module, shared_slots

Selector = None | str | Iterable[str] | Callable[[str], bool]


class FunctionalModel(NamedTuple):
    """A module seen as pure functions of the selected parameters.

    Attributes:
        params: the selected (attributed) parameters, detached, in ``named_parameters`` order.
        loss: ``loss(params, example) -> Tensor[]`` for ONE example.
        forward: ``forward(params, example) -> output`` for ONE example (batch dim removed).
        fixed: parameters not selected, held constant, and the buffers (BatchNorm statistics).
        module: the module itself (its mode, train/eval, is used as is).
        loss_fn: the batch loss the bridge was built with (K-FAC/EK-FAC re-use it).
        unpack: ``example -> (args, kwargs, target)``, the layout rule it was built with.
    """

    params: Params
    loss: Callable[[Params, Any], Tensor]
    forward: Callable[[Params, Any], Any]
    fixed: Params
    module: nn.Module
    loss_fn: Callable | None = None
    unpack: Callable[[Any], tuple[tuple, dict, Any]] | None = None


def default_unpack(example) -> tuple[tuple, dict, Any]:
    """Split an example into ``(args, kwargs, target)`` by the layout rules of this module."""
    if isinstance(example, Tensor):
        return (example,), {}, None
    if isinstance(example, Mapping):
        kwargs = {k: v for k, v in example.items() if k != "labels"}
        return (), kwargs, example.get("labels")
    if isinstance(example, (tuple, list)):
        if len(example) < 2:
            return tuple(example), {}, None
        return tuple(example[:-1]), {}, example[-1]
    raise TypeError(f"default_unpack(example=...): expected a Tensor, tuple, list or dict, "
                    f"got {type(example).__name__}.")


def select_params(names: list[str], selector: Selector, *, func: str = "select_params") -> list[str]:
    """Return the names picked by ``selector``: None (all), a name or module prefix, a list of
    them, or a predicate ``name -> bool``. Unknown names raise, listing what exists."""
    if selector is None:
        return list(names)
    if callable(selector):
        chosen = [n for n in names if selector(n)]
    else:
        wanted = [selector] if isinstance(selector, str) else list(selector)
        unknown = [w for w in wanted
                   if not any(n == w or n.startswith(w + ".") for n in names)]
        if unknown:
            raise ValueError(f"{func}(params=...): expected parameter names or module prefixes "
                             f"of the model, got unknown {unknown}. Known: {names}.")
        chosen = [n for n in names if any(n == w or n.startswith(w + ".") for w in wanted)]
    if not chosen:
        raise ValueError(f"{func}(params=...): the selection matched no parameter. Known: {names}.")
    return chosen


def _has_tied_tensors(module: nn.Module) -> bool:
    """Whether one tensor sits under two names of ``module`` (decided once, from the module as
    built): without one, ``functional_call``'s untying (a walk over every submodule on every
    call) has nothing to do, so it is skipped."""
    seen: set[int] = set()
    for _, t in (*module.named_parameters(remove_duplicate=False),
                 *module.named_buffers(remove_duplicate=False)):
        if id(t) in seen:
            return True
        seen.add(id(t))
    return False


def functional_model(module: nn.Module, loss_fn: Callable | None = None, *,
                     params: Selector = None,
                     unpack: Callable[[Any], tuple[tuple, dict, Any]] = default_unpack,
                     ) -> FunctionalModel:
    """Return ``FunctionalModel(params, loss, forward, fixed, module)`` for ``module``.

    ``loss(p, example) = loss_fn(module_p(*args[None]), target[None])`` for one example, where
    ``module_p`` is the module with the selected parameters replaced by ``p`` (and the rest fixed).

    Args:
        module: any ``nn.Module``; for BatchNorm/Dropout call ``module.eval()`` first.
        loss_fn: batch loss ``loss_fn(output, target) -> Tensor[]`` (e.g. ``F.cross_entropy``);
            None if only ``forward`` is needed.
        params: which parameters to attribute over (see :func:`select_params`); None takes
            every one, ``requires_grad=False`` included (warned where only some are frozen).
        unpack: ``example -> (args, kwargs, target)``. A model with absolute position
            embeddings warns once on a left-padded batch without ``position_ids``.

    Raises:
        ValueError: unknown parameter names; Hugging Face gradient checkpointing in training
            mode (:func:`check_checkpointing`); later, a params dict whose keys differ from the
            selection (the error names the missing and unexpected keys).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functional_model(module=...): expected an nn.Module, "
                        f"got {type(module).__name__}.")
    from .transforms.padding import _user_call, absolute_positions, watch_left_padding

    check_checkpointing("functional_model", "module", module)
    all_params = dict(module.named_parameters())
    chosen = select_params(list(all_params), params, func="functional_model")
    frozen = [n for n, p in all_params.items() if not p.requires_grad] if params is None else []
    if 0 < len(frozen) < len(all_params):  # all frozen: a model frozen for use, not trained so
        warnings.warn(f"functional_model(params=None): {len(frozen)} of {len(all_params)} "
                      f"parameter tensors have requires_grad=False (first: {frozen[0]!r}) and "
                      "are attributed over as well. For the trained ones only (adapters, LoRA): "
                      "params=[n for n, p in module.named_parameters() if p.requires_grad]; to "
                      "keep all and silence this: params=lambda name: True.",
                      stacklevel=_user_call()[0])
    if absolute_positions(module):  # left padding needs position_ids (review RU5 L1)
        watch_left_padding(module)  # (a hook: unpack stays the caller's, for the fast paths)
    selected = {n: all_params[n].detach() for n in chosen}
    fixed = {n: p.detach() for n, p in all_params.items() if n not in selected}
    fixed.update({n: b.detach() for n, b in module.named_buffers()})
    if module.training and any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))
                               for m in module.modules()):
        warnings.warn("functional_model(module=...): the module is in training mode and has "
                      "BatchNorm/Dropout; per-example gradients need module.eval().", stacklevel=2)
    expected = set(chosen)
    shapes = {n: tuple(v.shape) for n, v in selected.items()}
    ties, shared = _has_tied_tensors(module), shared_slots(module)

    def call(p: Params, example):
        if p.keys() != expected:
            missing, extra = sorted(expected - p.keys()), sorted(p.keys() - expected)
            raise ValueError(f"loss/forward(params=...): expected the keys of the selected "
                             f"parameters, got missing {missing}, unexpected {extra}.")
        bad = [k for k, v in p.items() if tuple(v.shape) != shapes[k]]
        if bad:
            k = bad[0]
            raise ValueError(f"loss/forward(params=...): expected the module's shapes, got "
                             f"{list(p[k].shape)} at key {k!r} (the module has "
                             f"{list(shapes[k])}).")
        args, kwargs, target = unpack(example)
        add_batch = lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t
        args = tuple(add_batch(a) for a in args)
        kwargs = {k: add_batch(v) for k, v in kwargs.items()}
        try:  # free unless it raises (Python 3.11 exceptions)
            out = call_module(module, {**fixed, **p}, args, kwargs, strict=True,
                              tie_weights=ties, shared=shared)
        except RuntimeError as err:
            clear = require_grads_error(module, err)
            if clear is None:
                raise
            raise clear from err
        return out, target

    def forward(p: Params, example):
        out, _ = call(p, example)
        return tree_map(lambda t: t.squeeze(0) if isinstance(t, Tensor) else t, out)

    def loss(p: Params, example) -> Tensor:
        if loss_fn is None:
            raise ValueError("loss(...): functional_model was built with loss_fn=None.")
        out, target = call(p, example)
        if target is None:
            return loss_fn(out)
        try:  # free unless it raises (Python 3.11 exceptions)
            return loss_fn(out, target.unsqueeze(0) if isinstance(target, Tensor) else target)
        except RuntimeError as err:
            clear = target_dtype_error(loss_fn, out, target, err)
            if clear is None:
                raise
            raise clear from err

    # what the closure reads, for :func:`bridged`: the capture engine differentiates the
    # model's fields, not its ``loss``, so it must know the two agree. The mark holds no
    # reference back to ``loss`` (a cycle would keep the module alive until a gc pass)
    loss._bridge = Bridge(module, loss_fn, unpack, fixed, expected, shapes, ties, shared)
    return FunctionalModel(selected, loss, forward, fixed, module, loss_fn, unpack)


# the code of functional_model's ``loss`` closure: every model's loss runs it
_LOSS_CODE = next(c for c in functional_model.__code__.co_consts
                  if getattr(c, "co_name", None) == "loss")


class Bridge(NamedTuple):
    """What :func:`functional_model`'s ``loss`` closure reads (its ``_bridge`` mark): the
    module, batch loss, unpack and fixed tensors, the selected keys and shapes, and the two
    call decisions."""

    module: nn.Module
    loss_fn: Callable | None
    unpack: Callable
    fixed: Params
    expected: set
    shapes: dict
    ties: bool
    shared: Any


def bridge_of(loss) -> Bridge | None:
    """The :class:`Bridge` of :func:`functional_model`'s own ``loss`` closure; None for any
    other function (a replaced loss, a wrapper that copied its ``__dict__``)."""
    bound = getattr(loss, "_bridge", None)
    if not isinstance(bound, Bridge):
        return None
    # the closure's own code (equal, not identical, after a cloudpickle round trip); a
    # functools.wraps copy of the mark runs other code or names what it wraps
    code = loss.__code__ if isinstance(loss, FunctionType) else None
    if (code is not _LOSS_CODE and code != _LOSS_CODE) or "__wrapped__" in loss.__dict__:
        return None
    return bound


def marked_module(fn) -> nn.Module | None:
    """The module of the ``_bridge`` mark on ``fn`` or on what it wraps (``__wrapped__``), even
    where ``fn`` is not :func:`functional_model`'s own loss: for decisions that are right either
    way (hvp's rev-rev for padding rows)."""
    for f in (fn, inspect.unwrap(fn) if callable(fn) else fn):
        bound = getattr(f, "_bridge", None)
        if isinstance(bound, Bridge):
            return bound.module
    return None


# tensors whose data pointer is their values' (not a subclass's wrapper): a module's own
# nn.Parameter is one (review RF L2)
_PLAIN = (Tensor, nn.Parameter)


def same_storage(a: Params, b: Params) -> bool:
    """Whether two dicts hold, key by key, the same tensors or views of one storage
    with equal data pointer, shape, stride, dtype and device (plain strided tensors and
    ``nn.Parameter`` only)."""
    if a is b:
        return True
    if a.keys() != b.keys():  # the closure reads ``{**fixed, **params}``: order is free
        return False
    for k, x in a.items():
        y = b[k]
        if x is y:
            continue
        if not (type(x) in _PLAIN and type(y) in _PLAIN and x.layout == y.layout == torch.strided):
            return False
        if (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device) != \
                (y.data_ptr(), y.shape, y.stride(), y.dtype, y.device):
            return False
    return True


def bridged(model: FunctionalModel) -> bool:
    """Whether ``model.loss`` is the closure :func:`functional_model` built for ``model.module``,
    ``model.loss_fn``, ``model.unpack`` (identity) and ``model.fixed`` (the same storage): False
    after ``model._replace(loss=...)``, ``_replace(loss_fn=...)`` or ``_replace(fixed=<other
    tensors>)``, where methods that differentiate ``module`` with ``loss_fn`` and ``fixed`` (the
    per-layer capture, K-FAC) would not attribute ``loss``."""
    bound = bridge_of(getattr(model, "loss", None))
    if not isinstance(model, FunctionalModel) or bound is None:
        return False
    # ``fixed`` by storage, not identity: dropout_masks rebinds it to a new dict of new tensor
    # objects over the same storage (detach), which the closure reads the same
    return (bound.module is model.module and bound.loss_fn is model.loss_fn
            and bound.unpack is model.unpack and same_storage(bound.fixed, model.fixed))


def check_bridged(func: str, arg: str, model, condition: str = "", fix: str = "") -> None:
    """Raise a ValueError naming ``func(arg=...)`` where ``model`` is a FunctionalModel that is not
    :func:`bridged`: for methods that differentiate ``module`` with ``loss_fn`` by design."""
    if isinstance(model, FunctionalModel) and not bridged(model):
        raise ValueError(_msg(func, arg, "a FunctionalModel whose loss is functional_model's own "
                              f"for its module, loss_fn and fixed tensors{condition}",
                              "a replaced loss (or other fixed tensors)",
                              f"Build functional_model(module, your_loss_fn) instead{fix}."))


def check_eval(func: str, arg: str, model) -> None:
    """Raise a ValueError naming ``func(arg=...)`` where ``model`` is a FunctionalModel with an
    ``nn.Dropout`` (any of its kinds, ``p > 0``) in training mode: its per-example gradients
    would be random draws (vmap refuses them, a capture pass mixes them). A module whose
    forward runs under fixed masks (:func:`~dattri_fn.attribute.dropout_masks.dropout_members`'
    ``mask(model)``) is deterministic and passes. The module's mode is read, not its forward:
    a Dropout submodule that forward never calls is refused too (``module.eval()`` is the fix);
    a functional ``F.dropout`` is not seen here (vmap's refusal names it later)."""
    if isinstance(model, FunctionalModel):
        check_eval_module(func, arg, model.module, (
            "Call module.eval() before functional_model; to average over dropout masks, use "
            f"dropout_members(lambda mask: {func}(mask(model), ...), n_masks=...)."))
    else:  # a model's own loss (fm.loss): its module, for :func:`check_checkpointing` only
        check_checkpointing(func, arg, marked_module(model))


def check_eval_module(func: str, arg: str, module,
                      fix: str = "Call module.eval() first.") -> None:
    """:func:`check_eval` of a module itself (``kfac_factors(module=...)``), and
    :func:`check_checkpointing`."""
    check_checkpointing(func, arg, module)
    if not isinstance(module, nn.Module) or getattr(module, "_dropout_fixed", False):
        return
    live = [n for n, m in module.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    if live:
        raise ValueError(_msg(
            func, arg, "a module in eval mode (deterministic per-example gradients)",
            f"Dropout in training mode at {live}", fix))


def check_checkpointing(func: str, arg: str, module) -> None:
    """Raise a ValueError naming ``func(arg=...)`` where ``module`` runs Hugging Face gradient
    checkpointing: a submodule's ``gradient_checkpointing`` set in training mode (torch's
    checkpoint recomputes in backward, which the per-example paths do not follow; review RU5
    M1). Eval mode runs (HF does not checkpoint there); its input-require-grads hook fails
    only under a torch.func transform, named there (:func:`require_grads_error`)."""
    if not isinstance(module, nn.Module):
        return
    checkpoints = lambda m: m.training and getattr(m, "gradient_checkpointing", False) is True
    if not any(checkpoints(m) for m in module.modules()):
        return  # (names are built on the error path only)
    found = [n or type(m).__name__ for n, m in module.named_modules() if checkpoints(m)]
    more = f" (and {len(found) - 2} more)" if len(found) > 2 else ""
    raise ValueError(_msg(
        func, arg, "a module torch.func can differentiate per example",
        "; ".join(f"gradient checkpointing at {n!r} in training mode" for n in found[:2]) + more,
        _CHECKPOINT_REMEDY + "."))


def batched_loss(model: FunctionalModel) -> Callable[[Params, Any], Tensor]:
    """Return ``(params, batch) -> [loss_fn(out_i, target_i) for i]`` from ONE forward.  # -> [B]

    The model's ``loss`` for every example of a batch at once (no vmap: any forward, e.g.
    transformers' SDPA attention), assuming the examples are independent (eval mode).
    """
    from .transforms.layers import per_example_losses

    unpack = model.unpack or default_unpack
    ties, shared = _has_tied_tensors(model.module), shared_slots(model.module)

    def rows(params: Params, batch) -> Tensor:
        args, kwargs, target = unpack(batch)
        out = call_module(model.module, {**model.fixed, **params}, args, kwargs, strict=True,
                          tie_weights=ties, shared=shared)
        return per_example_losses(model.loss_fn, out, target)

    return rows


def load_params(source: str | os.PathLike | Mapping[str, Tensor], like: Params, *,
                map_location=None) -> Params:
    """Return a checkpoint's tensors for exactly the keys of ``like``, in ``like``'s order.

    ``source`` is a state dict or a path loaded with ``torch.load(weights_only=True)`` (no
    arbitrary code runs). Extra keys (buffers, other layers) are ignored; missing keys or shape
    mismatches raise, naming them. Tensors are moved to the device and dtype of ``like``.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            state = torch.load(source, map_location=map_location or "cpu", weights_only=True)
        except OSError:
            raise  # a missing or unreadable path: its own message names the file
        except Exception as e:  # torch.load fails on a damaged file in many ways
            why = (str(e).splitlines() or [""])[0]
            raise ValueError(f"load_params(source=...): expected a checkpoint that "
                             f"torch.load(weights_only=True) reads, got {os.fspath(source)!r} "
                             f"that fails ({type(e).__name__}: {why}). The file may be "
                             f"truncated or not a torch checkpoint; save it again.") from e
    elif isinstance(source, Mapping):
        state = source
    else:
        raise TypeError(f"load_params(source=...): expected a path or a state dict, "
                        f"got {type(source).__name__}.")
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise TypeError(f"load_params(source=...): expected a state dict (name -> Tensor), "
                        f"got a {type(state).__name__}.")
    missing = [k for k in like if k not in state]
    if missing:
        raise ValueError(f"load_params(source=...): expected keys {list(like)}, "
                         f"missing {missing}.")
    not_tensors = [k for k in like if not isinstance(state[k], Tensor)]
    if not_tensors:
        k = not_tensors[0]
        raise TypeError(f"load_params(source=...): expected Tensor values, got "
                        f"{type(state[k]).__name__} at key {k!r}.")
    bad = [k for k in like if tuple(state[k].shape) != tuple(like[k].shape)]
    if bad:
        raise ValueError(f"load_params(source=...): shape mismatch at {bad}: expected "
                         f"{[tuple(like[k].shape) for k in bad]}, got "
                         f"{[tuple(state[k].shape) for k in bad]}.")
    out = {k: state[k].detach().to(device=like[k].device, dtype=like[k].dtype) for k in like}
    return check_params("load_params", "source", out)


def load_checkpoints(sources, like: Params, *, map_location=None) -> list[Params]:
    """Return ``[load_params(s, like) for s in sources]``: checkpoints for ensemble methods.

    Each source is a path (loaded with ``weights_only=True``) or a state dict; every one must
    hold the keys of ``like`` with its shapes (errors name the source's position).
    """
    if isinstance(sources, (str, os.PathLike, Mapping)) or not isinstance(sources, Iterable):
        raise TypeError(f"load_checkpoints(sources=...): expected a list of paths or state "
                        f"dicts, got {type(sources).__name__}.")
    out = []
    for i, src in enumerate(sources):
        try:
            out.append(load_params(src, like, map_location=map_location))
        except (TypeError, ValueError) as e:
            raise type(e)(f"load_checkpoints(sources[{i}]=...): {e}") from e
    if not out:
        raise ValueError("load_checkpoints(sources=...): expected at least one checkpoint, got none.")
    return out
