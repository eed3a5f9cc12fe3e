"""Errors raised inside a public call reported in its terms (:func:`blame_data`,
:func:`blame_keys`, :func:`dtype_error`). Moved out of :mod:`dattri_fn._checks`, which
re-exports every name (import them from there); the few helpers of ``_checks`` these need are
imported on the error path only, so the two modules import in either order."""

from __future__ import annotations

import contextlib
import re
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor

_LIBRARY_ERROR = re.compile(r"^[\w./]+\([\w\[\]]+=\.\.\.\): expected")
# An inner call's error about its own data argument (hvp/gnvp/linear_gnvp/kfac_factors(data=...)).
_INNER_DATA_ERROR = re.compile(r"^([\w./]+)\((data|batch)=\.\.\.\): expected")
# torch.utils.checkpoint's "different metadata" dump names shapes and dtypes of the model's
# own recomputed tensors, not the user's data
_TRANSFORM_LIMIT = re.compile(r"vmap|functorch|torch\.func|data-dependent|\.item\(\)|out of memory|"
                              r"torch\.utils\.checkpoint")
# What torch says when examples do not fit the model or the loss (shapes, labels, dtypes);
# any other error (a user's own exception, out of memory) passes through as raised.
_DATA_ERROR = re.compile(r"shape|size|mat1|mat2|out of bounds|out of range|dtype|scalar type|"
                         r"[Tt]arget|index", re.IGNORECASE)


# torch's phrases for a dtype MISMATCH (matmul, conv, sdpa, norms, embedding ids, targets); a
# text that only mentions a dtype (a metadata dump: "'dtype': torch.float32") is not one (RU5 M1)
_DTYPE_ERROR = re.compile(r"same dtype|scalar types?\b|type \([\w.: ]+\) and \w+ type|mixed dtype|"
                          r"[Ee]xpected (?:\w+ )?dtype|Found dtype \w+ but expected|Double and Float|"
                          r"Float and Double|can't be cast to the desired output type|"
                          r"but got a tensor with dtype")


# an index of a floating dtype (float class labels into gather / index_select): never the
# model's dtype, whatever the data's (RI MED-3)
_INDEX_DTYPE = re.compile(r"[Ee]xpected dtype int[\w/ ]* for index")


def dtype_error(func: str, arg: str, batch, err: RuntimeError) -> Exception | None:
    """A clear TypeError for torch's dtype mismatch between ``batch`` and the model (None for
    any other error): the user's data, not an inner matmul, is what to fix."""
    if not _DTYPE_ERROR.search(str(err)):
        return None
    from ._checks import _msg, batch_leaves  # (error path only; _checks imports this module)

    if _INDEX_DTYPE.search(str(err)):  # gather/index_select's index: labels, not the data
        return TypeError(_msg(func, arg, "integer class labels or indices (torch.int64)",
                              f"an index of another dtype (torch: {str(err).splitlines()[0]})",
                              "Cast the labels or indices: y.long()."))
    leaves = [t for t in batch_leaves(batch) if isinstance(t, Tensor)]
    floats = {str(t.dtype) for t in leaves if t.is_floating_point()}
    dtypes = sorted(floats or {str(t.dtype) for t in leaves})  # integer inputs: show them
    return TypeError(_msg(func, arg, "floating tensors in the dtype of the model's parameters",
                          f"data of {dtypes} (torch: {str(err).splitlines()[0]})",
                          "Cast one to the other, e.g. x.float() or model.double()."))


@contextlib.contextmanager
def blame_keys(func: str, arg: str, params):
    """Report a KeyError for a name ``params`` lacks (raised by the user's function reading
    ``params[name]``) as ``func(arg=...)``: the params dict, not the function, is what to fix.

    Any other KeyError (a key the params hold, a dict Batch's missing field) is raised as it is.
    """
    try:
        yield
    except KeyError as err:
        key = err.args[0] if err.args else None
        if not isinstance(params, Mapping) or not isinstance(key, str) or key in params:
            raise
        from ._checks import _msg
        raise ValueError(_msg(func, arg, "the parameters the model's functions read",
                              f"no {key!r} among {list(params)}")) from err


@contextlib.contextmanager
def blame_data(func: str, arg: str, batch):
    """Report torch's error on the user's examples as ``func(arg=...)``, at a public boundary.

    A RuntimeError, IndexError or AssertionError raised while the model and loss run on ``batch`` (a feature
    width the model does not take, a label out of range, a float label for a class index, data
    in another dtype) becomes a ValueError (TypeError for dtypes) naming the call and the
    argument, with torch's message and the original chained (other errors, e.g. the user's own
    or out of memory, are raised as they are). An error an inner boundary already
    blamed on the data (``hvp(data=...)`` inside an influence method) is re-worded for this,
    the outer call. Other library errors and the limits of torch.func transforms (vmap) pass
    through unchanged.
    """
    try:
        yield
    except (TypeError, ValueError) as err:
        inner = getattr(err, "blamed", None)
        if inner is None:  # an inner boundary's own check of its data argument
            found = _INNER_DATA_ERROR.match(str(err))
            inner = found.groups() if found else None
        if inner is None or inner == (func, arg):
            raise
        text = str(err).split("): ", 1)[1]
        outer = type(err)(f"{func}({arg}=...): {text}")
        outer.blamed = (func, arg)
        raise outer from err
    except (RuntimeError, IndexError, AssertionError) as err:
        # AssertionError: torch's decompositions assert on targets (labels [n, 1]: RU3 L2)
        text = str(err)
        if (_LIBRARY_ERROR.match(text) or _TRANSFORM_LIMIT.search(text)
                or not _DATA_ERROR.search(text)):
            raise
        from ._checks import _msg

        clear = dtype_error(func, arg, batch, err) if isinstance(err, RuntimeError) else None
        clear = clear or ValueError(_msg(
            func, arg, "examples the model and its loss accept (input shapes, label values "
            "and dtypes)", f"an error from torch: {text.splitlines()[0] if text else err!r}"))
        clear.blamed = (func, arg)
        raise clear from err


# torch's words for a target of a dtype the loss does not take: class ids of another integer
# dtype or floats where int64 is wanted (cross_entropy, nll_loss); integers where floats are
# wanted (binary_cross_entropy*); a generic mismatch counts only where torch found the target's
_WANTS_INT64 = re.compile(r"expected target dtype to be Long|expected scalar type Long")
_WANTS_FLOAT = re.compile(r"can't be cast to the desired output type|Found dtype \w+ but expected")
_MISMATCH = re.compile(r"expected scalar type \w+ but found (\w+)")
_TORCH_NAME = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
               torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
               torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}


def target_dtype_error(loss_fn, out, target, err: RuntimeError) -> TypeError | None:
    """A TypeError naming ``functional_model(loss_fn=...)``, the loss and the target dtype it
    takes, for torch's dtype error of ``loss_fn(out, target)`` (None for any other error).
    Marked ``blamed``: a public boundary's ``blame_data`` re-words it as its own call's data."""
    if not isinstance(target, Tensor):
        return None
    text = str(err)
    dtype = getattr(getattr(out, "logits", out), "dtype", None)
    found = _MISMATCH.search(text)
    if _WANTS_INT64.search(text):
        if target.dtype == torch.int64:  # the class ids are fine: another tensor is not
            return None
        want = "integer class ids (torch.int64)"
    elif _WANTS_FLOAT.search(text) or (found and found.group(1) == _TORCH_NAME.get(target.dtype)):
        if target.dtype == dtype:
            return None
        want = f"floating targets ({dtype}, the output's dtype)"
    else:  # e.g. a bmm on two float dtypes inside the loss: not the target's
        return None
    from ._checks import _msg  # (error path only)

    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    clear = TypeError(_msg(
        "functional_model", "loss_fn", f"{want} for the loss {name}",
        f"{target.dtype} targets (torch: {text.splitlines()[0]})",
        "Cast the labels: y.float() for a loss of logits or values (binary_cross_entropy_with"
        "_logits, mse_loss), y.long() for class indices (cross_entropy, nll_loss)."))
    clear.blamed = ("functional_model", "loss_fn")
    return clear


_CHECKPOINT_REMEDY = ("Call model.activation_checkpointing_disable() (transformers < 5.25: "
                      "gradient_checkpointing_disable()); model.disable_input_require_grads(); "
                      "model.eval() first")


# the forward hook of Hugging Face's enable_input_require_grads (PEFT's: singular) on the input
# embeddings: it calls requires_grad_(), which torch.func refuses inside a transform
_REQUIRE_GRADS_HOOKS = frozenset(("make_inputs_require_grads", "make_inputs_require_grad"))


def require_grads_error(module, err: RuntimeError) -> ValueError | None:
    """A ValueError naming ``functional_model(module=...)``, the hooked submodule and the
    remedy, for torch's refusal of ``requires_grad_()`` inside a transform (vmap, grad) raised
    by the input-require-grads hook (review RU5 M1, RI MED-2); None for any other error. The
    capture paths run the hook outside any transform and are not refused."""
    if "requires_grad_()" not in str(err):
        return None
    hooked = [n or type(m).__name__ for n, m in module.named_modules() if m._forward_hooks and any(
        getattr(h, "__name__", None) in _REQUIRE_GRADS_HOOKS for h in m._forward_hooks.values())]
    if not hooked:
        return None
    from ._checks import _msg  # (error path only)
    from .transforms.padding import _outer_call

    name = _outer_call()[1]
    return ValueError(_msg(
        "functional_model", "module", "a module torch.func can differentiate per example"
        + (f" (here under {name})" if name != "?" else ""),
        f"the input-require-grads forward hook on {hooked[0]!r}",
        _CHECKPOINT_REMEDY + " (or remove that hook); grad_dot(model), logra and factgrass take it in "
        "eval mode."))


_NO_GRAD_INPUTS = "None of the inputs have requires_grad=True"


_CHECKED = weakref.WeakSet()  # modules whose first grad-enabled library forward ran clean
_NULL = contextlib.nullcontext()


def refuse_reentrant_checkpoint(module):
    """A context for one library forward of ``module``: on its first with grad enabled, torch's
    warning that a reentrant ``torch.utils.checkpoint`` segment has no input requiring grad (a
    user's own ``use_reentrant=True``, eval mode) becomes a ValueError naming
    ``functional_model(module=...)``: its layers get no gradient and the scores miss them (55%
    off, RI MED-4). Later forwards get a null context (one set lookup)."""
    if module in _CHECKED or not torch.is_grad_enabled():
        return _NULL
    return _first_forward(module)


@contextlib.contextmanager
def _first_forward(module):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=_NO_GRAD_INPUTS, category=UserWarning)
        try:
            yield
        except UserWarning as err:
            if _NO_GRAD_INPUTS not in str(err):
                raise
            from ._checks import _msg  # (error path only)
            from .transforms.padding import _outer_call

            name = _outer_call()[1]
            raise ValueError(_msg(
                "functional_model", "module", "a module whose layers all reach the gradient"
                + (f" (here under {name})" if name != "?" else ""),
                "a torch.utils.checkpoint(use_reentrant=True) segment none of whose inputs "
                "requires grad (its layers would get no gradient)",
                "Use torch.utils.checkpoint(..., use_reentrant=False) or call the layers "
                "without checkpointing.")) from err
    _CHECKED.add(module)
