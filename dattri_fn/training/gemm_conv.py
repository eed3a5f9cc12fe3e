"""``Conv2d`` as one GEMM over unfolded patches, for the convolutions a reverse pass vmaps.

MAGIC's reverse pass (:func:`dattri_fn.attribute.metagradient.metagradient`) differentiates a
training step's gradient once more for ``k`` test targets at once under ``vmap``. Through
``nn.Conv2d`` torch's batching rules turn the first layer's second-order terms (its weight
cotangent ``[k, Co, Ci, a, b]`` against the fixed input images) into convolutions with ``k Co``
output channels over one input channel, and its weight gradient into a ``convolution_backward``
of the same shape: with ``Ci a b = 9`` those run far below the BLAS rate. Written as

    y = W' @ U(x) + b,    W' = W.reshape(Co, Ci a b),   U(x) = im2col(x) as [Ci a b, N H' W']

the same terms become plain matrix products in which vmap folds the targets into one GEMM's
rows (``[k Co, Ci a b] @ [Ci a b, N H' W']``) and the patches ``U(x)`` of the data are computed
once per step. Equal to ``F.conv2d`` up to float rounding (another summation order): meant for
``vjp_step=``; the forward run keeps ``nn.Conv2d`` so that a replay is bit for bit.

Where the layer's input is itself differentiated (a hidden convolution) the unfolded form is
slower than torch's own (its ``[k N, Ci a b, H' W']`` patch tensors are ``a b`` times the
activations): name only the layers that read the data.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gemm_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                padding: tuple[int, int] = (0, 0)) -> Tensor:
    """Return ``F.conv2d(x, weight, bias, padding=padding)`` (stride 1, dilation 1, one group)
    as ``W' @ im2col(x)``, one matrix product.  # [N, Ci, H, W], [Co, Ci, a, b] -> [N, Co, H', W']
    """
    if x.ndim != 4:
        raise ValueError(f"gemm_conv2d(x=...): expected a batched [N, C, H, W] tensor, got shape "
                         f"{tuple(x.shape)}.")
    n, _, h, w = x.shape
    co, _, a, b = weight.shape
    ho, wo = h + 2 * padding[0] - a + 1, w + 2 * padding[1] - b + 1
    cols = F.unfold(x, (a, b), padding=padding)  # [N, Ci a b, H' W']
    cols = cols.transpose(0, 1).reshape(cols.shape[1], n * ho * wo)  # [Ci a b, N H' W']
    flat = weight.reshape(co, -1)
    y = flat @ cols if bias is None else torch.addmm(bias[:, None], flat, cols)  # [Co, N H' W']
    # Back to NCHW in contiguous memory: a channels-last-strided view here makes a later
    # max_pool2d query its memory format inside vmap, which torch 2.13 refuses (NYI).
    return y.reshape(co, n, ho, wo).transpose(0, 1).contiguous()


class GemmConv2d(nn.Module):
    """An ``nn.Conv2d`` (stride 1, dilation 1, one group, zero padding) computed by
    :func:`gemm_conv2d`; the same parameter names (``weight``, ``bias``) and tensors."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not supported(conv):
            raise ValueError(f"GemmConv2d(conv=...): expected an nn.Conv2d with stride 1, "
                             f"dilation 1, groups 1, zero padding given as ints and no forward "
                             f"hooks, got {conv}.")
        self.weight, self.bias = conv.weight, conv.bias
        self.padding = tuple(conv.padding)

    def forward(self, x: Tensor) -> Tensor:
        return gemm_conv2d(x, self.weight, self.bias, self.padding)


def supported(conv: nn.Module) -> bool:
    """Whether :class:`GemmConv2d` computes what ``conv`` computes (no forward hooks: the swap
    would drop them)."""
    return (type(conv) is nn.Conv2d and tuple(conv.stride) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not conv._forward_hooks and not conv._forward_pre_hooks)


def with_gemm_convs(module: nn.Module, names: Iterable[str]) -> nn.Module:
    """Return a deep copy of ``module`` whose ``nn.Conv2d`` submodules ``names`` are
    :class:`GemmConv2d` (same parameter names and values, so the same params dict drives both).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: a name that is not a submodule, or a convolution :func:`supported` refuses.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"with_gemm_convs(module=...): expected an nn.Module, "
                        f"got {type(module).__name__}.")
    names = [names] if isinstance(names, str) else list(names)
    found = dict(module.named_modules())
    bad = [n for n in names if n not in found or not supported(found[n])]
    if bad:
        known = [n for n, m in found.items() if supported(m)]
        raise ValueError(f"with_gemm_convs(names=...): expected names of stride-1 nn.Conv2d "
                         f"submodules ({known}), got {bad}.")
    out = copy.deepcopy(module)
    if "" in names:  # the module itself is the convolution
        return GemmConv2d(out)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent), leaf, GemmConv2d(out.get_submodule(name)))
    return out


__all__ = ["GemmConv2d", "gemm_conv2d", "supported", "with_gemm_convs"]
