"""FactGraSS: influence through factorised gradient sketches (mask each factor, Kronecker, SJLT).

For a captured layer with input ``a`` (``[a, 1]`` with an attributed bias) and output gradient
``g`` (:mod:`dattri_fn.transforms.capture`), example ``i``'s gradient block is
``G_i = sum_t g_it a_it^T``. FactGraSS compresses it in two stages without forming ``G_i``:

    stage 1 (factorised sparsification)  S_i = sum_t (M_out^T g_it)(M_in^T a_it)^T    # [k', k']
    stage 2 (sparse projection)          phi_i = R^T vec(S_i)                          # [d]

``M`` picks ``k'`` random coordinates of a factor, scaled by ``sqrt(width / k')``
(``E[M M^T] = I``); ``R`` is a sparse JL (count-sketch) ``[k'^2, d]`` matrix. ``k' =
round(sqrt(blowup * d))`` by default. Parameters outside the captured layers form one more
block (masked to ``k'^2`` coordinates, then projected). The curvature is the empirical Fisher
of each block, damped and inverted:

    scores[i, j] = sum_b phi_ib^T (F_b + damping_b I)^-1 phi_jb,   F_b = (1/n) sum_i phi_ib phi_ib^T

(``[n_train, n_test]``; positive = up-weighting train ``i`` lowers test ``j``'s loss);
``curvature="identity"`` drops ``F``: the sketched Grad-Dot.

References:
    "GraSS: Scalable Data Attribution with Gradient Sparsification and Sparse
    Projection", 2025, arXiv 2505.18976 (GraSS, FactGraSS).
    Choe et al., 2024, arXiv 2405.13954 (LoGra, the factorised projection it refines).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import (
    _msg,
    batch_leaves,
    batch_size,
    batch_slice,
    batch_to,
    blame_data,
    check_int,
    check_optional_int,
    check_params,
    check_positive,
    count_rows,
    iter_batches,
    regrouped,
)
from ..model import FunctionalModel
from ..operators.gauss_newton import memory_budget
from ..transforms import capture
from ..transforms.kronecker import kronecker_layers, make_kronecker_projector
from ..transforms.layer_grads import (
    LayerPlan,
    PlanDecisions,
    _check,
    decided_plan,
    keep_tie_factors,
    layer_grads_stacked,
    layer_plan,
    plan_decisions,
)
from ..transforms.project import make_projector
from .boundary import check_cached_train
from .capture_rows import PASS_SHARE, cached_row_count, can_merge, capture_row_bytes, merged_passes
from .factgrass_blocks import (
    _blocks_of,
    _cached,
    _check_blocks,
    _check_sketch,
    _factor_rows,
    _Factors,
    _precondition,
    _shapes,
    _Sketches,
    _spans,
    _stage_two,
)
from .factgrass_flat import (  # noqa: F401 (_flat_sketch: importable from here, as before)
    _flat_capturable,
    _flat_checked,
    _flat_factored,
    _flat_io,
    _flat_io_checked,
    _flat_sketch,
)
from .method import Method
from .pipeline import TopK, collect, stream_scores

CURVATURES = ("fisher", "identity")
_DENSE_STAGE2 = 2**20  # a stage-2 sketch up to this many w x d entries is applied as a matmul
# a layer's stage-1 sketch [c, k_out k_in] is formed for c rows at a time, at most this many bytes
# (merged passes take thousands of rows; the sketch is reduced to its d columns at once). 2**18
# took 12% less time at 16k rows but raised digits-lr's whole peak 0.245 -> 0.421 MiB
_SKETCH_BYTES = 2**16
# the train cache holds each block's factors where the features would take more than
# memory_budget() // PASS_SHARE // _SMALL bytes (2 MiB of the default 256 MiB: half of what one
# capture pass may hold), else the features. Re-forming features per score costs one more
# stage-2 product of every row (+9-20% time at 4k-16k digits rows), and below this size the
# capture pass, not the cache, sets the peak (4k rows: 0.622 -> 0.567 of dattri's with factors)
_SMALL = 2


def _keep_bytes() -> int:
    """The most bytes of train features that are cached as they are (more: their factors)."""
    return memory_budget() // PASS_SHARE // _SMALL


class FactGraSSState(NamedTuple):
    """What :func:`factgrass`'s ``prepare`` computes once from the training set.

    Attributes:
        blocks: ``((name, start, stop), ...)``: each block's columns in the features.
        inverses: ``{block: (F_b + damping_b I)^-1}`` ``[d_b, d_b]``; empty for
            ``curvature="identity"``.
        train_features: ``phi_i`` of every training example, or None (``cache_features=False``,
            or held factored in ``train_factors``).  # [n_train, d]
        plan: what the check of the capture plan on the first training batch of 2 or more
            examples decided, as plain values
            (:class:`~dattri_fn.transforms.layer_grads.PlanDecisions`, as ``GradSimState`` and
            ``TRAKState`` hold them): ``score`` and ``self_score`` apply the decided plan without
            checking again. None: each of their streams checks its own first batch.
        train_factors: where every training example took the flat path (each captured layer a
            Linear/Conv1D at one position, no parameters outside them), each block's stage-1
            factors ``{block: (M_in^T [a, 1] [n_train, k_in'], M_out^T g [n_train, k_out'])}``
            instead of the features: ``k_in' + k_out'`` numbers per block and example instead of
            ``d_b``; ``phi_i = R^T vec(g'_i a'_i^T)`` is formed from them in fixed row spans
            (the same rows in ``prepare``'s Fisher and every ``score``), never all at once.
            Held where the features would take more than ``memory_budget() // PASS_SHARE // 2``
            bytes (2 MiB by default), else None and the features are cached. Data whose every
            part has one example (a loader of ``batch_size=1``, or ``chunk_size=1``) never takes
            the flat path (the plan is checked on a part of 2 or more): its features are cached.
        sketch: what the cached rows and the inverses depend on besides the blocks,
            ``(("seed", s), ("kind", k), ("mask_dim", k'), ("proj_dim", d), ("curvature", c),
            ("damping", lam))`` (``lam`` None for ``curvature="identity"``): ``score``,
            ``self_score`` and ``feature_rows`` refuse a state whose ``sketch`` differs from
            their factgrass's, by name. None (a state saved before stop 23): not checked.
    """

    blocks: tuple
    inverses: dict
    train_features: Tensor | None
    plan: PlanDecisions | None = None
    train_factors: dict | None = None
    sketch: tuple | None = None

    def cached_rows(self) -> int | None:
        """The number of training examples whose features the state holds (None: none)."""
        return cached_row_count(self.train_features, self.train_factors)


def factgrass(model: FunctionalModel, *, proj_dim: int = 256, blowup: int = 4,
              mask_dim: int | None = None, kind: str = "sjlt", curvature: str = "fisher",
              damping: float | None = None, seed: int = 0, chunk_size: int | None = None,
              batch_rows: int | None = None, cache_features: bool = True) -> Method:
    """Return FactGraSS: ``s_ij = sum_b phi_ib^T (F_b + damping_b I)^-1 phi_jb``.  # [n_train, n_test]

    Args:
        model: a FunctionalModel with a ``loss_fn`` and at least one attributed ``nn.Linear``,
            Hugging Face ``Conv1D``, ``nn.Conv2d`` or ``nn.Embedding`` layer (any forward: the
            capture engine needs no trace).
        proj_dim: ``d``, the width of each block's sketch (a block no wider is kept whole).
        blowup: ``k' = round(sqrt(blowup * proj_dim))`` coordinates kept per factor (dattri's
            ``blowup_factor``); ignored when ``mask_dim`` is given.
        mask_dim: ``k'`` itself (a factor no wider is kept whole).
        kind: the stage-2 projection, ``"sjlt"`` (count-sketch, the paper's), ``"gaussian"``
            or ``"rademacher"`` (see :func:`dattri_fn.transforms.project.make_projector`).
        curvature: ``"fisher"`` (the empirical Fisher of each block's sketches) or
            ``"identity"`` (no inverse).
        damping: added to each block's Fisher; None = ``0.1 * tr(F_b) / d_b`` (a tenth of its
            mean eigenvalue, as :func:`~dattri_fn.attribute.logra.logra`). dattri's
            ``damping`` is relative: its ``r`` is ours ``r * tr(F_b) / d_b``.
        seed: fixes the masks and projections.
        chunk_size: examples per batched forward/backward (bounds memory).
        batch_rows: merge consecutive batches into calls of at least this many examples
            (1: as given). None: ``prepare`` merges a list or tuple of batches into capture
            passes that fit :func:`~dattri_fn.operators.gauss_newton.memory_budget` (as
            :func:`~dattri_fn.attribute.logra.logra`; each layer's stage-1 sketch is then
            formed a bounded block of rows at a time); other data as given.
        cache_features: keep the train sketches ``[n_train, d]`` in the state, so ``score`` and
            ``self_score`` read no training data.

    Returns:
        ``Method(prepare, score, self_score, "factgrass")``; ``prepare(params, train) ->
        FactGraSSState``; ``prepare.feature_rows(params, state, start=0, stop=None)``: the
        train features ``phi`` that ``score`` uses, from whichever form the state caches.

    Raises:
        TypeError/ValueError: naming the argument.
    """
    name = "factgrass"
    if not isinstance(model, FunctionalModel):
        raise TypeError(_msg(name, "model", "a FunctionalModel from functional_model(module, "
                             "loss_fn)", type(model).__name__))
    if model.loss_fn is None:
        raise ValueError(_msg(name, "model", "a FunctionalModel built with a loss_fn",
                              "loss_fn=None"))
    check_int(name, "proj_dim", proj_dim, minimum=1)
    check_int(name, "blowup", blowup, minimum=1)
    check_optional_int(name, "mask_dim", mask_dim)
    if kind not in ("sjlt", "gaussian", "rademacher"):
        raise ValueError(_msg(name, "kind", "one of ('sjlt', 'gaussian', 'rademacher')",
                              repr(kind)))
    if curvature not in CURVATURES:
        raise ValueError(_msg(name, "curvature", f"one of {CURVATURES}", repr(curvature)))
    if damping is not None:
        damping = check_positive(name, "damping", damping, allow_zero=True)
    check_int(name, "seed", seed, minimum=0)
    check_optional_int(name, "chunk_size", chunk_size)
    rows_min = check_optional_int(name, "batch_rows", batch_rows)
    plan = layer_plan(model)
    if plan is None:
        raise ValueError(_msg(name, "model", "an attributed nn.Linear, Conv1D, Conv2d or "
                              "Embedding layer", "none"))
    k1 = mask_dim if mask_dim is not None else max(1, round((blowup * proj_dim) ** 0.5))
    # a state scored with another seed, kind or curvature would meet rows sketched, or inverses
    # formed, another way: its scores mean nothing (review R2 F2: 1.2-12x off), so it is refused
    fingerprint = (("seed", seed), ("kind", kind), ("mask_dim", k1), ("proj_dim", proj_dim),
                   ("curvature", curvature),
                   ("damping", damping if curvature == "fisher" else None))

    def draw(params: dict) -> _Sketches:
        """The sketches of parameters of these shapes, drawn from the seed (explicit values:
        the stage-2 matrices that are applied densely are formed here, in the params' dtype)."""
        like = next(iter(params.values()))
        layers, rest = kronecker_layers(plan, params)
        stage1 = make_kronecker_projector(layers, proj_dim=k1, kind="mask", seed=seed, rest=rest,
                                          rest_dim=k1 * k1, dtype=like.dtype, device=like.device)
        stage2 = {b: None if w <= proj_dim else
                  make_projector(w, proj_dim=proj_dim, kind=kind, seed=seed + 1 + i, packed=False)
                  for i, (b, w) in enumerate(stage1.dims.items())}
        dense = {b: None if R is None or R.dim * R.proj_dim > _DENSE_STAGE2 else
                 R.matrix(like.dtype, like.device) for b, R in stage2.items()}
        return _Sketches(_shapes(params), stage1, stage2, dense)

    # drawn once for the model's own parameters; params of other shapes, dtype or device
    # (a call's own) are drawn for that call
    drawn = draw(model.params)

    def sketch_for(params: dict) -> _Sketches:
        like, held = next(iter(params.values())), drawn.stage1
        if (_shapes(params) == drawn.key and like.dtype == held.dtype
                and like.device == held.device):
            return drawn
        return draw(params)

    def state_of(func: str, params) -> dict:
        if isinstance(params, (list, tuple)):
            raise TypeError(_msg(func, "params", "one params dict (FactGraSS runs on one "
                                 "model)", f"a {type(params).__name__} of {len(params)}"))
        params = check_params(func, "params", params)
        if list(params) != list(model.params):
            raise ValueError(_msg(func, "params", f"the keys of model.params {list(model.params)}",
                                  f"{list(params)}"))
        return params

    def feature_fn(params: dict, sk: _Sketches, func: str, arg: str,
                   checked: LayerPlan | None = None):
        """``rows(batch) -> phi [b, d]`` for one stream, and ``held()``: the plan it applies.
        Without ``checked`` the stream checks the plan on its first chunk of >= 2 examples (that
        chunk's gradients come from the checking pass) and holds the checked plan after it."""
        stage1 = sk.stage1
        cols = _blocks_of(sk)
        width = cols[-1][2]
        stacked = {k: v.detach()[None] for k, v in params.items()}
        # stage one reads a tie from its members' factors (no [b, V D] rows)
        held = [keep_tie_factors(plan if checked is None else checked)]

        def grads(part):
            if not held[0].checked and batch_size(func, arg, part) >= 2:
                held[0], lg = _check(held[0], stacked, part)
                return lg
            return layer_grads_stacked(held[0], stacked, part)

        def flat_io(part) -> dict | None:
            """The part's flat factors from one capture pass, checking the plan on the way
            when this stream holds none yet; None: the plan's own path takes the part."""
            p = held[0]
            if not p.checked:
                if not _flat_capturable(p) or batch_leaves(part)[0].shape[0] < 2:
                    return None
                try:
                    io, checked = _flat_io_checked(p, params, part)
                except capture.CaptureError:  # the full check decides (and warns)
                    return None
                if checked is None:
                    return None
                held[0] = checked
                return io
            if not _flat_factored(p):
                return None
            try:
                io = _flat_io(p, params, part)
            except capture.CaptureError:  # this batch takes another path: the plan's
                return None
            # a batch with positions (a [b, T, in]) is not one factor pair per example
            return io if all(a.ndim == 2 for a, _ in io.values()) else None

        def flat_sides(io: dict, caller: frozenset = frozenset()):
            """``(block, start, stop, P_in^T [a, 1], P_out^T g)`` of each layer in turn: its
            projected sides (stage 1's factors, as :func:`_flat_sketch` forms them). Each
            layer's ``a`` and ``g`` leave ``io`` as its sides are formed, so a caller that
            takes the sides one by one never holds both for all layers. ``caller``: the
            storages of the part's own tensors; a side that views one is copied."""
            p = held[0]
            for blk, s, e in cols:
                wk, bk = p.layers[blk]
                a, g = io.pop(blk)
                a = a.reshape(a.shape[0], -1, a.shape[-1])[:, 0]
                g = g.reshape(g.shape[0], -1, g.shape[-1])[:, 0]
                if wk is None:  # a bias alone: its factor is the ones column
                    a = a.new_ones((*a.shape[:-1], 1))
                pa, pg = stage1.project_sides(blk, a, g, ones=bk is not None and wk is not None)
                # a side kept whole is the layer input itself: for a first layer, the caller's
                # batch. A cache holding it would move with the caller's in-place changes (and
                # keep its whole storage alive)
                pa, pg = (t.clone() if t.untyped_storage().data_ptr() in caller else t
                          for t in (pa, pg))
                a = g = None
                yield blk, s, e, pa, pg
                pa = pg = None

        def write_flat(sides, out: Tensor, r0: int) -> None:
            """Stage 1 (``vec(g' a'^T)``) and stage 2 of each layer into ``out[r0:]``, a bounded
            number of rows at a time."""
            for blk, s, e, pa, pg in sides:
                step = max(1, _SKETCH_BYTES // (stage1.dims[blk] * pa.element_size()))
                for r in range(0, pa.shape[0], step):
                    S = (pg[r:r + step, :, None] * pa[r:r + step, None, :]).flatten(1)
                    _stage_two(sk, blk, S, out[r0 + r:r0 + r + S.shape[0], s:e])
                    del S

        def pieces(box: list):
            """The batch in ``box``, which is emptied (once a part's factors are captured the
            batch is not held here: the caller can let it go), as ``(start, rows, b, like,
            sides, S)`` per part of ``chunk_size`` rows (``like``: an empty tensor of the rows'
            dtype and device): ``sides`` (:func:`flat_sides`, taken one layer at a time) where
            the part took the flat path, else its stage-1 rows ``S [rows, w]``.
            ``rows.held_bytes`` is set to the bytes one example held in the pass (its batch and
            captured factors)."""
            batch = box.pop()
            b = batch_size(func, arg, batch)
            in_bytes = sum(t.nbytes for t in batch_leaves(batch))
            step = b if chunk_size is None else chunk_size
            # the storages of the caller's tensors (a part is a view of them)
            caller = frozenset(t.untyped_storage().data_ptr() for t in batch_leaves(batch)
                               if t.numel())
            for s in range(0, b, step):
                part = batch if step >= b else batch_slice(batch, s, s + step)
                c = min(step, b - s)
                with blame_data(func, arg, part):  # where the model runs on the examples
                    io = flat_io(part)
                    S = stage1.layer_grads(grads(part))[0] if io is None else None
                if s == 0:
                    took = (sum(a.nbytes + g.nbytes for a, g in io.values()) if io is not None
                            else S.nbytes)
                    rows.held_bytes = -(-(in_bytes * c // max(b, 1) + took) // c)
                part = None
                if step >= b:
                    batch = None
                like = (S if io is None else next(iter(io.values()))[1]).new_empty(0)
                yield s, c, b, like, None if io is None else flat_sides(io, caller), S
                io = S = None

        def write_rows(sides, S: Tensor | None, out: Tensor) -> None:
            """One part's rows ``phi`` into ``out`` ``[c, d]``: from its sides, or its S."""
            if sides is not None:
                write_flat(sides, out, 0)
                return
            start = 0
            for (blk, w), (_, c0, c1) in zip(stage1.dims.items(), cols, strict=True):
                _stage_two(sk, blk, S[:, start:start + w], out[:, c0:c1])
                start += w

        def rows_of(box: list, into: Tensor | None = None) -> Tensor:  # [b, d]
            """``rows`` of the batch in ``box`` (emptied, see :func:`pieces`). ``into``: the
            ``[b, d]`` rows are written into its first ``b``."""
            out = None
            for s, c, b, like, sides, S in pieces(box):
                # every layer's sides before the rows are allocated: the raw factors go first
                sides = None if sides is None else list(sides)
                if out is None:
                    out = like.new_empty(b, width) if into is None else into[:b]
                write_rows(sides, S, out[s:s + c])
                sides = S = None
            return out

        def rows(batch) -> Tensor:  # [b, d]
            return rows_of([batch])

        rows.of, rows.pieces, rows.write, rows.held_bytes = rows_of, pieces, write_rows, None
        rows.write_flat = write_flat
        return rows, lambda: held[0]

    def spans_of(sk: _Sketches, factors: dict) -> list:
        """The fixed row spans in which cached factors become features (:func:`_spans`)."""
        a0 = next(iter(factors.values()))[0]
        return _spans(a0.shape[0], _blocks_of(sk)[-1][2], max(sk.stage1.dims.values()),
                      a0.element_size(), _SKETCH_BYTES)

    def prepare(params, train) -> FactGraSSState:
        func = f"{name}.prepare"
        params = state_of(func, params)
        device = next(iter(params.values())).device
        sk = sketch_for(params)
        fn, held = feature_fn(params, sk, func, "train")
        blocks = _blocks_of(sk)
        width = blocks[-1][2]
        total = None  # the training set's rows where known before any pass: caches in place
        if rows_min is None and can_merge(train):
            # a list of batches in memory: fewer capture passes, each within the memory budget
            # and the bytes the pass before measured (the stage-1 sketches of a pass are formed
            # a bounded number of rows at a time)
            state = {**model.fixed, **params}
            weights = [state[plan.tapped.specs[n].weight] for n in plan.layers
                       if plan.tapped.specs[n].weight in state]
            total = count_rows(func, "train", train, check=False)  # merged_passes checks each
            passes = merged_passes(func, "train", train,
                                   lambda b: capture_row_bytes(b, weights), memory_budget(),
                                   measured=lambda: fn.held_bytes)
        else:
            passes = iter_batches(func, "train", regrouped(func, "train", train, rows_min))
        fisher = curvature == "fisher"
        grams = dict.fromkeys(sk.stage1.dims)

        def add_gram(phi: Tensor) -> None:
            for blk, s, e in blocks:
                gram = phi[:, s:e].mT @ phi[:, s:e]
                grams[blk] = gram if grams[blk] is None else grams[blk] + gram

        # the cache holds each block's factors while every part takes the flat path (the
        # features are formed from them in fixed spans: for the Fisher below, and per score);
        # the first part that does not turns the rows so far into features, cached as given.
        # Features known to be small are cached as given from the start.
        itemsize = next(iter(params.values())).element_size()
        small = _keep_bytes()
        store = _Factors(total) if cache_features and (
            total is None or total * width * itemsize > small) else None
        feats, n, buf = [], 0, None
        for batch in passes:
            box = [batch_to(batch, device)]
            batch = None
            # the rows of this pass that are features (from its part `first` on), written
            # straight into the cache where the row count is known (no blocks joined at the end)
            phi, first, b = None, 0, 0
            for s, c, b, like, sides, S in fn.pieces(box):
                if store is not None and sides is not None:
                    store.add(sides, c)
                    continue
                if store is not None:
                    done, store = store.value() if store.n else None, None
                    if done is not None:
                        old = torch.cat([_factor_rows(sk, blocks, done, r0, r1)
                                         for r0, r1 in spans_of(sk, done)])
                        if fisher:
                            add_gram(old)
                        if total is not None:
                            buf = old.new_empty(total, width)
                            buf[:old.shape[0]].copy_(old)
                        else:
                            feats.append(old)
                        done = old = None
                    first = s
                sides = None if sides is None else list(sides)  # the raw factors go first
                if phi is None:
                    if cache_features and total is not None and (buf is not None
                                                                 or b - first < total):
                        if buf is None:
                            buf = like.new_empty(total, width)
                        phi = buf[n + first:n + b]
                    else:
                        phi = like.new_empty(b - first, width)
                fn.write(sides, S, phi[s - first:s - first + c])
                sides = S = None
            if phi is not None:
                if fisher:
                    add_gram(phi)
                if cache_features and buf is None:
                    feats.append(phi)
                phi = None
            n += b
        if n == 0:
            raise ValueError(_msg(func, "train", "at least one example", "none"))
        factors = None
        if store is not None:
            factors = store.value()
            like = next(iter(factors.values()))[0]
            if n * width * like.element_size() <= small:
                # features this small are kept (forming them per score would cost more time
                # than they take): formed from the factors as one pass's, and one Fisher
                buf = like.new_empty(n, width)
                fn.write_flat(((blk, c0, c1, *factors[blk]) for blk, c0, c1 in blocks), buf, 0)
                factors = None
                if fisher:
                    add_gram(buf)
            elif fisher:  # one sweep over the factors in their fixed spans, one at a time
                for r0, r1 in spans_of(sk, factors):
                    add_gram(_factor_rows(sk, blocks, factors, r0, r1))
        inverses = {}
        if fisher:
            damped, by_size = {}, {}
            for blk, s, e in blocks:
                F = grams[blk] / n
                F.diagonal().add_(0.1 * F.diagonal().mean() if damping is None else damping)
                damped[blk] = F
                by_size.setdefault(e - s, []).append(blk)
            for names in by_size.values():  # one batched factorisation per block size
                # one matrix is factorised as it is (no stacked copy): the same LAPACK call
                L, info = torch.linalg.cholesky_ex(damped[names[0]][None] if len(names) == 1
                                                   else torch.stack([damped[b] for b in names]))
                bad = [b for b, i in zip(names, info.tolist(), strict=True) if i]
                if bad:
                    raise ValueError(_msg(func, "damping", "a positive damping (or None) where "
                                          f"block {bad[0]!r}'s Fisher is singular",
                                          f"damping={damping}"))
                inv = torch.cholesky_inverse(L)
                inverses.update(zip(names, inv.unbind(), strict=True))
        checked = held()
        features = None if not cache_features or factors is not None else buf if (
            buf is not None) else feats[0] if len(feats) == 1 else torch.cat(feats)
        return FactGraSSState(blocks, inverses, features,
                              plan_decisions(checked) if checked.checked else None, factors,
                              fingerprint)

    def check_state(func: str, state) -> LayerPlan | None:
        """Raise unless ``state`` is a FactGraSSState this model's plan can take; return the
        plan its decisions give (no check, no pass over data), None where it holds none."""
        if not isinstance(state, FactGraSSState):
            raise TypeError(_msg(func, "state", "the FactGraSSState returned by factgrass's "
                                 "prepare", type(state).__name__))
        _check_sketch(func, state, fingerprint)
        if state.plan is None:
            return None
        try:
            return decided_plan(plan, state.plan)
        except (TypeError, ValueError) as err:  # decisions made for another model
            raise ValueError(_msg(func, "state", "the FactGraSSState of this factgrass's prepare",
                                  f"decisions this model's capture plan refuses ({err})")) from err

    def state_params(func: str, params, state: FactGraSSState) -> dict:
        """``state_of(func, params)``, refusing params of another dtype than the state's cached
        train rows (they would meet test rows of the params' dtype)."""
        got = state_of(func, params)
        rows = state.train_features if state.train_features is not None else None if (
            not state.train_factors) else next(iter(state.train_factors.values()))[0]
        dtype = next(iter(got.values())).dtype
        if rows is not None and rows.dtype != dtype:
            raise ValueError(_msg(func, "params", f"params in {rows.dtype}, the dtype of the "
                                  "state's cached train rows", f"{dtype}",
                                  "Cast the params, or call prepare again with them."))
        return got

    def factor_rows(sk: _Sketches, state: FactGraSSState, device):
        """``(form, spans)``: ``form(r0, r1)`` gives the features of the state's cached
        examples ``r0:r1`` from its factors (on ``device``), in the spans ``prepare`` used."""
        factors = {b: (a.to(device), g.to(device)) for b, (a, g) in state.train_factors.items()}
        blocks = _blocks_of(sk)
        return (lambda r0, r1: _factor_rows(sk, blocks, factors, r0, r1)), spans_of(sk, factors)

    def score(params, state: FactGraSSState, train, test, *, top_k: int | None = None,
              largest: bool = True) -> Tensor | TopK:
        func = f"{name}.score"
        held = check_state(func, state)
        params = state_params(func, params, state)
        device = next(iter(params.values())).device
        check_optional_int(func, "top_k", top_k)
        sk = sketch_for(params)
        _check_blocks(func, state, sk)
        test_pre = _precondition(state, collect(feature_fn(params, sk, func, "test", held)[0],
                                                test, device=device, func=func, arg="test"))
        if state.train_features is not None:
            check_cached_train(func, train, state.train_features.shape[0])
            feats = state.train_features.to(device)
            if top_k is None and feats.dtype == test_pre.dtype:
                # the whole [n_train, n_test] is returned anyway: one product, no block copies
                return feats @ test_pre.T
            fn, blocks = _cached(feats)
            return stream_scores(fn, blocks, test_pre, top_k=top_k, largest=largest, func=func)
        if state.train_factors is not None:
            check_cached_train(func, train, state.cached_rows())
            form, spans = factor_rows(sk, state, device)
            if top_k is None and next(iter(state.train_factors.values()))[0].dtype == (
                    test_pre.dtype):
                # each span's features scored into its rows of the result: never all at once
                out = test_pre.new_empty(state.cached_rows(), test_pre.shape[0])
                for r0, r1 in spans:
                    torch.mm(form(r0, r1), test_pre.T, out=out[r0:r1])
                return out
            return stream_scores(lambda i: form(int(i[0][0]), int(i[0][-1]) + 1),
                                 [(torch.arange(r0, r1),) for r0, r1 in spans], test_pre,
                                 top_k=top_k, largest=largest, func=func)
        if train is None:
            raise ValueError(_msg(func, "train", "the training data (the state caches no "
                                  "features: cache_features=False)", "None"))
        return stream_scores(feature_fn(params, sk, func, "train", held)[0],
                             regrouped(func, "train", train, rows_min), test_pre, top_k=top_k,
                             largest=largest, func=func)

    def self_score(params, state: FactGraSSState, train) -> Tensor:
        func = f"{name}.self_score"
        held = check_state(func, state)
        params = state_params(func, params, state)
        device = next(iter(params.values())).device
        if state.train_features is not None:
            check_cached_train(func, train, state.train_features.shape[0])
            fn, blocks = _cached(state.train_features.to(device))
            rows = (fn(i) for i in blocks)
        elif state.train_factors is not None:
            check_cached_train(func, train, state.cached_rows())
            sk = sketch_for(params)
            _check_blocks(func, state, sk)
            form, spans = factor_rows(sk, state, device)
            rows = (form(r0, r1) for r0, r1 in spans)
        elif train is None:
            raise ValueError(_msg(func, "train", "the training data (the state caches no "
                                  "features: cache_features=False)", "None"))
        else:
            sk = sketch_for(params)
            _check_blocks(func, state, sk)
            fn = feature_fn(params, sk, func, "train", held)[0]
            rows = (fn(batch_to(b, device)) for b in
                    iter_batches(func, "train", regrouped(func, "train", train, rows_min)))
        return torch.cat([(phi * _precondition(state, phi)).sum(1) for phi in rows])

    def feature_rows(params, state: FactGraSSState, start: int = 0,
                     stop: int | None = None) -> Tensor | None:
        """``phi`` of the cached examples ``start:stop``, from whichever form the state holds
        (the rows ``score`` uses, bit for bit; None: none cached).  # [stop - start, d]"""
        func = f"{name}.prepare.feature_rows"
        check_state(func, state)
        if state.train_features is not None:
            return state.train_features[start:stop]
        if state.train_factors is None:
            return None
        params = state_params(func, params, state)
        sk = sketch_for(params)
        _check_blocks(func, state, sk)
        form, spans = factor_rows(sk, state, next(iter(params.values())).device)
        start, stop, _ = slice(start, stop).indices(state.cached_rows())
        got = [form(r0, r1)[max(start, r0) - r0:min(stop, r1) - r0] for r0, r1 in spans
               if r0 < stop and r1 > start]
        if not got:
            return state.train_factors[state.blocks[0][0]][0].new_empty(0, state.blocks[-1][2])
        return got[0] if len(got) == 1 else torch.cat(got)

    prepare.feature_rows = feature_rows
    return Method(prepare, score, self_score, name)


__all__ = ["FactGraSSState", "factgrass"]
