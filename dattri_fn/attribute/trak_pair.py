"""TRAK's recipe pair: whether a weight function is the margin's own weight, bridged from one module.

Split out of :mod:`dattri_fn.attribute.trak` (stop 26, no behaviour change); ``_weight_follows``
stays importable from there (and is looked up there by :func:`~dattri_fn.attribute.trak.trak`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import FunctionalModel
from .outputs import classification_margin_loss, classification_weight_loss


def _captured(fn, qualname: str) -> dict | None:
    """The values a :func:`dattri_fn.model.functional_model` closure named ``qualname``
    captured, by name; None for any other function."""
    if getattr(fn, "__module__", None) != "dattri_fn.model" or \
            getattr(fn, "__qualname__", None) != f"functional_model.<locals>.{qualname}":
        return None
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()),
                    strict=True))


def _same_value(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if a is b:
            return True
        # a tensor with no plain storage (sparse, mkldnn, a wrapper subclass) is never "the same"
        plain = all(isinstance(t, Tensor) and type(t) is Tensor and t.layout == torch.strided
                    for t in (a, b))
        return (plain and a.data_ptr() == b.data_ptr() and a.shape == b.shape
                and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same_value(a[k], b[k]) for k in a)
    return a is b or (isinstance(a, (set, frozenset, tuple, bool)) and a == b)


def _weight_follows(output_fn, weight_fn) -> bool:
    """Whether ``weight_fn(params, z)`` passes :func:`check_example_fn` whenever ``output_fn``
    does: both the ``loss`` of a :func:`dattri_fn.model.functional_model` bridge whose example
    call captured the same values (module, unpack, selected keys and shapes, the same fixed
    tensors), with the margin and its weight as loss functions. Every step up to the loss is
    then the same (the key and shape checks, the unpack, the forward), and
    :func:`classification_weight_loss` is ``sigmoid(-m).mean()`` of the same :func:`margins`
    (the same label checks on the same logits): a scalar wherever
    :func:`classification_margin_loss` gives one."""
    if not (isinstance(output_fn, FunctionalModel) and isinstance(weight_fn, FunctionalModel)):
        return False
    a, b = _captured(output_fn.loss, "loss"), _captured(weight_fn.loss, "loss")
    if a is None or b is None or a.keys() != b.keys() or a.keys() != {"call", "loss_fn"}:
        return False
    if a["loss_fn"] is not classification_margin_loss or \
            b["loss_fn"] is not classification_weight_loss:
        return False
    ca, cb = _captured(a["call"], "call"), _captured(b["call"], "call")
    return (ca is not None and cb is not None and ca.keys() == cb.keys()
            and all(_same_value(ca[k], cb[k]) for k in ca))
