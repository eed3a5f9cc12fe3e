"""K-FAC and EK-FAC operators: the factored Fisher and its damped inverse, block-diagonal over
layers in the params' ravel layout (see :mod:`dattri_fn.operators.kfac` for the method)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import _msg, all_finite, check_positive
from .._types import LinOp
from .kfac_diag import diagonal_groups
from .kfac_layers import _keys
from .kfac_stats import EKFACFactors, KFACFactors

__all__ = ["BlockLinOp", "kfac_operator", "ihvp_kfac", "ihvp_ekfac"]


def _layout(func: str, param_names: tuple[str, ...], shapes: dict[str, tuple[int, int]],
            diagonal: dict[str, int] | None = None):
    """Return (P, {layer: (w_slice, b_slice | None)}) locating each layer in the raveled vector
    (``diagonal``: ``{key: numel}`` of the params in the diagonal block; ``_diag_slices``)."""
    sizes = {}
    for layer, (out, inp) in shapes.items():
        wk, bk = _keys(layer)
        sizes[wk] = out * inp
        sizes[bk] = out
    sizes.update(diagonal or {})
    unknown = [k for k in param_names if k not in sizes]
    if unknown:
        raise ValueError(_msg(func, "factors", "param_names of the factored layers",
                              f"unmatched {unknown}"))
    offsets, start = {}, 0
    for k in param_names:
        offsets[k] = slice(start, start + sizes[k])
        start += sizes[k]
    return start, {layer: (offsets[_keys(layer)[0]], offsets.get(_keys(layer)[1]))
                   for layer in shapes}


def _diag_slices(param_names, shapes, diagonal: dict[str, Tensor]):
    """``{group: [slice of each key]}`` of the diagonal block's groups (:mod:`.kfac_diag`) in
    the raveled vector."""
    sizes = {}
    for layer, (out, inp) in shapes.items():
        wk, bk = _keys(layer)
        sizes[wk], sizes[bk] = out * inp, out
    sizes.update({k: v.numel() for k, v in diagonal.items()})
    offsets, start = {}, 0
    for k in param_names:
        offsets[k] = slice(start, start + sizes[k])
        start += sizes[k]
    return {g: [offsets[k] for k in ks] for g, ks in diagonal_groups(
        [k for k in param_names if k in diagonal], shapes).items()}


class BlockLinOp(LinOp):
    """A K-FAC/EK-FAC operator, block-diagonal over layers, that also reads rows layer by layer.

    ``blocks(V)``: each layer's ``[k, out, in(+1)]`` block of rows ``V`` (weights as ``[out,
    in]`` also for Conv1D, the bias as the last column), then each diagonal group's ``[k, p]``
    (:mod:`.kfac_diag`: the group's keys in ravel order); ``eigen``: ``(Q_A, Q_G, scale)`` per
    layer for an inverse (``scale = 1 / (Lambda + damping)``), else None; ``diagonal``:
    ``{group: (keys, scale [p])}`` of the params outside the Kronecker layers (``scale = 1 / (D
    + damping)`` for an inverse, ``D`` for the Fisher itself), empty without them; ``parts``:
    the Kronecker layers then the diagonal groups, the names per-layer scores use; ``ravel(B)``:
    the inverse of ``blocks`` (``{layer: [k, out, in(+1)], group: [k, p]}`` -> ``[k, P]`` rows
    in the params' ravel layout).
    """

    __slots__ = ("blocks", "eigen", "diagonal", "parts", "ravel")
    follows_dtype = True  # products are taken in the rows' dtype (factors may be 16-bit)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks, self.eigen, self.diagonal, self.parts, self.ravel = None, None, {}, (), None


def _shapes(QA, QG, param_names) -> dict[str, tuple[int, int]]:
    """``{layer: (out, in)}`` (``in`` without the bias column) from the factors' sizes."""
    return {layer: (QG[layer].shape[0], QA[layer].shape[0] - int(_keys(layer)[1] in param_names))
            for layer in QA}


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype products with a factor are taken in: its own, float32 for 16-bit storage."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _read_blocks(V: Tensor, layers, shapes, where, transposed) -> dict[str, Tensor]:
    """Each layer's ``[k, out, in(+1)]`` block of the rows of ``V`` (bias as the last column)."""
    k = V.shape[0]
    out_blocks = {}
    for layer in layers:
        out, inp = shapes[layer]
        ws, bs = where[layer]
        M = (V[:, ws].reshape(k, inp, out).transpose(1, 2) if layer in transposed
             else V[:, ws].reshape(k, out, inp))
        if bs is not None:
            M = torch.cat([M, V[:, bs].reshape(k, out, 1)], dim=-1)
        out_blocks[layer] = M
    return out_blocks


def _eigen_apply(name: str, QA, QG, scale, param_names, transposed=(), diagonal=None) -> LinOp:
    """Return ``V -> blockdiag_l Q_G ((Q_G^T M_l Q_A) * scale_l) Q_A^T``, and each diagonal
    key's slice times its ``diagonal[key]`` (elementwise).  # [k, P] -> [k, P]

    Factors stored in a 16-bit dtype are cast to the operand's dtype at each product.
    """
    layers = list(QA)
    diagonal = diagonal or {}
    shapes = _shapes(QA, QG, param_names)
    P, where = _layout(name, param_names, shapes, {k: v.numel() for k, v in diagonal.items()})
    groups = diagonal_groups([k for k in param_names if k in diagonal], shapes)
    slices = _diag_slices(param_names, shapes, diagonal)
    flat = {g: torch.cat([diagonal[k].reshape(-1) for k in ks]) for g, ks in groups.items()}
    ref = QA[layers[0]] if layers else next(iter(diagonal.values()))

    def read(V: Tensor) -> dict[str, Tensor]:
        out = _read_blocks(V, layers, shapes, where, transposed)
        for g, sl in slices.items():
            out[g] = V[:, sl[0]] if len(sl) == 1 else torch.cat([V[:, s] for s in sl], 1)
        return out

    def matmat(V: Tensor) -> Tensor:
        # Each layer's block is read just before its products and its result written into one
        # [k, P] buffer: the rows, the result and one layer's temporaries are alive at once,
        # not every layer's block, every result piece and their concatenation (4x the rows).
        k = V.shape[0]
        out = V.new_empty(k, P)
        for layer in layers:
            o, inp = shapes[layer]
            ws, bs = where[layer]
            qa, qg = QA[layer].to(V.dtype), QG[layer].to(V.dtype)
            R = qg.T @ _read_blocks(V, (layer,), shapes, where, transposed)[layer] @ qa
            X = qg @ (R * scale[layer].to(V.dtype)) @ qa.T
            del R
            if layer in transposed:
                out[:, ws].view(k, inp, o).copy_(X[..., :inp].transpose(1, 2))
            else:
                out[:, ws].view(k, o, inp).copy_(X[..., :inp])
            if bs is not None:
                out[:, bs].copy_(X[..., inp])
        for ks in groups.values():
            for key in ks:
                sl = slices_of[key]
                torch.mul(V[:, sl], diagonal[key].reshape(-1).to(V.dtype), out=out[:, sl])
        return out

    def ravel(blocks: dict[str, Tensor]) -> Tensor:
        # entries are copied, never combined: ravel(blocks(V)) == V bit for bit
        first = blocks[layers[0] if layers else next(iter(groups))]
        k = first.shape[0]
        out = first.new_empty(k, P)
        for layer in layers:
            o, inp = shapes[layer]
            ws, bs = where[layer]
            M = blocks[layer]
            if layer in transposed:
                out[:, ws].view(k, inp, o).copy_(M[..., :inp].transpose(1, 2))
            else:
                out[:, ws].view(k, o, inp).copy_(M[..., :inp])
            if bs is not None:
                out[:, bs].copy_(M[..., inp])
        for g, sl in slices.items():  # a group's [k, p]: its keys' slices, in ravel order
            at = 0
            for s in sl:
                n = s.stop - s.start
                out[:, s].copy_(blocks[g][:, at:at + n])
                at += n
        return out

    slices_of = {k: s for g, ks in groups.items() for k, s in zip(ks, slices[g], strict=True)}
    op = BlockLinOp(matmat, P, _compute_dtype(ref), ref.device, name=name)
    op.blocks = read
    op.ravel = ravel
    op.diagonal = {g: (ks, flat[g]) for g, ks in groups.items()}
    op.parts = (*layers, *groups)
    return op


def _eigen_inverse(name: str, QA, QG, Lambda, param_names, damping, transposed=(),
                   diagonal=None) -> LinOp:
    """Return ``V -> blockdiag_l Q_G ((Q_G^T M_l Q_A) / (Lambda_l + damping)) Q_A^T``, and
    ``V_k / (D_k + damping)`` on each key ``k`` of ``diagonal`` (``{key: D}``).

    The operator also carries ``.blocks(V)`` (each layer's ``[k, out, in(+1)]`` block of rows
    ``V``, each diagonal group's ``[k, p]``), ``.eigen`` = ``(Q_A, Q_G, 1 / (Lambda +
    damping))`` per layer and ``.diagonal`` = ``{group: (keys, 1 / (D + damping))}``, for
    scoring layer by layer (:func:`layer_scores`, :func:`layer_self_scores`).
    """
    inv = {layer: 1.0 / (Lambda[layer].to(_compute_dtype(Lambda[layer])) + damping)
           for layer in QA}
    dinv = {k: 1.0 / (v.to(_compute_dtype(v)) + damping) for k, v in (diagonal or {}).items()}
    op = _eigen_apply(name, QA, QG, inv, param_names, transposed, dinv)
    op.eigen = (QA, QG, inv)
    return op


def _kfac_eigen(factors: KFACFactors):
    """``Q_A, Q_G`` and ``Lambda = s_G s_A^T`` of each layer's K-FAC factors (16-bit factors
    are decomposed in float32)."""
    QA, QG, Lam = {}, {}, {}
    for layer in factors.A:
        A, G = factors.A[layer], factors.G[layer]
        sA, QA[layer] = torch.linalg.eigh(A.to(_compute_dtype(A)))
        sG, QG[layer] = torch.linalg.eigh(G.to(_compute_dtype(G)))
        # eigh of a PSD factor can return -1e-17; clamping keeps Lambda + damping > 0.
        Lam[layer] = torch.outer(sG.clamp_min(0), sA.clamp_min(0))
    return QA, QG, Lam


def kfac_operator(factors: KFACFactors | EKFACFactors) -> LinOp:
    """Return the factored Fisher ``V -> F V`` itself, with its closed-form inverse.  # [k, P] -> [k, P]

    K-FAC: ``F = blockdiag_l A_l (x) G_l``; EK-FAC: ``(Q_A (x) Q_G) diag(Lambda)
    (Q_A (x) Q_G)^T``; each layer's ``[out, in(+1)]`` block read from and written to the
    params' ravel layout; the params outside the Kronecker layers times their diagonal ``D``
    (:mod:`.kfac_diag`). ``op.inverse(damping)`` is :func:`ihvp_kfac` / :func:`ihvp_ekfac`, so
    ``ihvp_explicit(op, damping=...)`` and ``solvers.explicit()`` invert it in closed form, and
    ``op + damping`` composes with any other solver (CG on a K-FAC curvature).

    Raises:
        TypeError, ValueError: factors that are neither, or not finite.
    """
    func = "kfac_operator"
    if isinstance(factors, EKFACFactors):
        _check_factors(func, factors, EKFACFactors, "ekfac_factors", ("QA", "QG", "Lambda"))
        QA, QG, Lam = factors.QA, factors.QG, factors.Lambda
        inverse = lambda damping: ihvp_ekfac(factors, damping=damping)
    else:
        _check_factors(func, factors, KFACFactors, "kfac_factors or ekfac_factors", ("A", "G"))
        QA, QG, Lam = _kfac_eigen(factors)
        inverse = lambda damping: _eigen_inverse(
            "ihvp_kfac", QA, QG, Lam, factors.param_names,
            check_positive("ihvp_kfac", "damping", damping), factors.transposed,
            factors.diagonal)
    op = _eigen_apply(func, QA, QG, Lam, factors.param_names, factors.transposed,
                      factors.diagonal)
    op.inverse = inverse
    return op


def _check_factors(func: str, factors, kind, maker, fields):
    if not isinstance(factors, kind):
        raise TypeError(_msg(func, "factors", f"a {kind.__name__} (from {maker})",
                             type(factors).__name__))
    diagonal = getattr(factors, "diagonal", {})
    for field in (*fields, "diagonal"):
        d = getattr(factors, field)
        # the Kronecker dicts may be empty only where the diagonal block is the whole operator
        if not isinstance(d, dict) or (not d and field != "diagonal" and not diagonal):
            raise TypeError(_msg(func, f"factors.{field}", "a non-empty dict[str, Tensor]",
                                 type(d).__name__))
        for layer, t in d.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(_msg(func, f"factors.{field}", "floating-point tensors",
                                     f"{type(t).__name__} at {layer!r}"))
            if not all_finite(t):
                raise ValueError(_msg(func, f"factors.{field}", "finite values",
                                      f"NaN or inf at {layer!r}"))


def ihvp_kfac(factors: KFACFactors, *, damping: float) -> LinOp:
    """Return ``V -> (A (x) G + damping*I)^-1 V``, block-diagonal over layers.  # [k, P] -> [k, P]

    Exact inverse of the damped Kronecker product, through the eigendecompositions
    ``A = Q_A diag(s_A) Q_A^T``, ``G = Q_G diag(s_G) Q_G^T`` computed once here:
    ``M -> Q_G ((Q_G^T M Q_A) / (s_G s_A^T + damping)) Q_A^T`` for each layer's ``[out, in(+1)]``
    block ``M``, read from and written to the params' ravel layout.

    Args:
        factors: from :func:`kfac_factors` (or ``kfac_operator`` of them, which carries this inverse).
        damping: ``> 0``, added to the Kronecker product (not split between the factors).

    Returns:
        a :class:`~dattri_fn._types.LinOp` of dim ``P`` (the selected params).

    Raises:
        TypeError, ValueError: bad factors, non-positive damping.

    References:
        Martens & Grosse 2015, arXiv:1503.05671.
    """
    func = "ihvp_kfac"
    if isinstance(factors, LinOp) and factors.inverse is not None:  # kfac_operator(factors)
        return factors.inverse(check_positive(func, "damping", damping))
    _check_factors(func, factors, KFACFactors, "kfac_factors", ("A", "G"))
    damping = check_positive(func, "damping", damping)
    QA, QG, Lam = _kfac_eigen(factors)
    return _eigen_inverse(func, QA, QG, Lam, factors.param_names, damping, factors.transposed,
                          factors.diagonal)


def ihvp_ekfac(factors: EKFACFactors, *, damping: float) -> LinOp:
    """Return ``V -> Q_G ((Q_G^T V Q_A) / (Lambda + damping)) Q_A^T`` per layer.  # [k, P] -> [k, P]

    The inverse of the EK-FAC Fisher ``(Q_A (x) Q_G) diag(Lambda) (Q_A (x) Q_G)^T + damping*I``,
    block-diagonal over layers, in the params' ravel layout.

    Args:
        factors: from :func:`ekfac_factors` (or ``kfac_operator`` of them, which carries this inverse).
        damping: ``> 0``.

    Returns:
        a :class:`~dattri_fn._types.LinOp` of dim ``P`` (the selected params).

    Raises:
        TypeError, ValueError: bad factors, non-positive damping.

    References:
        George et al. 2018, arXiv:1806.03884; Grosse et al. 2023, arXiv:2308.03296.
    """
    func = "ihvp_ekfac"
    if isinstance(factors, LinOp) and factors.inverse is not None:  # kfac_operator(factors)
        return factors.inverse(check_positive(func, "damping", damping))
    _check_factors(func, factors, EKFACFactors, "ekfac_factors",
                   ("QA", "QG", "Lambda"))
    damping = check_positive(func, "damping", damping)
    return _eigen_inverse(func, factors.QA, factors.QG, factors.Lambda, factors.param_names,
                          damping, factors.transposed, factors.diagonal)
