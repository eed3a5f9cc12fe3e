"""DataInf: a closed-form, layer-wise approximate inverse of the (damped) gradient Gram.

Per block (layer) ``l`` with per-sample gradients ``g_il`` (``[n, P_l]``), DataInf swaps the
inverse and the average:

    (G_l + lam_l I)^-1  ~  (1/n) sum_i (g_il g_il^T + lam_l I)^-1
                        =  (1/(n lam_l)) sum_i (I - g_il g_il^T / (lam_l + |g_il|^2))

(Sherman-Morrison), which is applied to ``V`` without forming any ``P_l x P_l`` matrix:
``V -> (V - (1/n) sum_i ((V g_il) / (lam_l + |g_il|^2)) g_il^T) / lam_l``. The operator is
block-diagonal over the blocks.

References:
    Kwon, Wu, Wu & Zou, "DataInf: Efficiently Estimating Data Influence in LoRA-tuned LLMs and
    Diffusion Models", 2023, arXiv:2310.00902.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._checks import _msg, check_positive, check_tensor
from .._types import LinOp

__all__ = ["ihvp_datainf", "datainf_damping"]


def _blocks(func: str, grads, blocks) -> dict[str, Tensor]:
    """Validate and return ``{name: [n, P_l]}`` in ravel order."""
    if isinstance(grads, Mapping):
        if blocks is not None:
            raise ValueError(_msg(func, "blocks", "None when grads is a dict", "a value",
                                  "The dict's keys already define the blocks."))
        if not grads:
            raise ValueError(_msg(func, "grads", "a non-empty dict", "an empty dict"))
        out = {}
        for name, g in grads.items():
            check_tensor(func, "grads", g, floating=True)
            if g.ndim < 2:
                raise ValueError(_msg(func, "grads", "tensors [n, ...] per block",
                                      f"shape {list(g.shape)} at key {name!r}"))
            out[name] = g.reshape(g.shape[0], -1)
        ns = {k: v.shape[0] for k, v in out.items()}
        if len(set(ns.values())) != 1:
            raise ValueError(_msg(func, "grads", "the same number of examples n in every block",
                                  f"{ns}"))
    elif isinstance(grads, Tensor):
        check_tensor(func, "grads", grads, ndim=2, floating=True)
        P = grads.shape[1]
        if blocks is None:
            blocks = {"all": slice(0, P)}
        if not isinstance(blocks, Mapping) or not blocks:
            raise TypeError(_msg(func, "blocks", "a non-empty dict[str, slice]",
                                 type(blocks).__name__))
        out, start = {}, 0
        for name, s in blocks.items():
            if not isinstance(s, slice) or s.step not in (None, 1) or s.start != start \
                    or not isinstance(s.stop, int) or s.stop <= start:
                raise ValueError(_msg(func, "blocks", "contiguous slices partitioning "
                                      f"[0, {P}) in order", f"{name!r}: {s!r} at offset {start}",
                                      "Use dattri_fn.tree.block_slices(params)."))
            out[name] = grads[:, s]
            start = s.stop
        if start != P:
            raise ValueError(_msg(func, "blocks", f"slices covering [0, {P})",
                                  f"slices ending at {start}"))
    else:
        raise TypeError(_msg(func, "grads", "a dict {name: [n, ...]} or a [n, P] tensor",
                             type(grads).__name__))
    n = next(iter(out.values())).shape[0]
    if n == 0:
        raise ValueError(_msg(func, "grads", "n >= 1 examples", "n = 0"))
    return out


def _default_damping(blocks: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: 0.1 * (g * g).sum(1).mean() / g.shape[1] for k, g in blocks.items()}


def datainf_damping(grads, *, blocks=None) -> dict[str, Tensor]:
    """Return DataInf's default ``lam_l = 0.1 * mean_i |g_il|^2 / P_l`` per block.  # -> {name: []}

    Args:
        grads, blocks: as :func:`ihvp_datainf`.

    Returns:
        ``{block: 0-d tensor}`` in block order.

    References:
        Kwon et al. 2023, arXiv:2310.00902 (the rule used in their experiments).
    """
    return _default_damping(_blocks("datainf_damping", grads, blocks))


def ihvp_datainf(grads, *, damping: float | None = None, blocks=None) -> LinOp:
    """Return ``V -> blockdiag_l (1/n) sum_i (g_il g_il^T + lam_l I)^-1 V``.  # [k, P] -> [k, P]

    Each block applies ``V_l -> (V_l - ((V_l g_l^T) / (lam_l + |g_l|^2)) g_l / n) / lam_l``
    (``g_l`` the ``[n, P_l]`` gradients, the division broadcast over the ``n`` examples), so
    the cost is ``O(k n P)`` and no ``P_l x P_l`` matrix is formed. It approximates
    ``(G_l + lam_l I)^-1`` with ``G_l = (1/n) sum_i g_il g_il^T``; the swap of inverse and mean
    is exact for ``n = 1`` and its error grows with the block size (see the paper).

    Args:
        grads: ``{name: [n, ...]}`` per-sample gradients per block (a layer or a parameter),
            in ravel order; or a ``[n, P]`` tensor, split by ``blocks``.
        damping: ``lam`` for every block (``> 0``); ``None`` uses the paper's rule
            ``lam_l = 0.1 * mean_i |g_il|^2 / P_l`` (see :func:`datainf_damping`).
        blocks: only with a ``[n, P]`` tensor: ``{name: slice}`` partitioning ``[0, P)`` in
            order (e.g. ``dattri_fn.tree.block_slices(params)``); ``None`` is one block.

    Returns:
        a :class:`~dattri_fn._types.LinOp` of dim ``P``; ``dtype``/``device`` those of grads.

    Raises:
        TypeError, ValueError: bad grads or blocks, non-finite values, non-positive damping,
            or a block with all-zero gradients under the default damping.

    References:
        Kwon et al., "DataInf", 2023, arXiv:2310.00902.
    """
    func = "ihvp_datainf"
    parts = _blocks(func, grads, blocks)
    if damping is None:
        lam = _default_damping(parts)
        zero = [k for k, v in lam.items() if not bool(v > 0)]
        if zero:
            raise ValueError(_msg(func, "damping", "a positive default lam_l = 0.1 mean|g_l|^2/P_l",
                                  f"0 for all-zero blocks {zero}", "Pass damping=<float>."))
    else:
        value = check_positive(func, "damping", damping)
        lam = {k: value for k in parts}
    names = list(parts)
    sizes = [parts[k].shape[1] for k in names]
    ref = parts[names[0]]
    # Per block: rows of g pre-scaled by 1/(lam + |g|^2) so each matmat is two matmuls.
    scaled = {k: parts[k] / (lam[k] + (parts[k] * parts[k]).sum(1, keepdim=True)) for k in names}
    n = ref.shape[0]

    def matmat(V: Tensor) -> Tensor:
        out = []
        for k, Vl in zip(names, torch.split(V, sizes, dim=1), strict=True):
            coef = Vl @ scaled[k].T
            out.append((Vl - (coef @ parts[k]) / n) / lam[k])
        return torch.cat(out, dim=1)

    return LinOp(matmat, sum(sizes), ref.dtype, ref.device, name=func)
