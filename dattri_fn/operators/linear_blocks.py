"""Dense ``[P, P]`` curvature of a Linear-only model assembled from per-layer factors, one
layer pair at a time (the Hessian terms, or the Gauss-Newton's ``J^T A J`` ones).

The formulas, costs and limits ("the module docstring" below) are in
:mod:`dattri_fn.operators.linear_curvature`'s docstring.
"""

from __future__ import annotations

from itertools import accumulate

from torch import Tensor


def _feeds(names: list[str], dacts: dict, d: dict, unit: dict) -> list[tuple[str, str]]:
    """Return ``[(l, m)]``: layer ``l``'s probe moves layer ``m``'s input in this batch
    (a nonzero block of ``T_ml``), found from the forward-mode products, not from a graph."""
    return [(src, m) for m in names for src in names
            if src != m and bool(dacts[m][unit[src]:unit[src] + d[src]].any())]


def _add(H: Tensor, rows: tuple, cols: tuple, blk: Tensor) -> None:
    """Add ``blk`` ``[d_l, k, d_m, q]`` (augmented: input entries, then the bias if ``k`` or
    ``q`` counts it) into ``H`` at layer ``l``'s rows and layer ``m``'s columns (ravel order)."""
    (wl, bl, inl), (wm, bm, inm) = rows, cols
    dl, k, dm, q = blk.shape
    H[wl, wm].view(dl, inl, dm, inm).add_(blk[:, :inl, :, :inm])
    if q > inm:
        H[wl, bm].view(dl, inl, dm).add_(blk[:, :inl, :, inm])
    if k > inl:
        H[bl, wm].view(dl, dm, inm).add_(blk[:, inl, :, :inm])
        if q > inm:
            H[bl, bm].add_(blk[:, inl, :, inm])


_BLOCK = 2**24  # numbers in one intermediate of a layer pair's product: rows are sub-chunked


def _pair_block(Ht: Tensor, al: Tensor, am: Tensor) -> Tensor:
    """Return ``sum_i Ht_i (x) a_l,i (x) a_m,i`` as ``[d_l, k_l, d_m, k_m]``.  # Ht [B, d_l, d_m]

    Contracted over the examples by one GEMM per ``_BLOCK``-sized piece, with the smallest of the
    three per-example intermediates (``a_l a_m^T``, ``Ht (x) a_l``, ``Ht (x) a_m``).
    """
    B, dl, dm = Ht.shape
    kl, km = al.shape[1], am.shape[1]
    sizes = (kl * km, dl * dm * kl, dl * dm * km)
    route = sizes.index(min(sizes))
    step = max(1, _BLOCK // min(sizes))
    out = None
    for r in range(0, B, step):
        h, a, b = Ht[r:r + step], al[r:r + step], am[r:r + step]
        n = h.shape[0]
        if route == 0:
            part = (h.reshape(n, dl * dm).T @ (a[:, :, None] * b[:, None, :]).reshape(n, -1))
            part = part.view(dl, dm, kl, km).permute(0, 2, 1, 3)
        elif route == 1:
            part = ((h[..., None] * a[:, None, None, :]).reshape(n, -1).T @ b)
            part = part.view(dl, dm, kl, km).permute(0, 2, 1, 3)
        else:
            part = ((h[..., None] * b[:, None, None, :]).reshape(n, -1).T @ a)
            part = part.view(dl, dm, km, kl).permute(0, 3, 1, 2)
        out = part.contiguous() if out is None else out.add_(part)
    return out


def _activation_block(gm: Tensor, T: Tensor, al: Tensor) -> Tensor:
    """Return ``sum_i g_m,i (x) T_i (x) a_l,i`` as ``[d_m, in_m, d_l, k_l]``.  # T [B, in_m, d_l]"""
    B, inm, dl = T.shape
    dm, kl = gm.shape[1], al.shape[1]
    left = dm <= kl  # the smaller per-example intermediate: g (x) T, or T (x) a_l
    step = max(1, _BLOCK // (inm * dl * min(dm, kl)))
    out = None
    for r in range(0, B, step):
        g, t, a = gm[r:r + step], T[r:r + step], al[r:r + step]
        n = g.shape[0]
        if left:
            part = ((g[:, :, None, None] * t[:, None]).reshape(n, -1).T @ a)
        else:
            part = g.T @ (t[..., None] * a[:, None, None, :]).reshape(n, -1)
        part = part.view(dm, inm, dl, kl)
        out = part if out is None else out.add_(part)
    return out


def _accumulate(H: Tensor, layout: dict, aug: dict, Ht: Tensor, g=None, dacts=None,
                feeds: bool = False) -> None:
    """Add one batch's ``sum_i`` of the module docstring's Hessian terms into ``H``.

    ``aug``: augmented layer inputs; ``Ht``: ``[B, D, D]`` (for the Gauss-Newton, ``J^T A J``
    without the activation terms); ``g``, ``dacts``: the probe gradients and ``T`` of
    :func:`_probe_terms`, whose nonzero blocks give the activation terms when ``feeds``.
    """
    names = list(layout)
    d = {n: (ws.stop - ws.start) // inp for n, (ws, _, inp) in layout.items()}
    unit = dict(zip(names, accumulate([0] + [d[n] for n in names[:-1]]), strict=True))
    for i, lay in enumerate(names):
        ol = unit[lay]
        for m in names[i:]:
            om = unit[m]
            blk = _pair_block(Ht[:, ol:ol + d[lay], om:om + d[m]], aug[lay], aug[m])
            _add(H, layout[lay], layout[m], blk)
            if m != lay:
                _add(H, layout[m], layout[lay], blk.permute(2, 3, 0, 1))
    for src, m in (_feeds(names, dacts, d, unit) if feeds else ()):
        # layer src feeds layer m: the activations' first-order term
        ol = unit[src]
        T = dacts[m][ol:ol + d[src]].permute(1, 2, 0)  # [B, in_m, d_src]
        R = _activation_block(g[m], T, aug[src])
        _add(H, layout[m], layout[src], R)
        _add(H, layout[src], layout[m], R.permute(2, 3, 0, 1))
