"""What the factored curvature of a Linear-only model accepts, and the setup of a call.

The limits visible without data (parameters, hooks, training mode), the capture of the Linear
layers, the batch layout, and the first-batch check of a factored product against autodiff
through the module itself. The formulas, costs and limits ("the module docstring" below) are in
:mod:`dattri_fn.operators.linear_curvature`'s docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import (
    _msg,
    batch_size,
    batch_slice,
    check_optional_int,
    regroup,
)
from ..module_call import call_module
from ..transforms import capture
from ..transforms.capture import CaptureError
from ..transforms.layers import module_state, output_shapes, per_example_losses, unpack_example
from ..tree import ravel
from .kfac import _check_call, _layout, _select

__all__ = ["FactoredCurvatureError", "linear_tap"]



class FactoredCurvatureError(ValueError):
    """The model is outside what this module factors (see the module docstring's limits)."""


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


def _augment(acts: dict, layout: dict) -> dict:
    """Append a column of ones to each layer input ``[B, in]`` whose bias is a param."""
    return {n: torch.cat([a, a.new_ones(a.shape[0], 1)], 1) if layout[n][1] is not None else a
            for n, a in acts.items()}


_CHECK_ROWS = 64  # examples of the first batch linear_gnvp checks against autodiff


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
    out_fn = lambda flat: call_module(module, {**state, **unravel(flat)}, args, kwargs)
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


def _verified(tapped, kind: str, batch, *extra) -> tuple[set, tuple]:
    """Return ``(the trace's set of checked signatures, this call's signature)``: the first-batch
    check runs once per trace, loss and input layout (shapes past the batch dim, dtypes)."""
    leaves = torch.utils._pytree.tree_leaves(batch)
    sig = (kind, *map(id, extra), tuple((tuple(t.shape[1:]), t.dtype, t.device)
                                        if isinstance(t, Tensor) else repr(t) for t in leaves))
    if not hasattr(tapped, "verified"):
        tapped.verified = set()
    return tapped.verified, sig
