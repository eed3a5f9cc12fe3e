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

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from .._checks import (
    _msg,
    batch_size,
    batch_slice,
    batch_to,
    blame_data,
    check_int,
    check_optional_int,
    check_params,
    check_positive,
    iter_batches,
    peek,
    regrouped,
)
from .._types import LinOp, Loss, Params
from ..model import FunctionalModel, default_unpack
from ..operators import kfac
from ..operators.curvature import fvp, hvp
from ..operators.linear_curvature import FactoredCurvatureError, linear_hessian, linear_tap
from ..transforms.layers import output_shapes, streamed_io
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
    _with_l2,
)
from .influence_score import _Formed, _grad_rows, _relatif_scale
from .method import Method, check_checkpoints, device_of, loss_and_plan
from .pipeline import collect, in_chunks, stream_scores, stream_self

RELATIF = ("l", "theta")
SOLVERS = ("explicit", "cg", "minres", "lissa", "arnoldi", "datainf", "kfac", "ekfac")
CURVATURES = ("gauss_newton", "hessian", "fisher")


class InfluenceState(NamedTuple):
    """``ihvp``: the inverse operator ``V -> (C + damping I)^-1 V``; ``factors``: the tensors it
    was built from (eigenpairs, a Cholesky factor, K-FAC factors...) or ``None`` for
    matrix-free solvers."""

    ihvp: LinOp
    factors: Any


class InfluenceEnsembleState(NamedTuple):
    """``states``: one :class:`InfluenceState` per checkpoint, in the order of the params list
    given to ``prepare`` (each checkpoint has its own curvature and inverse)."""

    states: tuple[InfluenceState, ...]


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
            otherwise.
        model: the :class:`~dattri_fn.model.FunctionalModel` the loss came from; required by
            ``kfac``/``ekfac`` (they capture the module's Linear, Conv1D and Conv2d layers:
            :mod:`dattri_fn.transforms.capture`, no trace, no hooks); defaults to ``loss``
            when that is a FunctionalModel. The capture is built on the first ``prepare`` and
            rebuilt when the params' keys or the module's submodules change.
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
            ``"auto"`` (not given): on the Gauss-Newton, plain CG until a call solves ``k >=
            r / 16`` rows (``score``'s ``n_test``, ``self_score``'s or RelatIF's train batch),
            which builds ``"nystrom"`` with ``r = min(200, P)``, seed 0, used from then on, if
            its ``5 r P`` entries fit :func:`~dattri_fn.operators.gauss_newton.memory_budget`
            (it paid from 11-12 rows on the digits MLPs); plain CG for other curvatures;
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
            :func:`~dattri_fn.operators.kfac.kfac_factors`.
        target: test-side function ``target(params, example) -> Tensor[]`` whose DECREASE a
            positive score predicts, or a FunctionalModel (its ``loss``, batched Linear
            gradients); default: ``loss`` (e.g. pass minus a margin).
        relatif: None (plain influence) or RelatIF's normalisation of each training row
            (Barshan et al. 2020): ``"l"`` divides ``s_ij`` by ``sqrt|g_i^T (C + damping I)^-1
            g_i|`` (the train example's own influence on its loss; the absolute value keeps it
            real where the curvature is indefinite), ``"theta"`` by ``|(C + damping I)^-1
            g_i|`` (the length of its parameter change). A zero denominator scores 0. The
            denominators take one more inverse application per training batch at every
            ``score``/``self_score``; ``self_score`` stays the diagonal of ``score`` (with
            ``"l"`` and the default target it is ``sqrt|g_i^T (C + damping I)^-1 g_i|``).
            With a list of checkpoints each checkpoint's scores are normalised with its own
            curvature, then averaged.
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
    from ..solvers import Solver

    if isinstance(solver, Solver):  # a configured value: its settings are the solver options
        clash = sorted(set(solver.options) & set(solver_options))
        if clash:
            raise ValueError(f"influence(solver=...): settings {clash} given both in the solver "
                             "value and as keywords; give them once.")
        solver_options = {**solver.options, **solver_options}
        solver = solver.name
    if solver not in SOLVERS:
        raise ValueError(f"influence(solver=...): expected one of {list(SOLVERS)} or a "
                         f"dattri_fn.solvers value, got {solver!r}.")
    solver_options = dict(solver_options)
    query_rank = solver_options.pop("query_rank", None)
    if query_rank is not None:
        check_int("influence", "query_rank", query_rank)
        if solver not in ("kfac", "ekfac"):
            raise ValueError(f"influence(query_rank=...): expected solver 'kfac' or 'ekfac' "
                             f"(per-layer test blocks), got query_rank={query_rank} with "
                             f"solver={solver!r}.")
    check_positive("influence", "damping", damping)
    if relatif is not None and relatif not in RELATIF:
        raise ValueError(f"influence(relatif=...): expected None, 'l' or 'theta', got {relatif!r}.")
    if not isinstance(per_layer, bool):
        raise TypeError(f"influence(per_layer=...): expected a bool, got {type(per_layer).__name__}.")
    if per_layer and solver not in ("kfac", "ekfac"):
        raise ValueError(f"influence(per_layer=...): expected solver 'kfac' or 'ekfac' (a "
                         f"block-diagonal inverse), got per_layer=True with solver={solver!r}.")
    if per_layer and relatif is not None:
        raise ValueError(f"influence(per_layer=...): expected relatif=None with per-layer scores, "
                         f"got relatif={relatif!r}.")
    if curvature is None:
        curvature = ("gauss_newton" if isinstance(loss, FunctionalModel)
                     and loss.loss_fn is not None else "hessian")
    if (isinstance(curvature, str) and curvature not in CURVATURES) or not (
            isinstance(curvature, str) or callable(curvature)):
        raise ValueError(f"influence(curvature=...): expected one of {list(CURVATURES)} or a "
                         f"callable (params, train) -> LinOp, got {curvature!r}.")
    given_m = solver_options.pop("M", "auto")
    if given_m != "auto":
        solver_options["M"] = given_m
    # fast by default: CG on the (positive semi-definite) Gauss-Newton sketches it for M
    auto_sketch = solver == "cg" and curvature == "gauss_newton" and given_m == "auto"
    if curvature == "gauss_newton":
        if not (isinstance(loss, FunctionalModel) and loss.loss_fn is not None):
            raise ValueError("influence(curvature=...): expected 'hessian', 'fisher' or a "
                             "callable for a plain loss, got 'gauss_newton' (it needs the "
                             "model's output: pass functional_model(module, loss_fn) as loss).")
        from ..operators import gauss_newton

        # G of the regularised objective is G + 2 l2 I: every solver adds damping the same way.
        curvature, damping = gauss_newton(loss, batch_rows=batch_rows), damping + 2 * l2
    check_positive("influence", "l2", l2, allow_zero=True)
    rows = check_optional_int("influence", "batch_rows", batch_rows)
    base, plan = loss_and_plan("influence", "loss", loss)
    test_fn, plan_t = (base, plan) if target is None else loss_and_plan("influence", "target",
                                                                        target)
    if model is None and isinstance(loss, FunctionalModel):
        model = loss
    train_fn = _with_l2(base, l2)
    # K-FAC/EK-FAC inverses are block-diagonal over the model's captured layers: the training
    # side is then scored layer by layer from captured (a, g), never as [B, P] rows.
    layered = (solver in ("kfac", "ekfac") and isinstance(loss, FunctionalModel)
               and loss.loss_fn is not None and (model is None or model is loss)
               and relatif is None)
    if per_layer and not layered:
        raise ValueError("influence(per_layer=...): expected loss to be the FunctionalModel "
                         "itself (its layers are scored one by one), got a plain loss or "
                         "another model.")
    if query_rank is not None and not layered:
        raise ValueError("influence(query_rank=...): expected loss to be the FunctionalModel "
                         "itself and relatif=None (test blocks are truncated layer by layer), "
                         "got a plain loss, another model or RelatIF.")
    score_dtype = solver_options.get("dtype") if solver in ("kfac", "ekfac") else None
    if solver in ("kfac", "ekfac") and (model is None or model.loss_fn is None):
        raise ValueError(f"influence(model=...): solver {solver!r} needs the FunctionalModel "
                         "(with its loss_fn) that the loss came from, got None.")
    precondition = solver_options.get("M") if isinstance(solver_options.get("M"), str) else None
    precondition_options: dict = {}
    if isinstance(solver_options.get("M"), Solver) and solver_options["M"].name in ("kfac",
                                                                                    "ekfac"):
        # solvers.ekfac(fisher="expected"): the factors' settings of the preconditioner
        precondition, precondition_options = solver_options["M"].name, solver_options["M"].options
        if "query_rank" in precondition_options:
            raise ValueError("influence(M=...): expected factor settings only, got query_rank "
                             "(a scoring option) in the preconditioner.")
    force_sketch = precondition == "nystrom" and solver == "cg"
    if force_sketch:  # built by _sketched_cg from the curvature, named as this method
        precondition = None
        del solver_options["M"]
    if precondition is not None:
        if solver != "cg" or precondition not in ("kfac", "ekfac"):
            raise ValueError(f"influence(M=...): expected 'nystrom', 'kfac' or 'ekfac' with "
                             f"solver='cg' (or a LinOp), got {precondition!r} with "
                             f"solver={solver!r}.")
        if model is None or model.loss_fn is None:
            raise ValueError(f"influence(M=...): {precondition!r} needs the FunctionalModel "
                             "(with its loss_fn) that the loss came from, got None.")
    name = f"if_{solver}"
    def grads(params: Params, test: bool = False):
        # Params are validated here, once per public call; batches by collect/stream_*.
        check_params(name, "params", params)
        fn_plan = plan_t if test else plan
        if fn_plan is not None and list(params) != list(fn_plan.model.params):
            raise ValueError(f"{name}(params=...): expected the keys of the model's params "
                             f"in this order {list(fn_plan.model.params)}, got {list(params)}.")
        rows = (_grad_rows(test_fn, plan_t, 0.0, params) if test
                else _grad_rows(train_fn if plan is None else base, plan, l2, params))
        return in_chunks(rows, chunk_size)

    taps: dict = {}  # K-FAC's captured forward, built on the first prepare and reused
    factored = (solver == "explicit" and curvature == "hessian"
                and isinstance(loss, FunctionalModel) and loss.loss_fn is not None
                and loss.unpack in (None, default_unpack))

    def dense_hessian(params, train):
        """``H + 2 l2 I`` from per-layer factors, or None for a model outside their limits."""
        key = (tuple(params), tuple(map(id, loss.module.modules())))
        if key not in taps:
            taps.clear()
            try:
                taps[key] = linear_tap(loss.module, params)
            except ValueError:
                taps[key] = None
        if taps[key] is None:
            return None
        try:
            H = linear_hessian(loss.module, loss.loss_fn, params, train, chunk_size=chunk_size,
                               tapped=taps[key], batch_rows=rows)
        except FactoredCurvatureError:
            taps[key] = None
            return None
        H.diagonal().add_(2 * l2)
        return H

    def curvature_op(params, train) -> LinOp:
        if callable(curvature):
            return curvature(params, train)
        if factored:
            H = dense_hessian(params, train)
            if H is not None:
                return H
        if curvature == "hessian":
            return hvp(train_fn, params, train, chunk_size=chunk_size, batch_rows=rows,
                       batched=batched_for(params, peek(iter_batches(name, "train", train))))
        return fvp(train_fn, params, train, chunk_size=chunk_size, batch_rows=rows)

    def batched_for(params: Params, first):
        """The training objective from one forward per batch where that is exact (``loss`` is
        a FunctionalModel whose examples do not interact and whose batched losses match the
        per-example ones on ``first``), else None (``vmap`` over the examples)."""
        if not (isinstance(loss, FunctionalModel) and loss.loss_fn is not None
                and _independent(loss)):
            return None
        fn = _batched_train(loss, l2)
        return fn if _same_losses(train_fn, fn, params, batch_to(first, device_of(params))) \
            else None

    def factored_inverse(kind: str, params: Params, train) -> LinOp:
        """``(F_kfac + damping I)^-1`` (or EK-FAC's) of the model's layers on ``train``."""
        key = (tuple(params), tuple(map(id, model.module.modules())))
        if key not in taps:
            taps.clear()
            taps[key] = kfac.kfac_tap(model.module, params)
        fit = kfac.kfac_factors if kind == "kfac" else kfac.ekfac_factors
        inverse = kfac.ihvp_kfac if kind == "kfac" else kfac.ihvp_ekfac
        factors = fit(model.module, model.loss_fn, params, train, chunk_size=chunk_size,
                      tapped=taps[key], batch_rows=rows, **precondition_options)
        return inverse(factors, damping=damping)

    def checkpoints(params) -> list[Params] | None:
        """The list of checkpoints (validated alike), or None for one params dict."""
        if isinstance(params, dict):
            return None
        if not isinstance(params, Sequence) or isinstance(params, (str, bytes)):
            raise TypeError(f"{name}(params=...): expected a params dict or a non-empty list of "
                            f"them (checkpoints), got {type(params).__name__}.")
        check_checkpoints(name, list(params))  # same keys and shapes, or an error naming one
        return list(params)

    def given_factors(train, n: int) -> list | None:
        """Precomputed K-FAC/EK-FAC factors given as ``train`` (one per checkpoint), or None."""
        every = (kfac.KFACFactors, kfac.EKFACFactors)
        if solver not in ("kfac", "ekfac"):
            return None
        many = isinstance(train, (list, tuple)) and not isinstance(train, every) and train \
            and all(isinstance(f, every) for f in train)
        if not (isinstance(train, every) or many):
            return None
        got = list(train) if many else [train]
        kind = _factor_kinds(solver)[0]
        for f in got:
            if not isinstance(f, kind):
                raise TypeError(_msg(name, "train", f"training data or {kind.__name__} (solver "
                                     f"{solver!r})", type(f).__name__))
        if len(got) != n:
            raise ValueError(_msg(name, "train", f"{n} factors (one per checkpoint)",
                                  f"{len(got)}"))
        return got

    def from_factors(params: Params, factors) -> InfluenceState:
        """The state of ``factors`` for ``params`` (same parameter names, order and sizes)."""
        if tuple(factors.param_names) != tuple(params):
            raise ValueError(_msg(name, "train", f"factors of the params {list(params)}",
                                  f"factors of {list(factors.param_names)}",
                                  "Compute the factors for these params (same keys, same order)."))
        inverse_fn = kfac.ihvp_kfac if solver == "kfac" else kfac.ihvp_ekfac
        state = InfluenceState(inverse_fn(factors, damping=damping), factors)
        P = sum(v.numel() for v in params.values())
        if state.ihvp.dim != P:
            raise ValueError(_msg(name, "train", f"factors of layers with P = {P} parameters",
                                  f"P = {state.ihvp.dim}"))
        return state

    def prepare(params, train) -> InfluenceState | InfluenceEnsembleState:
        ckpts = checkpoints(params)
        factors = given_factors(train, 1 if ckpts is None else len(ckpts))
        if factors is not None:
            if ckpts is None:
                return from_factors(check_params(name, "params", params), factors[0])
            return InfluenceEnsembleState(tuple(from_factors(p, f)
                                                for p, f in zip(ckpts, factors, strict=True)))
        train = iter_batches(name, "train", train)  # errors name train, not an inner call
        first = peek(train)
        if first is None:
            raise ValueError(_msg(name, "train", "at least one batch", "an empty iterable"))
        with blame_data(name, "train", first):
            if ckpts is None:
                return build(params, train)
            return InfluenceEnsembleState(tuple(build(p, train) for p in ckpts))

    def build(params: Params, train) -> InfluenceState:
        """The state of ``solver`` on validated ``train`` (see ``prepare``)."""
        from .. import solve
        from ..operators import datainf

        check_params(name, "params", params)  # named here, not by the first inner transform
        if model is not None:
            for k, v in params.items():
                want = model.params.get(k)
                if want is not None and v.shape != want.shape:
                    raise ValueError(_msg(name, "params", f"the model's shape "
                                          f"{list(want.shape)} at key {k!r}", list(v.shape)))

        if solver == "explicit":
            inv = solve.ihvp_explicit(curvature_op(params, train), damping=damping,
                                      **solver_options)
            # eigenpairs (eigh path), the Cholesky factor L of C + damping I (SPD fast path)
            # or its (LU, pivots) (method="lu")
            return InfluenceState(inv, inv.eigen if isinstance(inv, solve.EigenInverse)
                                  else inv.factor)
        if solver == "cg":
            opts = dict(solver_options)
            if precondition is not None:  # M ~ (C + damping I)^-1 from the same training data
                opts["M"] = factored_inverse(precondition, params, train)
            C = curvature_op(params, train)
            if auto_sketch or force_sketch:
                return InfluenceState(_sketched_cg(name, C, damping, opts, always=force_sketch),
                                      None)
            return InfluenceState(solve.ihvp_cg(C, damping=damping, **opts), None)
        if solver == "minres":
            return InfluenceState(solve.ihvp_minres(curvature_op(params, train), damping=damping,
                                                    **solver_options), None)
        if solver == "arnoldi":
            inv = solve.ihvp_arnoldi(curvature_op(params, train), damping=damping,
                                     **solver_options)
            return InfluenceState(inv, getattr(inv, "eigen", None))
        if solver == "lissa":
            if callable(curvature):
                batch_op = lambda b: curvature(params, b)
            else:
                data = _concat(train)
                batched = batched_for(params, data) if curvature == "hessian" else None
                build = hvp if curvature == "hessian" else fvp
                opts = {"batched": batched} if batched is not None else {}
                batch_op = lambda b: build(train_fn, params, b, chunk_size=chunk_size, **opts)
                return InfluenceState(solve.ihvp_lissa(batch_op, data, damping=damping,
                                                       **solver_options), None)
            return InfluenceState(solve.ihvp_lissa(batch_op, _concat(train), damping=damping,
                                                   **solver_options), None)
        if solver == "datainf":
            from ..tree import block_slices

            G = collect(grads(params), regrouped(name, "train", train, rows),
                        device=device_of(params), func=name, arg="train")
            inv = datainf.ihvp_datainf(G, damping=damping, blocks=block_slices(params),
                                     **solver_options)
            return InfluenceState(inv, None)
        factor_fn = kfac.kfac_factors if solver == "kfac" else kfac.ekfac_factors
        inverse_fn = kfac.ihvp_kfac if solver == "kfac" else kfac.ihvp_ekfac
        # Re-trace when the params or the module's submodules (swapped in place) change.
        key = (tuple(params), tuple(map(id, model.module.modules())))
        if key not in taps:
            taps.clear()
            taps[key] = kfac.kfac_tap(model.module, params, layers=solver_options.get("layers"))
        factors = factor_fn(model.module, model.loss_fn, params, train, chunk_size=chunk_size,
                            tapped=taps[key], batch_rows=rows, **solver_options)
        return InfluenceState(inverse_fn(factors, damping=damping), factors)

    def _check_state(state, params):
        if not isinstance(state, InfluenceState):
            raise TypeError(f"{name}(state=...): expected the InfluenceState returned by "
                            f"prepare, got {type(state).__name__}.")
        P = sum(v.numel() for v in check_params(name, "params", params).values())
        if P != state.ihvp.dim:
            raise ValueError(f"{name}(params=...): expected params of the model the state was "
                             f"prepared with (P = {state.ihvp.dim}), got P = {P}. Prepare the "
                             f"state with these params.")

    def pairs(params, state) -> list[tuple[Params, InfluenceState]]:
        """``[(params_c, state_c)]`` for one checkpoint or an ensemble, checked against each
        other."""
        ckpts = checkpoints(params)
        if ckpts is None:
            if isinstance(state, InfluenceEnsembleState):
                raise TypeError(f"{name}(params=...): expected the list of "
                                f"{len(state.states)} checkpoints the InfluenceEnsembleState "
                                "was prepared with, got one params dict.")
            _check_state(state, params)
            return [(params, state)]
        if not isinstance(state, InfluenceEnsembleState):
            raise TypeError(f"{name}(state=...): expected the InfluenceEnsembleState that "
                            f"prepare returns for a list of checkpoints, got "
                            f"{type(state).__name__}.")
        if len(state.states) != len(ckpts):
            raise ValueError(f"{name}(params=...): expected the {len(state.states)} "
                             f"checkpoints the state was prepared with, got {len(ckpts)}.")
        for p, st in zip(ckpts, state.states, strict=True):
            _check_state(st, p)
        return list(zip(ckpts, state.states, strict=True))

    def train_side(ps):
        """``batch -> [B, C P]``: per checkpoint ``g_i / C`` (RelatIF: also ``/ n_i``)."""
        fns = [(grads(p), st.ihvp) for p, st in ps]
        weight = 1.0 / len(ps)

        def rows(b):
            parts = []
            for g, ihvp in fns:
                G = g(b)
                if relatif is not None:  # one more inverse application, RelatIF's only
                    G = G * _relatif_scale(relatif, G, ihvp(G))[:, None]
                parts.append(G if len(fns) == 1 else G * weight)
            return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

        return rows

    def test_side(ps):
        """``batch -> [B, C P]``: per checkpoint ``(C_c + damping I)^-1 g_j``."""
        fns = [(grads(p, test=True), st.ihvp) for p, st in ps]

        def rows(b):
            parts = [ihvp(g(b)) for g, ihvp in fns]
            return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

        return rows

    score_taps: dict = {}  # the scoring side's captured forward, per params keys and layers

    def layer_pass(p: Params, op, batch, step) -> None:
        """``step(layer, a, g)`` for the layers ``op`` covers, each as its ``g`` arrives in
        batched backward passes of ``chunk_size`` rows (one layer's ``g`` alive at a time)."""
        layers = list(op.eigen[0])
        key = (tuple(p), tuple(layers), tuple(map(id, model.module.modules())))
        if key not in score_taps:
            score_taps.clear()
            score_taps[key] = kfac.kfac_tap(model.module, p, layers=layers)
        tapped = score_taps[key]
        state = {**model.fixed, **p}
        like = next(iter(p.values()))
        unpack = model.unpack or default_unpack
        n = batch_size(name, "train", batch)
        size = n if chunk_size is None else chunk_size
        for start in range(0, n, size):
            args, kwargs, target = unpack(batch_slice(batch, start, start + size))
            shapes = output_shapes(tapped, state, args, kwargs, like)
            streamed_io(tapped, model.loss_fn, state, args, kwargs, target, shapes, like,
                        lambda layer, a, g, start=start: step(start, layer, a, g))

    def layer_side(ps, test_f):
        """``batch -> [B, n]`` (``[B, L n]`` per layer) scores against ``test_f`` (``[n, C
        P]``), layer by layer (:func:`~dattri_fn.operators.kfac.layer_scores`) as each layer's
        ``g`` arrives: no ``[B, P]`` gradient matrix."""
        sizes = [st.ihvp.dim for _, st in ps]
        offsets = [sum(sizes[:c]) for c in range(len(ps))]
        blocks = [st.ihvp.blocks(test_f[:, o:o + P]) for (_, st), o, P in zip(ps, offsets, sizes,
                                                                               strict=True)]
        if query_rank is not None:  # kronfluence's low-rank query gradients
            blocks = [kfac.low_rank_blocks(bl, query_rank) for bl in blocks]
        dense = lambda bl: bl[0] @ bl[1] if isinstance(bl, tuple) else bl  # noqa: E731
        # the l2 term 2 l2 <params, p_j> of every train row, split by layer
        extra = [{layer: (dense(bl) * sb).sum((1, 2)) for (layer, bl), sb in
                  zip(blocks[c].items(), st.ihvp.blocks(2 * l2 * torch.cat(
                      [v.reshape(-1) for v in p.values()])[None]).values(), strict=True)}
                 if l2 else None for c, (p, st) in enumerate(ps)]
        weight = 1.0 / len(ps)

        def rows_of(b):
            parts: dict[str, dict[int, torch.Tensor]] = {}
            for c, (p, st) in enumerate(ps):
                def step(start, layer, a, g, c=c):
                    v = kfac.layer_scores({layer: (a, g)}, {layer: blocks[c][layer]},
                                          dtype=score_dtype)[layer]
                    if extra[c] is not None:
                        v = v + extra[c][layer]
                    if len(ps) > 1:
                        v = v * weight
                    rows = parts.setdefault(layer, {})
                    rows[start] = v if start not in rows else rows[start] + v

                layer_pass(p, st.ihvp, b, step)
            per = {layer: torch.cat([r[k] for k in sorted(r)]) for layer, r in parts.items()}
            if per_layer:
                return _Formed(torch.cat([per[k] for k in ps[0][1].ihvp.eigen[0]], 1))
            return _Formed(sum(per.values()))

        return rows_of

    def store_given(train) -> bool:
        from ..store import FeatureStore, StoreRecording

        return isinstance(train, (FeatureStore, StoreRecording))

    def score(params, state, train, test, *, top_k: int | None = None, largest: bool = True):
        ps = pairs(params, state)
        layers = layered and not store_given(train)
        if per_layer and not layers:
            raise TypeError(_msg(name, "train", "training data (per-layer scores need each "
                                 "batch's layers)", type(train).__name__))
        if per_layer and top_k is not None:
            raise ValueError(_msg(name, "top_k", "None with per_layer=True (rank the sum or "
                                  "one layer's scores yourself)", repr(top_k)))
        # The inverse is applied to all n_test gradients at once: an iterative solver then
        # passes over the training data once per iteration, not once per test batch.
        parts = [st.ihvp(collect(grads(p, test=True), regrouped(name, "test", test, rows),
                                 device=device_of(p), func=name, arg="test")) for p, st in ps]
        test_f = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        side = layer_side(ps, test_f) if layers else train_side(ps)
        S = stream_scores(side, regrouped(name, "train", train, rows), test_f,
                          top_k=top_k, largest=largest, func=name)
        if not per_layer:
            return S
        names = list(ps[0][1].ihvp.eigen[0])
        return dict(zip(names, S.unflatten(1, (len(names), -1)).unbind(1), strict=True))

    def record_key(ps) -> dict:
        """What a self-score recorded to a store depends on beyond the params and the data (the
        store's own request): the settings and the inverse's factors, hashed with the record."""
        def setting(v):
            return v if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__

        settings = {k: setting(v) for k, v in sorted(solver_options.items())}
        return {"settings": repr((solver, float(damping), setting(curvature), float(l2),
                                  relatif, settings)),
                "factors": [st.factors for _, st in ps]}

    def self_score(params, state, train):
        ps = pairs(params, state)
        key = record_key(ps) if store_given(train) else None
        if layered and l2 == 0 and target is None and not store_given(train):
            def diag(b):
                rows: dict[int, torch.Tensor] = {}
                for p, st in ps:
                    def step(start, layer, a, g, st=st):
                        v = kfac.layer_self_scores(st.ihvp, {layer: (a, g)}, layers=[layer])[layer]
                        v = v / len(ps)
                        rows[start] = v if start not in rows else rows[start] + v

                    layer_pass(p, st.ihvp, b, step)
                return _Formed(torch.cat([rows[k] for k in sorted(rows)]))

            S = stream_self(diag, lambda b: _Formed(None), regrouped(name, "train", train, rows),
                            device=device_of(ps[0][0]), func=name, state=key)
        else:
            S = stream_self(train_side(ps), test_side(ps), regrouped(name, "train", train, rows),
                            device=device_of(ps[0][0]), func=name, state=key)
        return S

    return Method(prepare, score, self_score, name)
