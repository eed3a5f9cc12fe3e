"""Errors raised inside a public call reported in its terms (:func:`blame_data`,
:func:`blame_keys`, :func:`dtype_error`). Moved out of :mod:`dattri_fn._checks`, which
re-exports every name (import them from there); the few helpers of ``_checks`` these need are
imported on the error path only, so the two modules import in either order."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping

from torch import Tensor

_LIBRARY_ERROR = re.compile(r"^[\w./]+\([\w\[\]]+=\.\.\.\): expected")
# An inner call's error about its own data argument (hvp/gnvp/linear_gnvp/kfac_factors(data=...)).
_INNER_DATA_ERROR = re.compile(r"^([\w./]+)\((data|batch)=\.\.\.\): expected")
_TRANSFORM_LIMIT = re.compile(r"vmap|functorch|torch\.func|data-dependent|\.item\(\)|out of memory")
# What torch says when examples do not fit the model or the loss (shapes, labels, dtypes);
# any other error (a user's own exception, out of memory) passes through as raised.
_DATA_ERROR = re.compile(r"shape|size|mat1|mat2|out of bounds|out of range|dtype|scalar type|"
                         r"[Tt]arget|index", re.IGNORECASE)


_DTYPE_ERROR = re.compile(r"dtype|scalar type|type \(\w+\) and \w+ type|Double and Float|"
                          r"Float and Double")


def dtype_error(func: str, arg: str, batch, err: RuntimeError) -> Exception | None:
    """A clear TypeError for torch's dtype mismatch between ``batch`` and the model (None for
    any other error): the user's data, not an inner matmul, is what to fix."""
    if not _DTYPE_ERROR.search(str(err)):
        return None
    from ._checks import _msg, batch_leaves  # (error path only; _checks imports this module)

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
