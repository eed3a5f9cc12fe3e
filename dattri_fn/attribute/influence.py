"""Influence functions with any inverse-curvature backend: one pipeline, the solver a parameter.

    scores[i, j] = g_i^T (C + damping I)^-1 g_j

with ``g = grad loss(params, z)`` and ``C`` the curvature of the MEAN training loss (the Hessian
by default; Gauss-Newton, empirical Fisher or K-FAC/EK-FAC on request). This is minus the
first-order change of test loss ``j`` when training example ``i`` is up-weighted
(Koh & Liang 2017, arXiv 1703.04730): positive = proponent. The curvature operator averages
over all training batches (never a sum of per-batch inverses); the inverse is applied to the
n_test test gradients once, and train gradients stream batch by batch.

Options beyond Koh & Liang: a list of checkpoints as ``params`` (the mean of the per-checkpoint
scores, each with its own curvature) and RelatIF's normalisations (``relatif="l"|"theta"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._types import LinOp, Loss, Params
from ..model import FunctionalModel
from .influence_config import (  # noqa: F401 (old import paths)
    CURVATURES,
    RELATIF,
    SOLVERS,
    InfluenceConfig,
    InfluenceEnsembleState,
    InfluenceState,
    _with_l2,
    influence_config,
)
from .influence_inverse import (  # noqa: F401 (old import paths)
    _CHECK_ROWS,
    AUTO_SKETCH_RHS_PER_RANK,
    SKETCH_SEED,
    _batched_train,
    _concat,
    _example,
    _factor_kinds,
    _independent,
    _same_losses,
    _sketched_cg,
)
from .influence_inverse import prepare as _prepare
from .influence_score import _Formed, _grad_rows, _relatif_scale  # noqa: F401
from .influence_score import score as _score
from .influence_score import self_score as _self_score
from .method import Method


def _model_keys(cfg) -> list[str] | None:
    """The model's parameter order when ``loss`` (or ``model``) is a FunctionalModel, else None."""
    model = cfg.plan.model if cfg.plan is not None else cfg.model
    return list(model.params) if isinstance(model, FunctionalModel) else None


def _in_order(keys: list[str] | None, params):
    """``params`` (a dict or a list of checkpoints) with the model's keys in the model's order.

    Each path forms its rows and inverses in ONE order: the plan's rows come in the model's
    order, vmap(grad) rows, dense curvatures and the captured path's ravel in the dict's. A dict
    holding exactly the model's keys in another order is reordered here, at the public boundary,
    so every path scores it as the model-ordered dict (the same computation); any other dict
    is passed on as given, for the usual errors.
    """
    if keys is None:
        return params

    def one(p):
        if isinstance(p, dict) and list(p) != keys and sorted(p, key=str) == sorted(keys):
            return {k: p[k] for k in keys}
        return p

    if isinstance(params, dict):
        return one(params)
    if isinstance(params, (list, tuple)):
        return type(params)(one(p) for p in params)
    return params


def influence(loss: Loss | FunctionalModel, *, solver: str = "cg", damping: float = 1e-3,
              curvature: str | Callable[[Params, Any], LinOp] | None = None,
              target: Loss | FunctionalModel | None = None, model=None, l2: float = 0.0,
              chunk_size: int | None = None, batch_rows: int | None = None,
              relatif: str | None = None, per_layer: bool = False, **solver_options) -> Method:
    """Return the influence-function method with the given inverse-curvature backend.

    ``params`` may be one params dict or a list of checkpoints (an ensemble: independently
    trained models or one run's checkpoints, same keys and shapes): ``prepare`` builds one
    inverse per checkpoint (an :class:`InfluenceEnsembleState`) and ``score``/``self_score``
    return the MEAN of the per-checkpoint scores, ``(1/C) sum_c g_i(c)^T (C_c + damping I)^-1
    g_j(c)``, streamed as one product over concatenated per-checkpoint features (``top_k``
    ranks the mean).

    Args:
        loss: per-example loss ``loss(params, example) -> Tensor[]``, or a FunctionalModel
            (its ``loss``; its Linear layers' per-example gradients then come from one batched
            backward instead of ``vmap(grad)``: same scores, less time; it is also ``model``).
            With no BatchNorm or dropout in training mode, its ``"hessian"`` products (LiSSA's
            mini-batches, CG/MINRES/Arnoldi, the dense fallback of ``explicit``) linearise the
            batch's summed loss from ONE forward (:func:`~dattri_fn.model.batched_loss`)
            instead of ``vmap`` over its examples, once the batched and per-example losses agree
            on the first 3 training examples (else ``vmap``): the same ``H`` to rounding (1e-12
            relative in float64; bit for bit on digits-lr).
        solver: one of ``explicit, cg, minres, lissa, arnoldi, datainf, kfac, ekfac`` (``minres``:
            symmetric indefinite systems, e.g. the Hessian, see
            :func:`~dattri_fn.solve.ihvp_minres`), or a configured
            value from :mod:`dattri_fn.solvers` (``solvers.cg(max_iter=100, M="ekfac")``).
        damping: absolute damping added to the curvature, > 0 (the curvature of a non-convex
            model is indefinite; see each solver's rule for non-positive directions: by
            default they are dropped or stopped at, and ``method="lu"`` (explicit),
            ``negative_curvature="continue"`` (CG) and ``keep="all"`` (Arnoldi) invert them
            literally).
        curvature: ``"gauss_newton"`` (the default for a FunctionalModel: positive
            semi-definite, the Hessian for GLMs; built by
            :func:`~dattri_fn.operators.gauss_newton`, which picks the factored product for
            Linear-only models and the closed-form cross-entropy output Hessian; with ``l2``
            it is ``G + 2 l2 I``), ``"hessian"`` (the default for a plain loss), ``"fisher"``
            (empirical Fisher), or a callable ``(params, train) -> LinOp``.
            Ignored by ``datainf`` (per-layer empirical Fisher) and ``kfac``/``ekfac``.
            ``explicit`` with ``"hessian"`` and a FunctionalModel (default unpack) whose params
            are all Linear weights/biases builds the dense matrix from per-layer factors
            (:func:`~dattri_fn.operators.linear_curvature.linear_hessian`, within its limits: the same
            matrix, ~5x faster on the digits MLP), and from ``P`` Hessian-vector products
            otherwise. The other solvers' ``"hessian"`` on a FunctionalModel affine in its
            params (one Linear layer, nothing after it: logistic/softmax regression) is the
            Gauss-Newton from cached factors, which there IS the Hessian
            (:func:`~dattri_fn.operators.linear_glm.glm_hessian`: CG 4x, LiSSA 8x faster on
            digits-lr). LiSSA on the Gauss-Newton (or that Hessian) builds one factored
            operator on all the training data and draws its mini-batches' curvatures as row
            subsets of it (the same draws as before; a model whose batched losses differ from
            the per-example ones, e.g. one that mixes the batch, keeps per-batch products).
        model: the :class:`~dattri_fn.model.FunctionalModel` the loss came from; required by
            ``kfac``/``ekfac`` (they capture the module's Linear, Conv1D and Conv2d layers:
            :mod:`dattri_fn.transforms.capture`, no trace, no hooks; a weight tied between an
            Embedding and a Linear, GPT-2's ``wte`` = ``lm_head``, is one pooled layer whose
            EK-FAC ``Lambda`` comes from the summed gradient of both uses,
            :mod:`dattri_fn.operators.kfac_tied`); defaults to ``loss`` when that is a
            FunctionalModel. The capture is built at each ``prepare`` (one for
            all its checkpoints) and held in the state (:class:`InfluenceState` ``.tap``),
            never cached by the method; ``score`` takes both sides' gradients from it (no
            layer-gradient plan check; params in the inverse's diagonal block by autodiff, as
            on the training side) unless a ``target`` or a tied weight need the plan's test
            side. The factor pass checks each layer's captured per-example gradients against
            autodiff once (its first chunk's first 2 rows, :mod:`~dattri_fn.operators.kfac_check`):
            a layer that disagrees (applied to a sequence-first ``[S, B, d]`` tensor with ``S =
            B``, or to one that mixes the batch) takes the diagonal block, named in its warning.
        l2: the training objective is ``loss + l2 |params|^2`` (weight decay ``wd`` is
            ``l2 = wd / 2``), >= 0: train gradients gain ``2 l2 params``; ``"hessian"`` is
            then ``H + 2 l2 I`` and ``"fisher"`` the empirical Fisher of the regularised
            gradients ``E[(g_i + 2 l2 p)(g_i + 2 l2 p)^T]`` (not ``F + 2 l2 I``: add that as
            ``damping``); the test side stays ``target`` (default: ``loss`` WITHOUT the
            ``l2`` term).
        chunk_size: examples per per-sample-gradient call and rows per HVP call.
        batch_rows: merge consecutive batches of ``train`` (and ``test``) into calls of at
            least this many examples: per-example gradients, the ``"hessian"``/``"fisher"``
            curvature and K-FAC/EK-FAC's passes. Same scores; fewer, larger calls (each has a
            fixed cost of ~0.3-2 ms on one CPU thread), memory ``batch_rows x P``.
        **solver_options: forwarded to the solver (``max_iter``, ``rtol``, ``rank``, ``scale``,
            ``depth``, ``repeats``, ``batch_size``, ``seed``...). CG also takes ``M``:
            ``"auto"`` (not given): on the Gauss-Newton, block CG
            (:func:`~dattri_fn.solve.block_cg.ihvp_block_cg`: a call's rows share one Krylov
            space, 6 steps for 200 rows where plain CG took 55 on the 9.6k-parameter MLP;
            a row's value depends on the rows solved with it only within ``rtol``), falling
            back to plain CG with a warning where the Gauss-Newton is not positive definite
            (a loss not convex in the outputs); plain CG for other curvatures;
            ``None``: plain CG; a preconditioner LinOp, ``"nystrom"`` (a randomized rank-200
            sketch of the curvature itself, built at the first solve,
            :func:`~dattri_fn.solve.nystrom.nystrom_preconditioner`), or
            ``"kfac"``/``"ekfac"`` (or ``solvers.kfac/ekfac(fisher=...)`` values carrying the
            factors' settings, e.g. ``fisher="expected"``) to build ``(F + damping I)^-1``
            from the model's layers on the same training data. It saves iterations only where
            it approximates the curvature: on the digits MLPs no K-FAC/EK-FAC factors (of the
            empirical, true or expected Fisher) preconditioned the Gauss-Newton, while
            ``"nystrom"`` halved the iterations and the time (benchmarks/RESULTS.md).
            ``kfac``/``ekfac`` take ``fisher="true"`` and ``seed`` (targets drawn from the
            model, kronfluence's default) or ``fisher="expected"`` (the exact expectation over
            the model's outputs: the Gauss-Newton's layer blocks); see
            :func:`~dattri_fn.operators.kfac.kfac_factors`. ``fisher="true"`` draws with
            ``sampler=`` (or ``loss_fn.sample``, or the library's for softmax and one-logit
            binary cross-entropy); on another loss it is refused at construction. A keyword the
            chosen solver does not take is refused at construction, naming the ones it takes.
        target: test-side function ``target(params, example) -> Tensor[]`` whose DECREASE a
            positive score predicts, or a FunctionalModel (its ``loss``, batched Linear
            gradients); default: ``loss`` (e.g. pass minus a margin).
        relatif: None (plain influence) or RelatIF's normalisation of each training row
            (Barshan et al. 2020): ``"l"`` divides ``s_ij`` by ``sqrt|g_i^T (C + damping I)^-1
            g_i|`` (the train example's own influence on its loss; the absolute value keeps it
            real where the curvature is indefinite), ``"theta"`` by ``|(C + damping I)^-1
            g_i|`` (the length of its parameter change). A zero denominator scores 0.
            ``prepare`` computes the denominators once, one inverse application per training
            batch, and keeps ``1 / n_i`` in the state (``row_scale``, ``[n_train]``, in the
            order of ``train``): ``score`` then costs one plain influence pass and refuses a
            ``train`` of another row count (score the training set the state was prepared
            on). Given precomputed factors or a store as ``train``, the denominators come from
            one more inverse application per training batch instead. ``self_score`` stays the
            diagonal of ``score`` (with ``"l"`` and the default target it is ``sqrt|g_i^T (C
            + damping I)^-1 g_i|``). With a list of checkpoints each checkpoint's scores are
            normalised with its own curvature, then averaged.
        query_rank: ``kfac``/``ekfac`` on a FunctionalModel only (a solver option, also of
            ``solvers.kfac/ekfac(query_rank=r)``): ``score`` replaces each layer's preconditioned
            test block ``[out, in(+1)]`` by its rank-``r`` SVD truncation where ``min(out,
            in(+1)) > r`` (kronfluence's ``query_gradient_low_rank``, with the exact SVD), so a
            layer costs ``r (out + in)`` per training token and test row instead of ``out *
            in``; ``self_score`` stays exact (as kronfluence's).
        per_layer: ``kfac``/``ekfac`` only: ``score`` returns ``{layer: [n_train, n_test]}``,
            each layer's share ``<DW_il, (F_l + damping I)^-1 DW_jl>`` of the block-diagonal
            inverse (kronfluence's per-module scores; with ``l2`` each layer's share of the
            ``2 l2 params`` term too); their sum is the plain score. ``top_k`` is refused
            (rank the sum, or one layer's matrix, yourself); ``self_score`` stays the total.

    Scoring with ``kfac``/``ekfac`` on a FunctionalModel (``loss`` is the model) goes layer by
    layer: each test gradient is preconditioned once, and every training batch's captured layer
    inputs ``a`` and output gradients ``g`` meet its layer blocks ``M_j`` as ``sum_t g_t^T M_j
    a_t`` (:func:`~dattri_fn.operators.kfac.layer_scores`): no ``[batch, P]`` gradient matrix,
    at most one layer's ``[rows, out, in]`` blocks (the same scores, to rounding). RelatIF, a
    FeatureStore or StoreRecording as ``train`` and a plain ``loss`` take the raveled path.
    ``prepare(params, factors)`` takes precomputed :class:`~dattri_fn.operators.kfac.KFACFactors`
    (``kfac``) or :class:`~dattri_fn.operators.kfac.EKFACFactors` (``ekfac``) in place of the
    training data (e.g. from :func:`dattri_fn.io.load` or :func:`dattri_fn.store.stats_store`),
    a sequence of them for a list of checkpoints: the factor passes are skipped. ``dtype``
    (a solver option, e.g. ``torch.bfloat16``) stores the factors in that dtype and takes the
    layer-by-layer score products in it.

    Returns:
        ``Method(prepare, score, self_score)``; scores ``[n_train, n_test]``.

    References:
        Koh & Liang 2017 (arXiv 1703.04730); Schioppa et al. 2022 (Arnoldi, arXiv 2112.03052);
        Agarwal et al. 2017 (LiSSA, arXiv 1602.03943); Kwon et al. 2023 (DataInf, arXiv
        2310.00902); George et al. 2018 (EK-FAC, arXiv 1806.03884); Grosse et al. 2023
        (arXiv 2308.03296); Barshan, Brunet & Dziugaite 2020 (RelatIF, arXiv 2003.11630).
    """
    cfg = influence_config(loss, solver=solver, damping=damping, curvature=curvature,
                           target=target, model=model, l2=l2, chunk_size=chunk_size,
                           batch_rows=batch_rows, relatif=relatif, per_layer=per_layer,
                           solver_options=solver_options)

    def prepare(params, train) -> InfluenceState | InfluenceEnsembleState:
        return _prepare(cfg, _in_order(_model_keys(cfg), params), train)

    def score(params, state, train, test, *, top_k: int | None = None, largest: bool = True):
        return _score(cfg, _in_order(_model_keys(cfg), params), state, train, test, top_k=top_k,
                      largest=largest)

    def self_score(params, state, train):
        return _self_score(cfg, _in_order(_model_keys(cfg), params), state, train)

    return Method(prepare, score, self_score, cfg.name)
