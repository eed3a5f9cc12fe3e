"""``functional_call`` that leaves the module as it found it, a submodule applied twice included.

``torch.func.functional_call`` (torch 2.13) swaps the given tensors into the module under every
name they have and swaps the originals back name by name. A submodule the module reaches under
two names (one ``nn.Linear`` applied twice in an ``nn.Sequential``) has ONE slot for both: the
second swap saves the caller's tensor as that slot's "original", and the restore leaves it in the
module. A later ``functional_model`` of that module then reads the last call's weights (a
checkpoint's, or a vmapped tensor without storage). :func:`call_module` puts every such slot back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import functional_call

from ._blame import refuse_reentrant_checkpoint, require_grads_error


def shared_slots(module: nn.Module) -> tuple[tuple[dict, str], ...]:
    """``(slot dict, name)`` of every parameter and buffer of a submodule that ``module`` reaches
    under two or more names; empty for a module whose submodules each have one name."""
    counts = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
    return tuple((slots, name) for m in module.modules() if counts[id(m)] > 1
                 for slots in (m._parameters, m._buffers) for name in slots)


def call_module(module: nn.Module, tensors: Mapping[str, Tensor], args=(), kwargs=None, *,
                strict: bool = False, tie_weights: bool = True,
                shared: tuple[tuple[dict, str], ...] | None = None):
    """Return ``functional_call(module, tensors, args, kwargs, strict=, tie_weights=)`` with every
    shared submodule's slots holding their original tensors again afterwards, also when the
    call raises.

    Args:
        module, tensors, args, kwargs, strict, tie_weights: as ``torch.func.functional_call``.
        shared: :func:`shared_slots` of ``module``, where the caller found them once (e.g.
            ``functional_model``, when it binds the module: a shared submodule swapped into the
            module after that is not restored; bind the model again); None finds them per call.
    """
    if shared is None:
        shared = shared_slots(module)
    if not shared:
        return _call(module, tensors, args, kwargs, strict, tie_weights)
    saved = [(slots, name, slots[name]) for slots, name in shared]
    try:
        return _call(module, tensors, args, kwargs, strict, tie_weights)
    finally:
        for slots, name, original in saved:
            slots[name] = original


def _call(module, tensors, args, kwargs, strict, tie_weights):
    """``functional_call``, with two of Hugging Face's / torch's checkpointing traps named
    (review RI MED-2, MED-4): the input-require-grads hook under a transform, and a user's
    reentrant checkpoint whose layers would get no gradient (first grad-enabled forward)."""
    try:  # free unless it raises (Python 3.11 exceptions)
        with refuse_reentrant_checkpoint(module):
            return functional_call(module, tensors, args, kwargs, strict=strict,
                                   tie_weights=tie_weights)
    except RuntimeError as err:
        clear = require_grads_error(module, err)
        if clear is None:
            raise
        raise clear from err
