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

from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import (
    _msg,
    batch_leaves,
    batch_to,
    check_int,
    check_optional_int,
    check_positive,
    count_rows,
    iter_batches,
    regrouped,
)
from ..model import FunctionalModel, check_bridged, check_eval
from ..operators.gauss_newton import memory_budget
from ..transforms.kronecker import kronecker_layers, make_kronecker_projector
from ..transforms.layer_grads import (
    LayerPlan,
    PlanDecisions,
    keep_tie_factors,
    layer_plan,
    plan_decisions,
)
from ..transforms.mlp_io import mlp_chain
from ..transforms.project import make_projector
from . import train_print
from .capture_rows import cached_row_count, can_merge, capture_row_bytes, merged_passes
from .factgrass_blocks import (  # noqa: F401 (importable from here, as before the split)
    _blocks_of,
    _cached,
    _check_blocks,
    _check_sketch,
    _factor_rows,
    _Factors,
    _precondition,
    _refuse_fisher,
    _shapes,
    _Sketches,
    _spans,
    _stage_two,
)
from .factgrass_fisher import (  # noqa: F401 (_held_rows: as before)
    _gram_groups,
    _group_gram,
    _held_rows,
    _inverses,
)
from .factgrass_flat import (  # noqa: F401 (importable from here, as before the split)
    _flat_capturable,
    _flat_checked,
    _flat_factored,
    _flat_io,
    _flat_io_checked,
    _flat_sketch,
)
from .factgrass_score import _Config, feature_fn, spans_of, state_of
from .factgrass_score import feature_rows as _feature_rows
from .factgrass_score import score as _score
from .factgrass_score import self_score as _self_score
from .method import Method
from .pipeline import TopK

CURVATURES = ("fisher", "identity")
_DENSE_STAGE2 = 2**20  # a stage-2 sketch up to this many w x d entries is applied as a matmul
# a layer's stage-1 sketch [c, k_out k_in] is formed for c rows at a time, at most this many bytes
# (merged passes take thousands of rows; the sketch is reduced to its d columns at once). 2**18
# took 12% less time at 16k rows but raised digits-lr's whole peak 0.245 -> 0.421 MiB
_SKETCH_BYTES = 2**16
# the train cache holds each block's factors where the features would take more than
# memory_budget() // _CACHE_SHARE bytes (2 MiB of the default 256 MiB), else the features. Factors
# are re-formed into features at every score (one more stage-2 product of every train row): a
# score of 32 test rows then costs 3.4-5.2x, of 1000 rows 1.3x (review R2 F2, R7 L1;
# benchmarks/factgrass_cache_edge.py, stop 24: 1000 x 64, 500 x 256, 4000 x 64 digits rows x
# proj_dim). 70a9683 had lowered this edge to 256 KiB for every user to meet P = 10k's peak;
# the byte-bounded passes below meet it alone
_CACHE_SHARE = 128
# a merged capture pass of prepare holds at most memory_budget() // _PASS_SHARE measured bytes
# (512 KiB of the default 256 MiB; a plain MLP's first pass too, its bytes known before it runs).
# Stop 24, exact tensor peaks / dattri's (factgrass_ab --dattri): 4 MiB passes and the 2 MiB cache
# edge: n = 4k 0.580, P = 10k 0.831; 512 KiB passes, 2 MiB edge: 0.497 / 0.47-0.51 (dattri's own
# peak reads 1.66-1.78 MiB); with a 256 KiB edge instead: 0.390 / 0.30-0.33 at 3.9x / 3.2x per score
_PASS_SHARE = 512


def _keep_bytes() -> int:
    """The most bytes of train features that are cached as they are (more: their factors)."""
    return memory_budget() // _CACHE_SHARE


def _plain_row_bytes(model: FunctionalModel, plan: LayerPlan, state: dict, batch) -> int | None:
    """What one example holds in a capture pass, as the pass measures it (``_Rows.held_bytes``:
    its batch row, each layer's ``a`` and ``g``), where ``model.module`` is an ``mlp_chain``
    (an ``nn.Sequential`` of ``nn.Linear`` and elementwise activations), the batch's leaves have
    at most 2 dims and every captured layer's weight is in ``state``; else None (nothing is
    known before the first pass). The loss, dtypes and labels are not checked here (``mlp_io``
    checks them when it runs): where it refuses, the engine takes the pass, and it holds the
    same ``a`` and ``g`` per example, so the bound still holds."""
    leaves = batch_leaves(batch)
    if mlp_chain(model.module) is None or any(t.ndim > 2 for t in leaves):
        return None
    specs = plan.tapped.specs
    w = [state[specs[n].weight] for n in plan.layers if specs[n].weight in state]
    if len(w) != len(plan.layers):
        return None
    return (sum(t.element_size() * t.shape[1:].numel() for t in leaves if t.ndim)
            + sum(x.shape[0] + x.shape[1] for x in w) * w[0].element_size())


class FactGraSSState(NamedTuple):
    """What :func:`factgrass`'s ``prepare`` computes once from the training set.

    Attributes:
        blocks: ``((name, start, stop), ...)``: each block's columns in the features.
        inverses: ``{block: (F_b + damping_b I)^-1}`` ``[d_b, d_b]``; empty for
            ``curvature="identity"``.
        train_features: ``phi_i`` of every training example, or None (``cache_features=False``,
            or held factored in ``train_factors``).  # [n_train, d]
        plan: what the check of the capture plan on the first training batch of 2 or more
            examples decided (a plain softmax-CE MLP's: every layer flat, from its first
            batch, without the check's autodiff rows; ``factgrass_flat._all_flat``), as plain values
            (:class:`~dattri_fn.transforms.layer_grads.PlanDecisions`, as ``GradSimState`` and
            ``TRAKState`` hold them): ``score`` and ``self_score`` apply the decided plan without
            checking again. None: each of their streams checks its own first batch.
        train_factors: where every training example took the flat path (each captured layer a
            Linear/Conv1D at one position, no parameters outside them), each block's stage-1
            factors ``{block: (M_in^T [a, 1] [n_train, k_in'], M_out^T g [n_train, k_out'])}``
            instead of the features: ``k_in' + k_out'`` numbers per block and example instead of
            ``d_b``; ``phi_i = R^T vec(g'_i a'_i^T)`` is formed from them in fixed row spans
            (the same rows in ``prepare``'s Fisher and every ``score``), never all at once.
            Held where the features would take more than ``memory_budget() //
            factgrass._CACHE_SHARE`` bytes (2 MiB by default), else None and the features are
            cached; each ``score``, ``self_score`` and ``feature_rows`` call then re-forms the
            features (measured for ``score``: 3.4-5.2x the time of a score from cached
            features with 32 test rows, 1.3x with 1000). Data
            whose every part has one example (a loader of ``batch_size=1``, or
            ``chunk_size=1``) takes the flat path only on a plain softmax cross-entropy MLP
            (whose factors :func:`~dattri_fn.transforms.mlp_io.mlp_io` gives: no plan check);
            elsewhere the plan is checked on a part of 2 or more, and such data's features are
            cached.
        sketch: what the cached rows and the inverses depend on besides the blocks,
            ``(("seed", s), ("kind", k), ("mask_dim", k'), ("proj_dim", d), ("curvature", c),
            ("damping", lam))`` (``lam`` None for ``curvature="identity"``): ``score``,
            ``self_score`` and ``feature_rows`` refuse a state whose ``sketch`` differs from
            their factgrass's, by name. None (a state saved before stop 23): not checked.
        train_print: the print of the training rows in order
            (:func:`~dattri_fn.attribute.train_print.take`): ``score`` refuses other rows or
            another order for cached rows; None (saved before stop 28): counted only.  # [n]
    """

    blocks: tuple
    inverses: dict
    train_features: Tensor | None
    plan: PlanDecisions | None = None
    train_factors: dict | None = None
    sketch: tuple | None = None
    train_print: Tensor | None = None

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
    check_bridged(name, "model", model)  # its layers are captured with module and loss_fn
    check_eval(name, "model", model)  # train-mode Dropout: random gradients and factors
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

    cfg = _Config(name, model, plan, fingerprint, rows_min, curvature, damping, cache_features,
                  chunk_size, _SKETCH_BYTES,
                  partial(_sketch_for, _draw(plan, model.params, k1, proj_dim, kind, seed),
                          (plan, k1, proj_dim, kind, seed)),
                  # read here, when factgrass is called (a test may patch it by this module)
                  keep_tie_factors)

    def prepare(params, train) -> FactGraSSState:
        return _prepare(cfg, params, train)

    def score(params, state: FactGraSSState, train, test, *, top_k: int | None = None,
              largest: bool = True) -> Tensor | TopK:
        return _score(cfg, params, state, train, test, top_k=top_k, largest=largest)

    def self_score(params, state: FactGraSSState, train) -> Tensor:
        return _self_score(cfg, params, state, train)

    def feature_rows(params, state: FactGraSSState, start: int = 0,
                     stop: int | None = None) -> Tensor | None:
        """``phi`` of the cached examples ``start:stop``, from whichever form the state holds
        (the rows ``score`` uses, bit for bit; None: none cached).  # [stop - start, d]"""
        return _feature_rows(cfg, params, state, start, stop)

    prepare.feature_rows = feature_rows
    prepare = train_print.stamped(prepare, f"{name}.prepare")
    return Method(prepare, score, self_score, name)


def _draw(plan: LayerPlan, params: dict, k1: int, proj_dim: int, kind: str,
          seed: int) -> _Sketches:
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


def _sketch_for(drawn: _Sketches, how: tuple, params: dict) -> _Sketches:
    """``drawn`` (the sketches of the model's own parameters, drawn once) where ``params`` have
    its shapes, dtype and device; else those of ``params``, drawn for this call
    (``_draw(how[0], params, *how[1:])``)."""
    like, held = next(iter(params.values())), drawn.stage1
    if (_shapes(params) == drawn.key and like.dtype == held.dtype
            and like.device == held.device):
        return drawn
    return _draw(how[0], params, *how[1:])


def _prepare(cfg: _Config, params, train) -> FactGraSSState:
    """factgrass's ``prepare`` (see :func:`factgrass`)."""
    model, plan, rows_min, cache_features = cfg.model, cfg.plan, cfg.rows_min, cfg.cache_features
    curvature, damping = cfg.curvature, cfg.damping
    func = f"{cfg.name}.prepare"
    params = state_of(cfg, func, params)
    device = next(iter(params.values())).device
    sk = cfg.sketch_for(params)
    fn, held = feature_fn(cfg, params, sk, func, "train")
    blocks = _blocks_of(sk)
    width = blocks[-1][2]
    total = None  # the training set's rows where known before any pass: caches in place
    # merged_passes checks every batch (batch_size) before it merges: the passes are not again
    merged = rows_min is None and can_merge(train)
    if merged:
        # a list of batches in memory: fewer capture passes, each within the memory budget
        # and the bytes the pass before measured (the stage-1 sketches of a pass are formed
        # a bounded number of rows at a time)
        state = {**model.fixed, **params}
        weights = [state[plan.tapped.specs[n].weight] for n in plan.layers
                   if plan.tapped.specs[n].weight in state]
        total = count_rows(func, "train", train, check=False)  # merged_passes checks each
        # a plain MLP's first pass is bounded by its known bytes too (else ONE_PASS_ROWS rows)
        first_bytes = _plain_row_bytes(model, plan, state, train[0])
        passes = merged_passes(func, "train", train,
                               lambda b: capture_row_bytes(b, weights), memory_budget(),
                               measured=lambda fb=first_bytes: (fb if fn.held_bytes is None
                                                                else fn.held_bytes),
                               share=_PASS_SHARE)
    else:
        passes = iter_batches(func, "train", regrouped(func, "train", train, rows_min))
    fisher = curvature == "fisher"
    groups = _gram_groups(blocks)
    grams = dict.fromkeys(g[0] for g in groups)  # {(block, ...): [n_blocks, d, d]}

    def add_gram(phi: Tensor) -> None:
        for names, s, e, d in groups:
            gram = _group_gram(phi, s, e, d, blocks, names)
            grams[names] = gram if grams[names] is None else grams[names] + gram

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
        for s, c, b, like, sides, S in fn.pieces(box, merged):
            if store is not None and sides is not None:
                store.add(sides, c)
                continue
            if store is not None:
                done, store = store.value() if store.n else None, None
                if done is not None:
                    old = torch.cat([_factor_rows(sk, blocks, done, r0, r1)
                                     for r0, r1 in spans_of(cfg, sk, done)])
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
            for r0, r1 in spans_of(cfg, sk, factors):
                add_gram(_factor_rows(sk, blocks, factors, r0, r1))
    inverses = {} if not fisher else _inverses(
        func, grams, blocks, n, damping,
        lambda: _held_rows(sk, blocks, factors, buf, feats, n, cfg))
    checked = held()
    features = None if not cache_features or factors is not None else buf if (
        buf is not None) else feats[0] if len(feats) == 1 else torch.cat(feats)
    return FactGraSSState(blocks, inverses, features,
                          plan_decisions(checked) if checked.checked else None, factors,
                          cfg.fingerprint)


__all__ = ["FactGraSSState", "factgrass"]
