"""DataInf: a closed-form, layer-wise approximate inverse of the (damped) gradient Gram.

Per block (layer) ``l`` with per-sample gradients ``g_il`` (``[n, P_l]``), DataInf swaps the
inverse and the average:

    (G_l + lam_l I)^-1  ~  (1/n) sum_i (g_il g_il^T + lam_l I)^-1
                        =  (1/(n lam_l)) sum_i (I - g_il g_il^T / (lam_l + |g_il|^2))

(Sherman-Morrison), which is applied to ``V`` without forming any ``P_l x P_l`` matrix:
``V -> (V - (1/n) sum_i ((V g_il) / (lam_l + |g_il|^2)) g_il^T) / lam_l``. The operator is
block-diagonal over the blocks.

The curvature DataInf approximates the inverse of is a value too: ``empirical_fisher(grads,
blocks=...)`` is ``V -> blockdiag_l V_l G_l^T G_l / n`` (``G_l`` the ``[n, P_l]`` gradients),
a :class:`~dattri_fn._types.LinOp` any solver takes (``ihvp_explicit`` gives its exact damped
inverse, ``ihvp_cg`` solves it), and that carries the gradients for ``ihvp_datainf(op)``.

References:
    Kwon, Wu, Wu & Zou, "DataInf: Efficiently Estimating Data Influence in LoRA-tuned LLMs and
    Diffusion Models", 2023, arXiv:2310.00902.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._checks import _msg, all_finite, check_positive, check_tensor
from .._types import LinOp

__all__ = ["EmpiricalFisher", "datainf_damping", "empirical_fisher", "ihvp_datainf"]


def _blocks(func: str, grads, blocks, arg: str = "grads") -> dict[str, Tensor]:
    """Validate and return ``{name: [n, P_l]}`` in ravel order (errors name ``func(arg=...)``)."""
    if isinstance(grads, Mapping):
        if blocks is not None:
            raise ValueError(_msg(func, "blocks", f"None when {arg} is a dict", "a value",
                                  "The dict's keys already define the blocks."))
        if not grads:
            raise ValueError(_msg(func, arg, "a non-empty dict", "an empty dict"))
        out = {}
        for name, g in grads.items():
            check_tensor(func, arg, g, floating=True)
            if g.ndim < 2:
                raise ValueError(_msg(func, arg, "tensors [n, ...] per block",
                                      f"shape {list(g.shape)} at key {name!r}"))
            out[name] = g.reshape(g.shape[0], -1)
        ns = {k: v.shape[0] for k, v in out.items()}
        if len(set(ns.values())) != 1:
            raise ValueError(_msg(func, arg, "the same number of examples n in every block",
                                  f"{ns}"))
    elif isinstance(grads, Tensor):
        check_tensor(func, arg, grads, ndim=2, floating=True)
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
        raise TypeError(_msg(func, arg, "a dict {name: [n, ...]} or a [n, P] tensor",
                             type(grads).__name__))
    n = next(iter(out.values())).shape[0]
    if n == 0:
        raise ValueError(_msg(func, arg, "n >= 1 examples", "n = 0"))
    return out


def _default_damping(blocks: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {k: 0.1 * (g * g).sum(1).mean() / g.shape[1] for k, g in blocks.items()}
    if all_finite(torch.stack(list(out.values()))):  # one reduction for all blocks
        return out
    for k, g in blocks.items():
        if not torch.isfinite(out[k]):  # |g|^2 overflowed: the same mean of g / 2^e, times 4^e
            e = int(torch.frexp(g.abs().amax())[1])
            u = torch.ldexp(g, torch.tensor(-e))
            lam = torch.ldexp(0.1 * (u * u).sum(1).mean() / g.shape[1], torch.tensor(2 * e))
            out[k] = lam.to(g.dtype)
    return out


def _rescaled(g: Tensor, sq: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``g`` whose ``|g_i|^2`` (``sq``) overflowed, divided by ``2^e_i`` (their largest
    magnitude then in ``[0.5, 1)``), and each row's ``e_i`` (0 elsewhere). Exact: a power of
    two.  # [n, P], [n, 1] -> [n, P], [n, 1]"""
    over = ~torch.isfinite(sq)
    e = torch.where(over, torch.frexp(g.abs().amax(1, keepdim=True))[1], 0)
    return torch.ldexp(g, -e).to(g.dtype), e


class EmpiricalFisher(LinOp):
    """The empirical Fisher ``V -> blockdiag_l V_l G_l^T G_l / n`` of per-sample gradients
    ``G_l`` ``[n, P_l]``, one block per layer.  # [k, P] -> [k, P]

    Attributes (besides LinOp's): ``grads`` ``{block: [n, P_l]}`` in ravel order (views of the
    gradients given, not copies), ``n``. :func:`ihvp_datainf` reads them for DataInf's inverse;
    any other solver uses the product. Sums and multiples drop them (as they drop ``inverse``).
    """

    __slots__ = ("grads", "n")


def empirical_fisher(grads, *, blocks=None) -> EmpiricalFisher:
    """Return ``V -> blockdiag_l V_l G_l^T G_l / n``, the layer-blocked empirical Fisher
    ``(1/n) sum_i g_il g_il^T`` of per-sample gradients.  # [k, P] -> [k, P]

    With one block (a ``[n, P]`` tensor and ``blocks=None``) it is the whole empirical Fisher
    ``G^T G / n``, the operator :func:`~dattri_fn.operators.curvature.fvp` applies without
    storing ``G``. With layer blocks the cross-layer terms are left out: it is the curvature
    whose damped inverse DataInf approximates, so ``ihvp_explicit(op, damping=lam)`` is the
    exact inverse next to ``ihvp_datainf(op, damping=lam)``.

    Args:
        grads: ``{name: [n, ...]}`` per-sample gradients per block (a layer or a parameter),
            in ravel order; or a ``[n, P]`` tensor, split by ``blocks``.
        blocks: only with a ``[n, P]`` tensor: ``{name: slice}`` partitioning ``[0, P)`` in
            order (e.g. ``dattri_fn.tree.block_slices(params)``); ``None`` is one block.

    Returns:
        an :class:`EmpiricalFisher` of dim ``P``; ``dtype``/``device`` those of the gradients.

    Raises:
        TypeError, ValueError: bad grads or blocks, non-finite values.

    Example:
        >>> G = torch.randn(5, 3, dtype=torch.float64)
        >>> torch.allclose(empirical_fisher(G).dense(), G.T @ G / 5)
        True
    """
    return _fisher("empirical_fisher", _blocks("empirical_fisher", grads, blocks))


def _fisher(func: str, parts: dict[str, Tensor]) -> EmpiricalFisher:
    names = list(parts)
    sizes = [parts[k].shape[1] for k in names]
    ref = parts[names[0]]
    n = ref.shape[0]

    def matmat(V: Tensor) -> Tensor:
        out = [((Vl @ parts[k].T) @ parts[k]) / n
               for k, Vl in zip(names, torch.split(V, sizes, dim=1), strict=True)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    op = EmpiricalFisher(matmat, sum(sizes), ref.dtype, ref.device, name=func)
    op.grads, op.n = parts, n
    return op


def _parts(func: str, op, blocks) -> dict[str, Tensor]:
    """The per-block gradients of ``op``: an :class:`EmpiricalFisher`, or (the form before
    0.1.0) the gradients themselves, a dict or a ``[n, P]`` tensor split by ``blocks``."""
    if isinstance(op, EmpiricalFisher):
        if blocks is not None:
            raise ValueError(_msg(func, "blocks", "None with an empirical_fisher operator",
                                  "a value", "The operator's blocks are fixed by "
                                  "empirical_fisher(grads, blocks=...)."))
        return op.grads
    if isinstance(op, LinOp):
        raise TypeError(_msg(func, "op", "operators.empirical_fisher(grads, blocks=...) (DataInf "
                             "inverts per-example gradients, which the operator must carry)",
                             f"a LinOp {op.name!r}", "Pass the gradients through "
                             "empirical_fisher, or use a solver that takes any operator "
                             "(ihvp_cg, ihvp_explicit)."))
    if isinstance(op, (Mapping, Tensor)):
        return _blocks(func, op, blocks, arg="op")
    raise TypeError(_msg(func, "op", "operators.empirical_fisher(grads, blocks=...), or its "
                         "gradients: a dict {name: [n, ...]} or a [n, P] tensor",
                         type(op).__name__))


def datainf_damping(op, *, blocks=None) -> dict[str, Tensor]:
    """Return DataInf's default ``lam_l = 0.1 * mean_i |g_il|^2 / P_l`` per block.  # -> {name: []}

    Args:
        op, blocks: as :func:`ihvp_datainf` (an :func:`empirical_fisher` operator, or its
            gradients with ``blocks``).

    Returns:
        ``{block: 0-d tensor}`` in block order.

    References:
        Kwon et al. 2023, arXiv:2310.00902 (the rule used in their experiments).
    """
    return _default_damping(_parts("datainf_damping", op, blocks))


def _overflowing(func: str, parts: dict[str, Tensor], sqs: dict[str, Tensor],
                 lam: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(rows, scaled)`` of :func:`ihvp_datainf` where some ``|g_i|^2`` (``sqs``) or a default
    ``lam_l`` is not finite: a row whose ``|g|^2`` overflows (a gradient ~1e20 in float32)
    would drop out (``g / inf``); its term ``(V g) g / (lam + |g|^2)`` is ``(V u) u / (lam / 4^e
    + |u|^2)`` with ``u = g / 2^e``, exact scaling. Other rows and blocks keep their bits."""
    rows, scaled = dict(parts), {}
    for k, g in parts.items():
        if not torch.isfinite(torch.as_tensor(lam[k])):
            raise ValueError(_msg(func, "damping", "a finite default lam_l = 0.1 mean|g_l|^2/P_l",
                                  f"inf in block {k!r} (the gradients' squares exceed "
                                  f"{g.dtype})", "Pass damping=<float>" + (
                                      "." if g.dtype == torch.float64
                                      else ", or compute in float64.")))
        sq = sqs[k]
        if all_finite(sq):
            scaled[k] = g / (lam[k] + sq)
            continue
        u, e = _rescaled(g, sq)
        rows[k] = u
        small = torch.ldexp(torch.as_tensor(lam[k], dtype=g.dtype).expand(e.shape), -2 * e)
        scaled[k] = u / (small.to(g.dtype) + (u * u).sum(1, keepdim=True))
    return rows, scaled


def ihvp_datainf(op, *, damping: float | None = None, blocks=None) -> LinOp:
    """Return ``V -> blockdiag_l (1/n) sum_i (g_il g_il^T + lam_l I)^-1 V``.  # [k, P] -> [k, P]

    Each block applies ``V_l -> (V_l - ((V_l g_l^T) / (lam_l + |g_l|^2)) g_l / n) / lam_l``
    (``g_l`` the ``[n, P_l]`` gradients, the division broadcast over the ``n`` examples), so
    the cost is ``O(k n P)`` and no ``P_l x P_l`` matrix is formed. It approximates
    ``(G_l + lam_l I)^-1`` with ``G_l = (1/n) sum_i g_il g_il^T`` (the blocks of ``op``); the swap
    of inverse and mean is exact for ``n = 1`` and its error grows with the block size (see the
    paper).

    Args:
        op: the curvature, ``empirical_fisher(grads, blocks=...)``, which carries the
            per-sample gradients DataInf needs. The form before 0.1.0 is kept: the gradients
            themselves, ``{name: [n, ...]}`` per block in ravel order or a ``[n, P]`` tensor
            split by ``blocks`` (a tensor here is always gradients, never a dense curvature).
        damping: ``lam`` for every block (``> 0``); ``None`` uses the paper's rule
            ``lam_l = 0.1 * mean_i |g_il|^2 / P_l`` (see :func:`datainf_damping`).
        blocks: only with gradients given as a ``[n, P]`` tensor: ``{name: slice}``
            partitioning ``[0, P)`` in order (e.g. ``dattri_fn.tree.block_slices(params)``);
            ``None`` is one block.

    Returns:
        a :class:`~dattri_fn._types.LinOp` of dim ``P``; ``dtype``/``device`` those of grads.

    Raises:
        TypeError, ValueError: an operator without gradients, bad grads or blocks, non-finite
            values, non-positive damping, or a block with all-zero gradients under the default
            damping.

    References:
        Kwon et al., "DataInf", 2023, arXiv:2310.00902.
    """
    func = "ihvp_datainf"
    parts = _parts(func, op, blocks)
    if damping is None:
        lam = _default_damping(parts)
        zero = [k for k, v in lam.items() if not bool(v > 0)]
        if zero:
            raise ValueError(_msg(func, "damping", "a positive default lam_l = 0.1 mean|g_l|^2/P_l",
                                  f"0 for all-zero blocks {zero}", "Pass damping=<float>."))
    else:
        value = check_positive(func, "damping", damping)
        lam = dict.fromkeys(parts, value)
    names = list(parts)
    sizes = [parts[k].shape[1] for k in names]
    ref = parts[names[0]]
    # Per block: rows of g pre-scaled by 1/(lam + |g|^2) so each matmat is two matmuls.
    sqs, scaled = {}, {}
    for k in names:  # block by block, as before: the same bits (and cache order)
        sqs[k] = (parts[k] * parts[k]).sum(1, keepdim=True)
        scaled[k] = parts[k] / (lam[k] + sqs[k])
    seen = [v.reshape(-1) for v in sqs.values()]
    if damping is None:
        seen.append(torch.stack(list(lam.values())).reshape(-1))
    rows = parts
    if not all_finite(torch.cat(seen)):  # one reduction for every block
        rows, scaled = _overflowing(func, parts, sqs, lam)
    n = ref.shape[0]

    def matmat(V: Tensor) -> Tensor:
        out = []
        for k, Vl in zip(names, torch.split(V, sizes, dim=1), strict=True):
            coef = Vl @ scaled[k].T
            out.append((Vl - (coef @ rows[k]) / n) / lam[k])
        return torch.cat(out, dim=1)

    return LinOp(matmat, sum(sizes), ref.dtype, ref.device, name=func)
