"""ReLU as a product with its own 0/1 mask, for the steps a reverse pass differentiates twice.

MAGIC's reverse pass (:func:`dattri_fn.attribute.metagradient.metagradient`) differentiates a
training step's gradient once more under ``vmap``. Through ``nn.ReLU`` that second derivative
goes through ``threshold_backward``, whose derivative in its input is declared as a tensor of
zeros: each ReLU then costs one ``[k, *activation]`` zero fill and one add of it into the
input's cotangent per vmapped chunk, for a term that is zero. Written as

    relu(x) = x * m,    m = 1[x > 0]   (m computed without a graph),

the first derivative is ``g * m`` and the second is ``gg * m`` with no path back to ``x``: the
same numbers (``relu`` is piecewise linear, its second derivative is zero wherever it exists),
without the zero tensors. Forward values equal ``relu``'s up to the sign of zero (``x * 0`` is
``-0.0`` for ``x < 0``); meant for ``vjp_step=``, like :mod:`.gemm_conv`, so that the forward run
keeps ``nn.ReLU``. digits-cnn: ~0.9x the reverse step (``benchmarks/magic_speed.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


def mask_relu(x: Tensor) -> Tensor:
    """Return ``relu(x)`` as ``x * 1[x > 0]`` with the mask held constant.  # [*] -> [*]"""
    return x * (x.detach() > 0).to(x.dtype)


class MaskReLU(nn.Module):
    """``nn.ReLU`` computed by :func:`mask_relu` (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return mask_relu(x)


def _swappable(m: nn.Module) -> bool:
    # An in-place ReLU may be relied on to overwrite its input (a residual read after it), and
    # hooks would be dropped by the swap: both are left as they are.
    return (type(m) is nn.ReLU and not m.inplace and not m._forward_hooks
            and not m._forward_pre_hooks and not m._backward_hooks)


def with_mask_relus(module: nn.Module) -> nn.Module:
    """Return a deep copy of ``module`` whose out-of-place, hook-free ``nn.ReLU`` submodules are
    :class:`MaskReLU` (the same parameters, names and values; the module itself if it is one).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"with_mask_relus(module=...): expected an nn.Module, "
                        f"got {type(module).__name__}.")
    out = copy.deepcopy(module)
    if _swappable(out):
        return MaskReLU()
    for name, sub in list(out.named_modules()):
        if name and _swappable(sub):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent), leaf, MaskReLU())
    return out


class _MaskReLUMode(TorchFunctionMode):
    """Computes every out-of-place ``relu`` called as a torch function by :func:`mask_relu`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS and len(args) == 1 and not kwargs.get("inplace", False):
            return mask_relu(args[0])
        return func(*args, **kwargs)


_RELUS = (torch.relu, F.relu, Tensor.relu)


def mask_relu_step(step: Callable) -> Callable:
    """Return ``step`` with every out-of-place ``relu`` its forward calls (``torch.relu``,
    ``F.relu``, ``Tensor.relu``, ``nn.ReLU``) computed by :func:`mask_relu`: for a model whose
    ReLU is a function call (the bundled TinyLM's MLP), where :func:`with_mask_relus` finds no
    module to swap. The same arguments and results as ``step``; meant for ``vjp_step=``.

    Raises:
        TypeError: ``step`` is not callable.
    """
    if not callable(step):
        raise TypeError(f"mask_relu_step(step=...): expected a callable step, "
                        f"got {type(step).__name__}.")

    def masked(*args, **kwargs):
        with _MaskReLUMode():
            return step(*args, **kwargs)

    return masked


def count_relus(module: nn.Module) -> int:
    """The number of submodules :func:`with_mask_relus` would swap."""
    return sum(_swappable(m) for m in module.modules())


__all__ = ["MaskReLU", "count_relus", "mask_relu", "mask_relu_step", "with_mask_relus"]
