"""TRAK's kernel: ``(Phi^T Phi + damping I)^-1`` per checkpoint (or the dual ``(Phi Phi^T +
damping I)^-1``), from float64 Grams factored by Cholesky."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import _msg
from ..transforms.factored_grads import LayerGrads
from ..transforms.tie_factors import layout_to

_GRAM_ROWS = 512  # rows per widened block of gram_of
_GRAM_COLS = 128  # column block of gram_of's upper block triangle
_GRAM_WHOLE = 192  # up to this d, gram_of multiplies whole blocks of rows
_DUAL_ROWS = 128  # feature columns per widened block of the dual Gram (a [128, n] buffer)
_FACTORED_ROWS = 32  # rows per block of factored_gram ([32, n] float64 temporaries)
_PACK_BLOCKS = 16  # a packed kernel's row blocks (at most about this many: its overhead is 1/16)
_PACK_MIN_ROWS = 32  # but at least this many rows a block (fewer, larger GEMMs)


def gram_of(x: Tensor, wide: torch.dtype = torch.float64, *, out: Tensor | None = None,
            rows: int = _GRAM_ROWS) -> Tensor:
    """Return ``x^T x`` in float64, by blocks of rows and the upper column-block triangle.  # -> [d, d]

    Each block of rows is widened to ``wide`` and multiplied there (float32 suffices for
    half-precision rows: their products are exact), each block's product summed in float64.
    With ``d > 192`` (``_GRAM_WHOLE``) only the column-block pairs ``i <= j`` are multiplied
    (``(k + 1) / 2k`` of the flops for ``k`` blocks of 128) and the rest mirrored. ``out``: a
    float64 ``[d, d]`` symmetric accumulator to add ``x^T x`` to (no second ``[d, d]``), returned.
    ``rows``: rows per widened block (its buffer is ``[rows, d]`` in ``wide``).
    """
    n, d = x.shape
    h = d if d <= _GRAM_WHOLE else _GRAM_COLS
    if out is None and n <= rows and h == d:
        # One block of whole rows: its product is the Gram, the same GEMM on the same widened
        # block as below (adding it to zeros is exact), without the zero matrix, the temporary
        # and the in-place add (0.81 -> 0.64 ms on TRAK's [500, 125] rows of digits-lr). The widened
        # copy is row-major like the blocked path's buffer (a transposed x, the dual kernel's, too).
        blk = x if x.dtype == wide else x.to(wide, memory_format=torch.contiguous_format)
        return torch.mm(blk.mT, blk).to(torch.float64)
    g = x.new_zeros((d, d), dtype=torch.float64) if out is None else out
    buf = None
    for s in range(0, n, rows):
        blk = x[s:s + rows]
        if blk.dtype != wide:
            if buf is None:
                buf = x.new_empty((min(n, rows), d), dtype=wide)
            blk = buf[:blk.shape[0]].copy_(blk)
        for a in range(0, d, h):
            g[a:a + h, a:] += blk[:, a:a + h].mT @ blk[:, a:]
    for a in range(h, d, h):
        g[a:a + h, :a] = g[:a, a:a + h].mT
    return g


def singular(func: str, where, d: int, n: int, damping: float) -> ValueError:
    return ValueError(_msg(func, "damping", "Phi^T Phi + damping I positive definite at "
                           "every checkpoint", f"a singular matrix at checkpoints {where} "
                           f"(d={d}, n_train={n}, damping={damping})",
                           "Raise damping or lower proj_dim."))


def _row_norms2(feats) -> Tensor:
    """Squared norms of the training rows, the largest over checkpoints (each checkpoint's
    kernel is its own: a row is named where it overflows at one of them, review RA L2), in
    float64 (a NaN/inf row gives NaN/inf): ``feats`` a ``[C, n, d]`` tensor or a list of
    ``[C, b, d]`` chunks, or ``LayerGrads`` factors (the diagonal of their Gram). Error path
    only.  # -> [n]"""
    if isinstance(feats, list) and feats and isinstance(feats[0], LayerGrads):
        C = feats[0].dense.shape[0]
        return torch.stack([factored_gram([b.select(c) for b in feats]).diagonal()
                            for c in range(C)]).amax(0)
    chunks = feats if isinstance(feats, list) else [feats]
    return torch.cat([torch.stack([torch.linalg.vector_norm(f, dim=-1, dtype=torch.float64) ** 2
                                   for f in ch]).amax(0) for ch in chunks])


def row_limit(fdt: torch.dtype) -> float:
    """The largest squared norm a training feature row of dtype ``fdt`` may have: the largest
    float of ``fdt`` widened to at least float32 (:func:`blame_rows`)."""
    return torch.finfo(torch.promote_types(fdt, torch.float32)).max


def blame_rows(func: str, feats, fdt: torch.dtype, n2: Tensor | None = None) -> None:
    """On a kernel that did not factor or a dual Gram whose diagonal overflows (error paths
    only): raise naming ``func(train=...)`` and the first training example whose feature row is
    NaN/inf or whose squared norm exceeds :func:`row_limit` of ``fdt``: the data's doing, not
    damping's (issue 18). ``n2``: the rows' squared norms ``[n]`` if known (else read from
    ``feats``). Returns where no row overflows (or none is held: ``feats`` and ``n2`` None)."""
    if feats is None and n2 is None:
        return
    big = row_limit(fdt)
    n2 = _row_norms2(feats) if n2 is None else n2
    over = ~(n2 <= big)  # NaN too
    if bool(over.any()):
        i = int(over.nonzero()[0, 0])
        name = str(torch.promote_types(fdt, torch.float32))[6:]
        raise ValueError(_msg(func, "train", "examples whose per-example features (gradients) "
                              f"are finite, with a squared norm finite in {name} (<= {big:.3g})",
                              f"a feature row of example {i} whose squared norm is "
                              f"{float(n2[i]):.3g}", "A train example's gradient is not finite "
                              "or overflows; remove or rescale it."))


def dual_kernel(func: str, feats: Tensor | None, d: int, dtype, damping: float,
                factors: list[LayerGrads] | None = None, *, pack: int = 0) -> Tensor:
    """``(Phi_c Phi_c^T + damping I)^-1`` per checkpoint, by Cholesky in float64.  # [C, n, n]

    One checkpoint at a time: its float64 Gram is formed by :func:`gram_of` on ``Phi_c^T``
    (blocks of widened feature columns, upper block triangle), or from ``factors`` (the same
    rows by blocks, Linear layers factored: :func:`factored_gram`; ``feats`` may then be None),
    then factored and inverted in place; only the result is kept in ``dtype``. Peak: the
    ``[C, n, n]`` result, one float64 ``[n, n]`` Gram and one widened block, never a float64
    copy of the features. ``pack > 0``: the result is kept as the block-packed lower triangle
    with ``pack`` rows a block (:func:`packed_blocks`), ``[C, packed_size(n, pack)]``: about
    half the entries.
    """
    if factors is None:
        C, n, device = feats.shape[0], feats.shape[1], feats.device
        grams = (gram_of(f.mT, torch.float64, rows=_DUAL_ROWS) for f in feats)
    else:
        C, n, device = factors[0].dense.shape[0], sum(b.num_rows for b in factors), \
            factors[0].dense.device
        grams = (factored_gram([b.select(c) for b in factors]) for c in range(C))
    # the Gram's diagonal is the rows' squared norms: one that overflows the dtype the scores
    # are computed in is refused here, where the float64 Gram may still factor (a float32 row
    # ~1e20: ~1e40). Dense rows are scored in K's dtype (float32 rows under float64 params are
    # taken, review RA M1), factored rows in their own
    sdt = dtype if factors is None else factors[0].dense.dtype
    K, bad = _inverted(grams, C, n, dtype, device, damping, pack, row_limit(sdt))
    if isinstance(bad, Tensor) or bad:
        del K
        blame_rows(func, feats if factors is None else factors, sdt)
        if isinstance(bad, Tensor):  # the Gram's diagonal, if the rows' norms round below
            blame_rows(func, None, sdt, bad)
        raise singular(func, bad, d, n, damping)
    return K


def pack_rows(n: int) -> int:
    """Rows a block of a packed ``[n, n]`` kernel: ``max(32, ceil(n / 16))``, i.e. at most about
    16 blocks, whose diagonal blocks' upper halves (the overhead) are ``1/16`` of the triangle."""
    return max(_PACK_MIN_ROWS, -(-n // _PACK_BLOCKS))


def packed_size(n: int, rows: int) -> int:
    """Entries of an ``[n, n]`` symmetric matrix kept block-packed, ``rows`` rows a block."""
    return sum((e - s) * e for s, e, _ in packed_blocks(n, rows))


def packed_blocks(n: int, rows: int):
    """Yield ``(s, e, offset)`` per block of a block-packed ``[n, n]`` symmetric matrix ``K``.

    Block ``[s, e)`` keeps ``K[s:e, :e]`` (its rows up to and including the diagonal block),
    row-major at ``offset`` of the flat storage: the lower triangle and the diagonal blocks'
    upper halves, ``n (n + rows) / 2`` entries instead of ``n^2``.
    """
    off = 0
    for s in range(0, n, rows):
        e = min(n, s + rows)
        yield s, e, off
        off += (e - s) * e


def packed_block(flat: Tensor, s: int, e: int, off: int) -> Tensor:
    """Block ``K[s:e, :e]`` of the flat storage (a view).  # [e - s, e]"""
    return flat[off:off + (e - s) * e].view(e - s, e)


def packed_matmul(flat: Tensor, n: int, rows: int, x: Tensor, out: Tensor | None = None) -> Tensor:
    """Return ``K x`` (added to ``out`` if given) from ``K`` kept block-packed.  # [n, m] -> [n, m]

    Block ``[s, e)`` holds ``K[s:e, :e]``: it gives rows ``s:e`` their product with ``x[:e]``,
    and, being ``K[:s, s:e]^T`` by symmetry, rows ``:s`` their product with ``x[s:e]``; every
    entry of ``K`` meets ``x`` exactly once.
    """
    out = x.new_zeros((n, x.shape[1])) if out is None else out
    for s, e, off in packed_blocks(n, rows):
        blk = packed_block(flat, s, e, off)
        out[s:e].addmm_(blk, x[:e])
        if s:
            out[:s].addmm_(blk[:, :s].mT, x[s:e])
    return out


def packed_diag(flat: Tensor, n: int, rows: int, other) -> Tensor:
    """Return ``diag(K G)`` for ``K`` kept block-packed and a symmetric ``G`` given by blocks,
    ``other(s, e) -> G[s:e, :e]`` (never all of ``G``).  # -> [n]

    ``[K G]_ii = sum_j K_ij G_ij``: block ``[s, e)``'s products ``K[s:e, :e] * G[s:e, :e]``
    give rows ``s:e`` their sums over columns ``:e``, and their columns ``:s`` (``K_ji G_ji``
    with ``j`` in ``s:e``) give rows ``:s`` the rest, by symmetry of both.
    """
    out = flat.new_zeros(n)
    for s, e, off in packed_blocks(n, rows):
        prod = packed_block(flat, s, e, off) * other(s, e)
        out[s:e] += prod.sum(1)
        if s:
            out[:s] += prod[:, :s].sum(0)
    return out


def unpacked(flat: Tensor, n: int, rows: int) -> Tensor:
    """Return the full ``[n, n]`` symmetric matrix kept block-packed in ``flat``."""
    K = flat.new_empty((n, n))
    for s, e, off in packed_blocks(n, rows):
        blk = packed_block(flat, s, e, off)
        K[s:e, :e] = blk
        K[:s, s:e] = blk[:, :s].mT
    return K


def factored_width(blocks: list[LayerGrads]) -> int | None:
    """Entries per row that ``blocks`` keep factored (``a`` and ``g`` of each layer, the dense
    block), or None when a layer has a sequence dimension (its Gram needs ``T x T`` terms) or
    the blocks differ in layout (a batch computed densely)."""
    widths = {None if any(a.ndim != 3 for a, _ in b.factors.values()) else
              (b.dense.shape[-1], tuple((n, a.shape[-1], g.shape[-1])
                                        for n, (a, g) in b.factors.items())) for b in blocks}
    if len(widths) != 1 or None in widths:
        return None
    dense, layers = widths.pop()
    return dense + sum(i + o for _, i, o in layers)


def factored_gram(blocks: list[LayerGrads], rows: int = _FACTORED_ROWS) -> Tensor:
    """Return ``Phi Phi^T`` in float64 from one checkpoint's factored rows.  # -> [n, n]

    ``<grad_i, grad_j> = sum_layers (a_i . a_j)(g_i . g_j) + <dense_i, dense_j>``
    (:meth:`LayerGrads.scores`), each factor widened to float64 first: ``n^2 (in + out)``
    multiply-adds per layer instead of ``n^2 in out`` for the dense rows (digits-lr without
    projection: 75 against 650 per pair). ``blocks``: the rows in order, by batch (``C = 1``
    each), never concatenated; read by ``rows`` rows (three ``[rows, b]`` float64 temporaries).
    """
    wide = [LayerGrads({k: (a.double(), g.double()) for k, (a, g) in b.factors.items()},
                       b.dense.double(), layout_to(b.layout, dtype=torch.float64)) for b in blocks]
    n = sum(b.num_rows for b in wide)
    gram = torch.empty((n, n), dtype=torch.float64, device=blocks[0].dense.device)
    r0 = 0
    for bi in wide:
        for s in range(0, bi.num_rows, rows):
            part = bi.rows(s, s + rows)
            c0 = 0
            for bj in wide:
                gram[r0 + s:r0 + s + part.num_rows, c0:c0 + bj.num_rows] = part.scores(bj)
                c0 += bj.num_rows
        r0 += bi.num_rows
    return gram


def _inverted(grams, C: int, size: int, dtype, device, damping: float,
              pack: int = 0, limit: float | None = None) -> tuple[Tensor, list | Tensor]:
    """``((gram_c + damping I)^-1 [C, size, size], checkpoints that did not factor)``, each
    float64 ``gram_c`` (taken from ``grams`` only when needed) factored and inverted in place.
    ``pack > 0``: each inverse kept block-packed instead (:func:`packed_blocks`),
    ``[C, packed_size(size, pack)]``. ``limit``: a Gram whose diagonal (the dual form's squared
    row norms) is NaN or over it stops the loop; its diagonal ``[size]`` is returned instead of
    the checkpoints (one reduction a checkpoint).

    The result is allocated once the first Gram is there: a ``grams`` that fills TRAK's feature
    cache on its first item then peaks without the ``[C, size, size]`` kernel. One Gram is alive
    at a time.
    """
    K = None
    info = torch.empty((), dtype=torch.int32, device=device)
    bad = []
    c = -1
    # not enumerate(grams): its reused result tuple would keep the last Gram alive while the
    # next one is formed (two [size, size] float64 matrices at once)
    shape = (C, size, size) if not pack else (C, packed_size(size, pack))
    for g in grams:
        c += 1
        if K is None:
            K = torch.empty(shape, dtype=dtype, device=device)
        if limit is not None and not bool((g.diagonal() <= limit).all()):
            return K, g.diagonal().clone()
        g.diagonal().add_(damping)
        g = g.mT  # the same symmetric matrix, column-major: LAPACK then works in g itself
        torch.linalg.cholesky_ex(g, out=(g, info))
        if int(info) != 0:
            bad.append(c)
        elif not pack:
            K[c] = torch.cholesky_inverse(g, out=g)
        else:
            torch.cholesky_inverse(g, out=g)
            for s, e, off in packed_blocks(size, pack):
                packed_block(K[c], s, e, off).copy_(g[s:e, :e])
        del g
    if K is None:  # no Gram at all
        K = torch.empty(shape, dtype=dtype, device=device)
    return K, bad


def primal_kernel(func: str, grams, C: int, d: int, n: int, dtype, device,
                  damping: float, feats=None, fdt: torch.dtype | None = None) -> Tensor:
    """``(gram_c + damping I)^-1`` by Cholesky, factored and inverted in place in each
    float64 ``gram_c`` (an iterable's item, taken only when needed).  # [C, d, d]
    ``feats``: the training rows held (``[C, n, d]`` or a list of ``[C, b, d]`` chunks, of
    dtype ``fdt``), read only where a checkpoint does not factor (:func:`blame_rows`)."""
    K, bad = _inverted(grams, C, d, dtype, device, damping)
    if bad:
        del K
        blame_rows(func, feats, fdt)
        raise singular(func, bad, d, n, damping)
    return K


def gram_dtype(fdt: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision features with float32 params (exact products, one fast
    GEMM per block), else float64: float32 Phi^T Phi is too ill-conditioned to factor once
    d approaches n_train."""
    return torch.float32 if fdt.itemsize <= 2 and dtype == torch.float32 else torch.float64
