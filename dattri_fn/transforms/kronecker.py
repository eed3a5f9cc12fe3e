"""Kronecker-factored projection of per-layer gradients: ``G -> P_out^T G P_in``.

For a layer whose per-example gradient is ``G = sum_t g_t [a_t, 1]^T`` (the capture engine's
factors), ``vec(P_out^T G P_in) = kron(P_out, P_in)^T vec(G)`` is formed from ``P_out^T g_t``
and ``P_in^T [a_t, 1]`` without ``G`` (LoGra's projection; with ``kind="mask"`` FactGraSS's
first stage). The factors are the dense projectors of :mod:`dattri_fn.transforms.project`.

References:
    Choe et al., "What is Your Data Worth to GPT?" (2024), arXiv:2405.13954 (LoGra).
    "GraSS: Scalable Data Attribution with Gradient Sparsification and Sparse
    Projection" (2025), arXiv:2505.18976 (masks, FactGraSS).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import _msg, check_int
from .project import _MASK64, KINDS, _block_seed, _device_key, _splitmix64, make_projector

FACTOR_KINDS = (*KINDS, "mask")


class KroneckerLayer(NamedTuple):
    """One layer of a :class:`KroneckerProjector`: its keys and logical ``[out, inp]`` weight.

    ``kind`` is the capture kind (``linear``, ``conv1d``, ``conv2d``, ``embedding``): it says how
    the raveled weight gradient maps to ``[out, inp]`` (``conv1d`` and ``embedding`` store the
    transpose). ``weight`` or ``bias`` may be None (not attributed); ``inp`` excludes the bias
    column, so the projected factor ``a`` has ``inp + (bias is not None)`` columns.
    """

    weight: str | None
    bias: str | None
    kind: str
    out: int
    inp: int

    @property
    def width(self) -> int:
        """Columns of the augmented input ``[a, 1]`` (``[1]`` for a bias alone)."""
        return (self.inp if self.weight is not None else 0) + (self.bias is not None)


class _Factor(NamedTuple):
    """A seeded ``[rows, k]`` factor: a dense matrix, or (``mask``) scaled column picks."""

    rows: int
    k: int
    kind: str
    seed: int

    def matrix(self, dtype: torch.dtype, device) -> Tensor:  # [rows, k]
        if self.kind == "mask":
            idx, scale = self.picks(device)
            M = torch.zeros(self.rows, self.k, dtype=dtype, device=device)
            return M.index_put_((idx, torch.arange(self.k, device=device)),
                                torch.tensor(scale, dtype=dtype, device=device))
        return make_projector(self.rows, proj_dim=self.k, kind=self.kind, seed=self.seed,
                              packed=False).matrix(dtype, device)

    def picks(self, device) -> tuple[Tensor, float]:
        """``k`` distinct rows, sorted, and the scale ``sqrt(rows / k)`` that makes
        ``E[M M^T] = I`` (row ``i`` is picked with probability ``k / rows``)."""
        g = torch.Generator().manual_seed(_block_seed(self.seed, 0))
        idx = torch.randperm(self.rows, generator=g)[:self.k].sort().values
        return idx.to(device), math.sqrt(self.rows / self.k)


def _operator(f: _Factor, dtype: torch.dtype, device):
    """A factor's operator: a mask's ``(picks, scale, picks before the last row, whether the
    last row is picked)`` (the last row is the bias column of ``[a, 1]``), else its dense
    ``[rows, k]`` matrix in ``dtype`` on ``device``."""
    if f.kind != "mask":
        return f.matrix(dtype, device)
    idx, scale = f.picks(device)
    # the bias column (index rows - 1), when picked, is the last pick (they are sorted)
    return idx, scale, idx[idx < f.rows - 1], bool(idx[-1] == f.rows - 1)


class KroneckerProjector:
    """Per-layer Kronecker-factored projection ``G -> P_out^T G P_in`` of weight gradients.  # -> [C, B, d]

    A layer's per-example gradient (weight and bias as one ``[out, inp + 1]`` block) is
    ``G = sum_t g_t [a_t, 1]^T``; its projection

        ``phi = vec(P_out^T G P_in) = sum_t vec((P_out^T g_t)(P_in^T [a_t, 1])^T)``   # [k_out * k_in]

    (row-major ``vec``) is the dense projection ``kron(P_out, P_in)^T vec(G)`` computed without
    forming ``G``: ``out k_out + in k_in`` per position instead of ``out in d``. The bias
    rides as the last input column: projecting the ``[W | b]`` block projects weight and bias
    jointly. Every other attributed parameter (the *rest*) is raveled in params order and
    projected by the dense projector of ``kind`` to ``rest_dim`` columns (or kept whole).
    Blocks sit side by side in layer order, the rest last.

    ``P_in`` ``[inp', k_in]`` and ``P_out`` ``[out, k_out]`` are drawn by :func:`make_projector`
    (``kind`` gaussian, rademacher or sjlt; ``E[P P^T] = I``) or are ``"mask"``: ``k`` distinct
    coordinates picked at random and scaled by ``sqrt(rows / k)`` (also ``E[P P^T] = I``). Then
    ``E[kron(P_out, P_in) kron(P_out, P_in)^T] = E[P_out P_out^T] (x) E[P_in P_in^T] = I``, so
    inner products are preserved in expectation. A side no wider than its ``k`` is kept whole.

    Build it with :func:`make_kronecker_projector` (or :func:`kronecker_layers` from a capture
    plan); apply it to :class:`~dattri_fn.transforms.layer_grads.LayerGrads` with
    :meth:`layer_grads` (factored layers stay factored; layers whose gradients the engine
    materialised are projected from their dense block, with the same result).

    Attributes:
        layers: ``{name: KroneckerLayer}`` in block order.
        factors: ``{name: (P_in factor or None, P_out factor or None)}``.
        rest: ``((key, numel), ...)`` of the rest, in params order.
        rest_projector: the dense :class:`Projector` of the rest, or None (kept whole / none).
        dims: ``{block: width}``, the rest under ``"<rest>"``.
        proj_dim: ``d``, the total width.
        dtype, device: where the factors' operators were drawn (at construction).
        ops: ``{factor: operator}``: a mask's picks, a dense factor's matrix in ``dtype`` on
            ``device``, drawn at construction (calls in another dtype or device draw their own
            per call; nothing is kept between calls).
    """

    def __init__(self, layers, factors, rest, rest_projector, rest_mask, dtype=None, device=None):
        self.layers = dict(layers)
        self.factors = dict(factors)
        self.rest = tuple(rest)
        self.rest_projector = rest_projector
        self._rest_mask = rest_mask
        self.dims = {}
        for n, (fi, fo) in self.factors.items():
            lay = self.layers[n]
            self.dims[n] = (lay.out if fo is None else fo.k) * (lay.width if fi is None else fi.k)
        P_rest = sum(s for _, s in self.rest)
        if P_rest:
            self.dims["<rest>"] = (rest_projector.proj_dim if rest_projector is not None else
                                   rest_mask.k if rest_mask is not None else P_rest)
        self.proj_dim = sum(self.dims.values())
        # Every factor's operator, drawn once here (explicit values, no memo): a mask's picks
        # on ``device``, a dense factor's matrix in ``dtype`` on ``device``; a call in another
        # dtype or device draws its own (the same numbers as drawn there)
        self.dtype = torch.get_default_dtype() if dtype is None else dtype
        self.device = _device_key("cpu" if device is None else device)
        self.ops = {f: _operator(f, self.dtype, self.device)
                    for pair in (*self.factors.values(), (rest_mask,)) for f in pair
                    if f is not None}

    def _op(self, f: _Factor, dtype: torch.dtype, device):
        """``f``'s operator for a call in ``(dtype, device)``: the one drawn at construction
        where it serves (a mask's picks in any dtype), else drawn for this call."""
        op = self.ops[f]
        if f.kind == "mask":
            return op if op[0].device == device else _operator(f, dtype, device)
        return op if op.dtype == dtype and op.device == device else _operator(f, dtype, device)

    def matrices(self, name: str, dtype: torch.dtype, device) -> tuple[Tensor | None, Tensor | None]:
        """Return layer ``name``'s dense ``(P_in [inp', k_in], P_out [out, k_out])`` (None:
        that side is kept whole; a mask as its 0 / ``sqrt(rows / k)`` matrix), for tests and
        small layers (formed on each call)."""
        return tuple(None if f is None else f.matrix(dtype, device) for f in self.factors[name])

    def _side(self, x: Tensor, f: _Factor | None) -> Tensor:
        """``x @ P`` along the last dim (a gather for ``mask``)."""
        if f is None:
            return x
        op = self._op(f, x.dtype, x.device)
        # index_select: the same gather as x[..., idx] at a quarter of its time on [500, 64]
        return x.index_select(-1, op[0]) * op[1] if f.kind == "mask" else x @ op

    def project_sides(self, name: str, a: Tensor, g: Tensor, *, ones: bool = False
                      ) -> tuple[Tensor, Tensor]:
        """Return ``(P_in^T a, P_out^T g)`` of one layer.  # -> ([..., k_in], [..., k_out])

        ``ones``: ``a`` lacks the bias column, which is taken as appended (``[a, 1]``); a mask
        then picks it without forming ``[a, 1]`` (the same numbers: ``1 * scale``).
        """
        fi, fo = self.factors[name]
        pg = self._side(g, fo)
        if ones and fi is not None and fi.kind == "mask":
            idx, scale, kept, bias = self._op(fi, a.dtype, a.device)
            pa = a.index_select(-1, kept)
            if bias:  # the ones column by one pad (a cat of new ones was two ops)
                pa = torch.nn.functional.pad(pa, (0, 1), value=1.0)
            return pa.mul_(scale), pg
        if ones:
            a = torch.cat([a, a.new_ones((*a.shape[:-1], 1))], -1)
        return self._side(a, fi), pg

    def project_factors(self, name: str, a: Tensor, g: Tensor, *, positions: bool = False) -> Tensor:
        """Return ``vec(sum_t (P_out^T g_t)(P_in^T a_t)^T)`` of one layer.  # -> [..., k_out k_in]

        ``a`` ``[..., inp']`` already holds the bias column (``[a, 1]``), ``g`` ``[..., out]``;
        ``positions``: the dim before the last is ``T`` and is summed over.
        """
        fi, fo = self.factors[name]
        pa, pg = self._side(a, fi), self._side(g, fo)
        if positions:
            return torch.einsum("...to,...ti->...oi", pg, pa).flatten(-2)
        return (pg[..., :, None] * pa[..., None, :]).flatten(-2)

    def project_dense(self, name: str, G: Tensor) -> Tensor:
        """Return ``vec(P_out^T G P_in)`` from a dense ``G``.  # [..., out, inp'] -> [..., k_out k_in]"""
        fi, fo = self.factors[name]
        X = self._side(G, fi).transpose(-1, -2)  # [..., k_in, out]
        return self._side(X, fo).transpose(-1, -2).flatten(-2)

    def project_rest(self, X: Tensor) -> Tensor:
        """Return the rest's block from its raveled gradients ``[..., P_rest]``."""
        if self.rest_projector is not None:
            lead = X.shape[:-1]
            return self.rest_projector(X.reshape(-1, X.shape[-1])).reshape(*lead, -1)
        return self._side(X, self._rest_mask)

    def layer_grads(self, lg) -> Tensor:
        """Return the projection of a :class:`~dattri_fn.transforms.layer_grads.LayerGrads`.  # -> [C, B, d]

        Factored layers are projected from their factors; layers and parameters in its dense
        block from their columns there (the same numbers either way).
        """
        source = dict(lg.layout)
        out = []
        for n, lay in self.layers.items():
            src_w = source.get(lay.weight) if lay.weight is not None else None
            src_b = source.get(lay.bias) if lay.bias is not None else None
            src = src_w if src_w is not None else src_b
            if src[0] == "t":  # a tied key's block from its members' factors
                out.append(self.project_tie(n, src[2]))
                continue
            if src[0] in ("w", "wt", "b"):
                a, g = lg.factors[src[1]]
                out.append(self.project_factors(n, a, g, positions=a.ndim == 4))
                continue
            out.append(self.project_dense(n, self._dense_block(lg, lay, src_w, src_b)))
        if self.rest:  # the rest sits in the dense block (a tie kept factored: its rows)
            cols = [lg.dense[..., source[k][1]:source[k][2]] if source[k][0] == "d" else
                    lg._block(source[k], 0, size) for k, size in self.rest]
            out.append(self.project_rest(cols[0] if len(cols) == 1 else torch.cat(cols, -1)))
        return torch.cat(out, -1) if len(out) > 1 else out[0]

    def _gather(self, ids: Tensor, f: _Factor | None, rows: int, like: Tensor) -> Tensor:
        """``P[ids]``: the rows of ``f`` at ``ids`` (zero rows at negative ids), i.e. ``P^T
        e_id``, without a one-hot ``[.., rows]``.  # [...] -> [..., k]"""
        ok = ids >= 0
        safe = torch.where(ok, ids, 0)
        if f is None:  # kept whole: e_id itself
            return torch.nn.functional.one_hot(safe, rows).to(like.dtype) * ok[..., None]
        op = self._op(f, like.dtype, like.device)
        if f.kind != "mask":
            return op[safe] * ok[..., None].to(like.dtype)
        idx, scale = op[0], op[1]
        col = torch.full((rows,), -1, dtype=torch.long, device=ids.device)
        col[idx] = torch.arange(idx.numel(), device=ids.device)
        at = torch.where(ok, col[safe], -1)  # the pick holding each id, -1: none
        out = like.new_zeros((*ids.shape, f.k))
        return out.scatter_(-1, at.clamp(min=0)[..., None],
                            (at >= 0).to(like.dtype)[..., None] * scale)

    def project_tie(self, name: str, tie) -> Tensor:
        """Return a tied key's block vec(P_out^T G P_in) from its members' factors.  # -> [.., k_out k_in]

        With ``G`` the key's ``[V, D]`` gradient in the block's orientation (``[D, V]`` for an
        Embedding-held key, ``[V, D | b]`` for a Linear-held one), each member adds ``sum_t
        (P_V^T v_t)(P_D^T d_t)^T`` in that orientation: an Embedding's ``v_t = e_{id_t}`` (a
        gather ``P_V[id_t]``), ``d_t = g_t``; a Linear's ``v_t = g'_t``, ``d_t = a_t`` (with
        the block's bias column, ``[a_t, 1]``, as the bias gradient ``sum_t g'_t`` is that
        Linear's own; an Embedding's ``[g_t, 0]``). ``tie``: a
        :class:`~dattri_fn.transforms.tie_factors.TieFactors`. No ``V D`` row is formed:
        ``T (V + D) k`` per example, not ``V D k``.
        """
        lay = self.layers[name]
        fi, fo = self.factors[name]
        V, D = tie.shape
        v_side, d_side = (fi, fo) if lay.kind == "embedding" else (fo, fi)
        with_bias = lay.kind != "embedding" and lay.bias is not None
        total = None
        for kind, a, g in tie.members:
            if kind == "embedding":
                pv = self._gather(a, v_side, V, g)
                d = torch.cat([g, g.new_zeros((*g.shape[:-1], 1))], -1) if with_bias else g
            else:
                pv = self._side(g, v_side)
                d = torch.cat([a, a.new_ones((*a.shape[:-1], 1))], -1) if with_bias else a
            pd = self._side(d, d_side)
            eq = "...td,...tv->...dv" if lay.kind == "embedding" else "...tv,...td->...vd"
            part = torch.einsum(eq, pd, pv) if lay.kind == "embedding" else torch.einsum(eq, pv, pd)
            total = part if total is None else total + part
        return total.flatten(-2)

    @staticmethod
    def _dense_block(lg, lay: KroneckerLayer, src_w, src_b) -> Tensor:
        """The layer's gradient from its dense columns.  # -> [C, B, out, inp']"""
        parts = []
        if lay.weight is not None:
            W = lg.dense[..., src_w[1]:src_w[2]]
            if lay.kind in ("conv1d", "embedding"):  # stored [inp, out]
                W = W.unflatten(-1, (lay.inp, lay.out)).transpose(-1, -2)
            else:
                W = W.unflatten(-1, (lay.out, lay.inp))
            parts.append(W)
        if lay.bias is not None:
            parts.append(lg.dense[..., src_b[1]:src_b[2], None])
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def __repr__(self) -> str:
        return (f"KroneckerProjector(layers={list(self.layers)}, rest={[k for k, _ in self.rest]}, "
                f"proj_dim={self.proj_dim})")


def _factor_seed(seed: int, block: int, side: int) -> int:
    """The seed of block ``block``'s side ``side`` (0: in, 1: out, 2: rest), well mixed."""
    return _splitmix64((_splitmix64(seed) + 3 * block + side) & _MASK64) >> 1


def make_kronecker_projector(layers: Mapping[str, KroneckerLayer], *,
                             proj_dim: int | tuple[int, int], kind: str = "rademacher",
                             seed: int = 0, rest: tuple = (),
                             rest_dim: int | None = None, dtype: torch.dtype | None = None,
                             device=None) -> KroneckerProjector:
    """Return the seeded Kronecker-factored projector of ``layers`` (see :class:`KroneckerProjector`).

    Args:
        layers: ``{name: KroneckerLayer}``, in the order the blocks should sit.
        proj_dim: ``k`` for both sides of every layer, or ``(k_in, k_out)``: each layer's block
            is ``k_out x k_in`` (a side no wider than its ``k`` is kept whole).
        kind: ``"gaussian"``, ``"rademacher"``, ``"sjlt"`` (``nnz = 1``) or ``"mask"``.
        seed: non-negative int; fixes every factor (layer ``l``'s sides and the rest's
            projector are drawn from distinct seeds derived from it).
        rest: ``((key, numel), ...)``: the other attributed parameters, in params order.
        rest_dim: the rest's projected width; None = ``k_in * k_out``. A rest no wider is kept
            whole.
        dtype, device: where the factors are drawn, once (default: the default dtype, the
            CPU): calls in them apply those; calls elsewhere draw the same factors per call.

    Raises:
        TypeError/ValueError: naming the argument.
    """
    func = "make_kronecker_projector"
    k_in, k_out = proj_dim if isinstance(proj_dim, tuple) else (proj_dim, proj_dim)
    check_int(func, "proj_dim", k_in, minimum=1)
    check_int(func, "proj_dim", k_out, minimum=1)
    if not isinstance(kind, str):
        raise TypeError(_msg(func, "kind", f"a str, one of {FACTOR_KINDS}", type(kind).__name__))
    if kind not in FACTOR_KINDS:
        raise ValueError(_msg(func, "kind", f"one of {FACTOR_KINDS}", repr(kind)))
    check_int(func, "seed", seed, minimum=0)
    if not isinstance(layers, Mapping):
        raise TypeError(_msg(func, "layers", "a dict {name: KroneckerLayer}", type(layers).__name__))
    for n, lay in layers.items():
        if not isinstance(lay, KroneckerLayer):
            raise TypeError(_msg(func, f"layers[{n!r}]", "a KroneckerLayer",
                                 type(lay).__name__))
        if lay.width < 1 or lay.out < 1:
            raise ValueError(_msg(func, f"layers[{n!r}]", "a weight or a bias with out >= 1",
                                  repr(lay)))
    factors = {}
    for i, (n, lay) in enumerate(layers.items()):
        fi = None if lay.width <= k_in else _Factor(lay.width, k_in, kind, _factor_seed(seed, i, 0))
        fo = None if lay.out <= k_out else _Factor(lay.out, k_out, kind, _factor_seed(seed, i, 1))
        factors[n] = (fi, fo)
    P_rest = sum(s for _, s in rest)
    width = k_in * k_out if rest_dim is None else check_int(func, "rest_dim", rest_dim, minimum=1)
    rest_proj = rest_mask = None
    if P_rest > width:
        s = _factor_seed(seed, len(factors), 2)
        if kind == "mask":
            rest_mask = _Factor(P_rest, width, "mask", s)
        else:
            rest_proj = make_projector(P_rest, proj_dim=width, kind=kind, seed=s)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(_msg(func, "dtype", "a floating torch.dtype or None", repr(dtype)))
    return KroneckerProjector(layers, factors, rest, rest_proj, rest_mask, dtype, device)


def kronecker_layers(plan, params: Mapping[str, Tensor]) -> tuple[dict, tuple]:
    """Return ``(layers, rest)`` for :func:`make_kronecker_projector` from a capture plan.

    ``plan`` is a :class:`~dattri_fn.transforms.layer_grads.LayerPlan` (its captured layers
    become Kronecker blocks, its other parameters the rest: a captured LayerNorm's keys among
    them, its rows being elementwise, not ``sum_t g_t a_t^T``); ``params`` gives the shapes (a
    leading checkpoint dim is allowed when ``stacked`` is True for every leaf: pass one
    checkpoint's dict).

    A tied weight (``plan.ties``: GPT-2's ``wte`` = ``lm_head``) is a block too, though its rows
    (the sum of its layers' rows) come from the dense block: the block of the layer that holds
    the key (the Embedding's ``[V, D]``, ``vec(P_out^T dW^T P_in)``), and each other member's
    own bias (not tied) a bias block, at their places in module order: the layout of a plan
    that captures only the key's own layer (as before ties were captured), so the sketch and
    its cost are those of a Kronecker block (``D V k`` per example), not of a dense projection
    of the ``V D`` rows (``V D k^2``) in the rest. A key no member holds under its own name
    stays in the rest, and so does a member's bias attributed under another name (BERT-MLM's
    ``cls.predictions.bias``, :attr:`LayerPlan.tie_biases`), as before ties were captured.

    Raises:
        ValueError: a layer in ``plan.layers`` whose gradient is not of the Kronecker form.
    """
    members = {m: key for key, group in getattr(plan, "ties", {}).items() for m in group}
    layers, owned = {}, set()
    for n, spec in plan.tapped.specs.items():
        if n in plan.layers:
            wk, bk = plan.layers[n]
            if spec.kind not in ("linear", "conv1d", "conv2d", "embedding"):
                raise ValueError(_msg("kronecker_layers", "plan", "layers of Kronecker form "
                                      "(linear, conv1d, conv2d, embedding) in plan.layers",
                                      f"{n!r} of kind {spec.kind!r}", "Keep it in plan.norms."))
        elif n in members:  # the key's own layer carries it; another member only its bias
            wk = members[n] if spec.weight == members[n] else None
            bk = spec.bias if spec.bias in plan.rest else None
            if wk is None and bk is None:
                continue
            owned.update(k for k in (wk, bk) if k is not None)
        else:
            continue
        layers[n] = _layer(spec.kind, wk, bk, params)
    rest = tuple((k, params[k].numel()) for k in plan.rest if k not in owned)
    return layers, rest


def _layer(kind: str, wk: str | None, bk: str | None, params) -> KroneckerLayer:
    """The block of a layer of capture ``kind`` with weight ``wk`` and bias ``bk`` (keys)."""
    if wk is not None:
        shape = params[wk].shape
        if kind in ("conv1d", "embedding"):
            inp, out = shape[0], shape[1]
        else:
            out, inp = shape[0], math.prod(shape[1:])
    else:
        out, inp = params[bk].shape[0], 0
    return KroneckerLayer(wk, bk, kind, int(out), int(inp))

