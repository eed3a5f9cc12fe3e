"""Influence's ``prepare``: curvature -> operator -> inverse, per checkpoint.

:func:`build_inverse` turns an :class:`~dattri_fn.attribute.influence_config.InfluenceConfig`
and a checkpoint's params into ``(C + damping I)^-1`` with the configured solver (the dense,
factored, matrix-free or K-FAC/EK-FAC paths); :func:`prepare` assembles the states of
:func:`~dattri_fn.attribute.influence.influence`, from training data or precomputed factors.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import (
    _msg,
    all_finite,
    batch_size,
    batch_to,
    blame_data,
    check_params,
    iter_batches,
    peek,
    regrouped,
)
from .._types import LinOp, Params
from ..model import FunctionalModel, default_unpack
from ..operators import kfac
from ..operators.curvature import cross_entropy_out_hessian, fvp, gram, hvp
from ..operators.linear_curvature import FactoredCurvatureError, linear_hessian, linear_tap
from ..operators.linear_gauss_newton import FactoredOperator
from ..operators.linear_glm import restricted
from ..transforms import capture
from . import train_print
from .influence_cg import (  # noqa: F401 (moved at stop 25; build_inverse calls these names)
    AUTO_SKETCH_RHS_PER_RANK,
    SKETCH_SEED,
    _block_cg,
    _sketched_cg,
    row_scaled,
)
from .influence_config import InfluenceConfig, InfluenceEnsembleState, InfluenceState, checkpoints
from .influence_data import (  # noqa: F401 (moved at stop 27; old import paths)
    _CHECK_ROWS,
    _batched_train,
    _concat,
    _example,
    _independent,
    _same_losses,
)
from .influence_score import _relatif_scale, grads
from .influence_warnings import _MEASURE, _QUOTED, _shape_of, once_per_call  # noqa: F401
from .method import device_of
from .pipeline import collect


def _factor_kinds(solver: str):
    return (kfac.EKFACFactors,) if solver == "ekfac" else (kfac.KFACFactors,)


def prepare_tap(cfg: InfluenceConfig, params: Params):
    """The captured forward the inverse's factor passes use (K-FAC/EK-FAC, as solver or CG's
    ``M``; explicit's factored Hessian, None outside its limits), else None: built once per
    ``prepare`` and shared by its checkpoints (same keys)."""
    if cfg.factored:
        try:
            return linear_tap(cfg.loss.module, params)
        except ValueError:
            return None
    if cfg.solver in ("kfac", "ekfac"):
        return kfac.kfac_tap(cfg.model.module, params, layers=cfg.options.get("layers"))
    if cfg.precondition is not None:
        return kfac.kfac_tap(cfg.model.module, params)
    return None


def dense_hessian(cfg: InfluenceConfig, params: Params, train, tapped) -> torch.Tensor | None:
    """``H + 2 l2 I`` from per-layer factors, or None for a model outside their limits."""
    if tapped is None:
        return None
    try:
        H = linear_hessian(cfg.loss.module, cfg.loss.loss_fn, params, train,
                           chunk_size=cfg.chunk_size, tapped=tapped, batch_rows=cfg.rows)
    except FactoredCurvatureError:
        return None
    H.diagonal().add_(2 * cfg.l2)
    return H


def batched_for(cfg: InfluenceConfig, params: Params, first):
    """The training objective from one forward per batch where that is exact (``loss`` is
    a FunctionalModel whose examples do not interact and whose batched losses match the
    per-example ones on ``first``), else None (``vmap`` over the examples)."""
    loss = cfg.loss
    if not (isinstance(loss, FunctionalModel) and loss.loss_fn is not None
            and _independent(loss)):
        return None
    fn = _batched_train(loss, cfg.l2)
    return fn if _same_losses(cfg.train_fn, fn, params, batch_to(first, device_of(params)),
                              cfg.name) \
        else None


def affine_hessian(cfg: InfluenceConfig, params: Params, train):
    """``"hessian"`` of a FunctionalModel affine in ``params`` (one Linear layer and nothing
    after it): the Gauss-Newton from cached factors, which IS the Hessian there
    (:func:`~dattri_fn.operators.linear_glm.glm_hessian`); of a softmax cross-entropy MLP
    (:func:`~dattri_fn.operators.linear_mlp.mlp_hessian`: the R-operator from kept factors);
    without the ``l2`` term; else None."""
    from ..operators.gauss_newton import _is_softmax_cross_entropy, curvature_rows
    from ..operators.linear_glm import glm_hessian
    from ..operators.linear_mlp import mlp_hessian

    loss = cfg.loss
    if not (cfg.curvature == "hessian" and isinstance(loss, FunctionalModel)
            and loss.loss_fn is not None and loss.unpack in (None, default_unpack)):
        return None
    first = peek(iter_batches(cfg.name, "train", train))
    if batched_for(cfg, params, first) is None:  # examples that interact in a batch
        return None
    rows = cfg.rows or curvature_rows(sum(v.numel() for v in params.values()),
                                      batch_size(cfg.name, "train", first))
    out_hessian = cross_entropy_out_hessian if _is_softmax_cross_entropy(loss.loss_fn) else None
    H = glm_hessian(loss.module, loss.loss_fn, params, train, batch_rows=rows,
                    chunk_size=cfg.chunk_size, out_hessian=out_hessian)
    if H is None:  # a softmax cross-entropy MLP: its exact Hessian by the R-operator in GEMMs
        # the user's batch_rows bounds its product steps too (k x rows x width); unset: 64
        H = mlp_hessian(loss.module, loss.loss_fn, params, train, batch_rows=cfg.rows)
    return H


def curvature_op(cfg: InfluenceConfig, params: Params, train, tapped) -> LinOp:
    """The curvature ``C`` of the mean training loss at ``params``.  # [k, P] -> [k, P]"""
    if callable(cfg.curvature):
        return cfg.curvature(params, train)
    if cfg.factored:
        H = dense_hessian(cfg, params, train, tapped)
        if H is not None:
            return H
    if cfg.curvature == "hessian":
        H = affine_hessian(cfg, params, train)
        if H is not None:
            return H if cfg.l2 == 0 else H + 2 * cfg.l2
        first = peek(iter_batches(cfg.name, "train", train))
        return hvp(cfg.train_fn, params, train, chunk_size=cfg.chunk_size, batch_rows=cfg.rows,
                   batched=batched_for(cfg, params, first))
    if cfg.plan is not None:  # the plan's rows: its per-example loop where vmap cannot run
        return gram(grads(cfg, params), params, train, batch_rows=cfg.rows, func="fvp")
    return fvp(cfg.train_fn, params, train, chunk_size=cfg.chunk_size, batch_rows=cfg.rows)


def factored_inverse(cfg: InfluenceConfig, params: Params, train, tapped) -> LinOp:
    """``(F_kfac + damping I)^-1`` (or EK-FAC's) of the model's layers on ``train``: CG's
    ``M``."""
    model, kind = cfg.model, cfg.precondition
    fit = kfac.kfac_factors if kind == "kfac" else kfac.ekfac_factors
    inverse = kfac.ihvp_kfac if kind == "kfac" else kfac.ihvp_ekfac
    factors = fit(model.module, model.loss_fn, params, train, chunk_size=cfg.chunk_size,
                  tapped=tapped, batch_rows=cfg.rows, **cfg.precondition_options)
    return inverse(factors, damping=cfg.damping)


def build_inverse(cfg: InfluenceConfig, params: Params, train, tapped) -> tuple[LinOp, Any]:
    """``((C + damping I)^-1, factors)`` of ``cfg.solver`` at ``params`` on validated
    ``train``: the curvature, turned into an operator, turned into its inverse."""
    from .. import solve
    from ..operators import datainf

    solver, damping, options = cfg.solver, cfg.damping, cfg.options
    if solver == "explicit":
        try:
            inv = solve.ihvp_explicit(curvature_op(cfg, params, train, tapped), damping=damping,
                                      **options)
        except ValueError as err:  # its own scan of the dense curvature: name the data
            if str(err) != _msg("ihvp_explicit", "op", "finite values", "NaN or inf"):
                raise
            raise ValueError(_msg(cfg.name, "train", "examples whose curvature is finite",
                                  f"NaN or inf in the dense curvature{_culprit(cfg, params, train)}",
                                  "A training example's gradient (or its square) overflows; "
                                  "check the data's scale, or compute in float64.")) from err
        # eigenpairs (eigh path), the Cholesky factor L of C + damping I (SPD fast path)
        # or its (LU, pivots) (method="lu")
        return inv, inv.eigen if isinstance(inv, solve.EigenInverse) else inv.factor
    if solver == "cg":
        opts = dict(options)
        if cfg.precondition is not None:  # M ~ (C + damping I)^-1 from the same training data
            opts["M"] = factored_inverse(cfg, params, train, tapped)
        C = curvature_op(cfg, params, train, tapped)
        # row_scaled: a right-hand side whose |r|^2 would overflow is solved scaled down
        if cfg.sketch == "auto":  # the Gauss-Newton (PSD): all rows share one Krylov space
            return row_scaled(_block_cg(cfg.name, C, damping, opts)), None
        if cfg.sketch is not None:
            return row_scaled(_sketched_cg(cfg.name, C, damping, opts,
                                           always=cfg.sketch == "always")), None
        return row_scaled(solve.ihvp_cg(C, damping=damping, **opts)), None
    if solver == "minres":
        return row_scaled(solve.ihvp_minres(curvature_op(cfg, params, train, tapped),
                                            damping=damping, **options)), None
    if solver == "arnoldi":
        inv = solve.ihvp_arnoldi(curvature_op(cfg, params, train, tapped), damping=damping,
                                 **options)
        return inv, getattr(inv, "eigen", None)
    if solver == "lissa":
        data = _concat(train, cfg.name)
        H, shift = affine_hessian(cfg, params, data), 2 * cfg.l2  # the Hessian's l2 term
        if H is None and getattr(cfg.curvature, "keeps_factors", False) and \
                batched_for(cfg, params, data) is not None:
            # the Gauss-Newton builder (its l2 is in damping) on a model whose examples do not
            # interact: factors once on all the data, then the mini-batches' rows of them
            C = cfg.curvature(params, data)
            H, shift = (C if isinstance(C, FactoredOperator) and C.factors is not None
                        else None), 0.0
        # row_scaled: LiSSA is linear in its right-hand side, and a row ~1e20 (float32) made
        # |v| inf and the recursion's check blame scale; scaled, a self-score beyond the dtype
        # reaches check_finite_self, which names the example
        if H is not None:  # mini-batches drawn by row index, as sampled draws them from data
            rows = torch.arange(batch_size(cfg.name, "train", data), device=device_of(params))
            return row_scaled(solve.ihvp_lissa(restricted(H, shift), rows, damping=damping,
                                               **options)), None
        return row_scaled(solve.ihvp_lissa(lissa_batches(cfg, params, data), data,
                                           damping=damping, **options)), None
    if solver == "datainf":
        from ..tree import block_slices

        G = collect(grads(cfg, params), regrouped(cfg.name, "train", train, cfg.rows),
                    device=device_of(params), func=cfg.name, arg="train")
        return datainf.ihvp_datainf(G, damping=damping, blocks=block_slices(params),
                                    **options), None
    model = cfg.model
    factor_fn = kfac.kfac_factors if solver == "kfac" else kfac.ekfac_factors
    inverse_fn = kfac.ihvp_kfac if solver == "kfac" else kfac.ihvp_ekfac
    factors = factor_fn(model.module, model.loss_fn, params, train, chunk_size=cfg.chunk_size,
                        tapped=tapped, batch_rows=cfg.rows, **options)
    if solver == "kfac":  # else ihvp_kfac's refusal names factors.A, not the data (EK-FAC's own)
        for side, fac in (("input (A)", factors.A), ("output-gradient (G)", factors.G)):
            for k, v in fac.items():
                if not all_finite(v):
                    raise ValueError(_msg(cfg.name, "train", "examples whose layer inputs and "
                                          "gradients are finite", f"NaN or inf in the {side} "
                                          f"factor of layer {k!r}", "A training example's "
                                          "layer input or gradient (or its square) overflows; "
                                          "check the data's scale, or compute in float64."))
    return inverse_fn(factors, damping=damping), factors


def _culprit(cfg: InfluenceConfig, params: Params, train) -> str:
    """`` (example i's gradient ...)`` for the first training example whose gradient is NaN or
    inf or whose largest entry squares beyond the dtype, else ``""``: read only after the dense
    curvature came out non-finite (one more gradient pass, on the failure path alone)."""
    try:
        G = collect(grads(cfg, params), regrouped(cfg.name, "train", train, cfg.rows),
                    device=device_of(params), func=cfg.name, arg="train")
    except (ValueError, RuntimeError):
        return ""
    if not isinstance(G, torch.Tensor) or not G.is_floating_point():
        return ""
    big = torch.finfo(G.dtype).max ** 0.5
    bad = (~torch.isfinite(G) | (G.abs() > big)).reshape(G.shape[0], -1).any(1)
    if not bool(bad.any()):
        return ""
    return (f" (example {int(bad.nonzero()[0, 0])}'s gradient has an entry whose square "
            f"exceeds {G.dtype})")


def lissa_batches(cfg: InfluenceConfig, params: Params, data):
    """``batch -> LinOp``: LiSSA's curvature on one of its mini-batches of ``data``."""
    if callable(cfg.curvature):
        return lambda b: cfg.curvature(params, b)
    build = hvp if cfg.curvature == "hessian" else fvp
    batched = batched_for(cfg, params, data) if cfg.curvature == "hessian" else None
    opts = {"batched": batched} if batched is not None else {}
    return lambda b: build(cfg.train_fn, params, b, chunk_size=cfg.chunk_size, **opts)


def given_factors(cfg: InfluenceConfig, train, n: int) -> list | None:
    """Precomputed K-FAC/EK-FAC factors given as ``train`` (one per checkpoint), or None."""
    every = (kfac.KFACFactors, kfac.EKFACFactors)
    if cfg.solver not in ("kfac", "ekfac"):
        return None
    many = isinstance(train, (list, tuple)) and not isinstance(train, every) and train \
        and all(isinstance(f, every) for f in train)
    if not (isinstance(train, every) or many):
        return None
    got = list(train) if many else [train]
    kind = _factor_kinds(cfg.solver)[0]
    for f in got:
        if not isinstance(f, kind):
            raise TypeError(_msg(cfg.name, "train", f"training data or {kind.__name__} (solver "
                                 f"{cfg.solver!r})", type(f).__name__))
    if len(got) != n:
        raise ValueError(_msg(cfg.name, "train", f"{n} factors (one per checkpoint)",
                              f"{len(got)}"))
    return got


def from_factors(cfg: InfluenceConfig, params: Params, factors) -> InfluenceState:
    """The state of ``factors`` for ``params`` (same parameter names and sizes; the raveled
    layout follows ``params``' order)."""
    name = cfg.name
    names = tuple(factors.param_names)
    if names != tuple(params) and sorted(names, key=str) == sorted(params, key=str):
        # the factors are per layer; param_names only lays out the raveled vector, so the
        # same keys in another order (params reordered to the model's) take params' order
        factors = factors._replace(param_names=tuple(params))
    if tuple(factors.param_names) != tuple(params):
        raise ValueError(_msg(name, "train", f"factors of the params {list(params)}",
                              f"factors of {list(factors.param_names)}",
                              "Compute the factors for these params (same keys, same order)."))
    inverse_fn = kfac.ihvp_kfac if cfg.solver == "kfac" else kfac.ihvp_ekfac
    ihvp = inverse_fn(factors, damping=cfg.damping)
    P = sum(v.numel() for v in params.values())
    if ihvp.dim != P:
        raise ValueError(_msg(name, "train", f"factors of layers with P = {P} parameters",
                              f"P = {ihvp.dim}"))
    return InfluenceState(ihvp, factors, score_tap(cfg, params, ihvp), keys=tuple(params))


def score_tap(cfg: InfluenceConfig, params: Params, ihvp: LinOp, tapped=None):
    """The captured forward of the layers ``ihvp`` covers, for layer-by-layer scoring (K-FAC/
    EK-FAC on the model itself), else None. ``tapped``: the factor passes' capture, reused
    when it captures exactly those layers (a tied group's members as its one pooled layer)."""
    if not cfg.layered:
        return None
    kron = list(ihvp.eigen[0])
    if tapped is not None:
        members = {m for group in getattr(tapped, "tied", ()) for m in group[1:]}
        if sorted(n for n in tapped.layers if n not in members) == sorted(kron):
            return tapped  # a tap is pure (params come with each call): shared, not rebuilt
    return kfac.kfac_tap(cfg.model.module, params, layers=kron)


def row_scale(cfg: InfluenceConfig, params: Params, ihvp: LinOp, train) -> torch.Tensor | None:
    """RelatIF's ``1 / n_i`` for every training row, in order (one inverse application per
    training batch, once), or None without RelatIF.  # -> [n_train]"""
    if cfg.relatif is None:
        return None
    g = grads(cfg, params)

    def scale(b):  # [B, 1]: collect takes rows
        G = g(b)
        return _relatif_scale(cfg.relatif, G, ihvp(G))[:, None]

    return collect(scale, regrouped(cfg.name, "train", train, cfg.rows),
                   device=device_of(params), func=cfg.name, arg="train")[:, 0]


def layered_keys(cfg: InfluenceConfig, params: Params) -> None:
    """Refuse, naming ``params``, K-FAC/EK-FAC params on a FunctionalModel that hold part of a
    layer's keys only (a weight without its layer's bias, of the model's params): the
    layer-by-layer score runs the capture on ``params`` and the model's ``fixed`` tensors,
    which lack the rest. A layer none of whose keys are in ``params`` stays the module's.
    LayerNorms count (their weight and bias are captured together in the diagonal block)."""
    if not (cfg.layered and cfg.model is not None):
        return
    own = cfg.model.params
    missing = [k for sp in capture.layer_specs(cfg.model.module, norms=True).values()
               if sp.weight in params or sp.bias in params
               for k in (sp.weight, sp.bias) if k in own and k not in params]
    if missing:
        raise ValueError(_msg(cfg.name, "params", "every key of the model's params that "
                              "belongs to a layer with a key in params", f"{list(params)}: "
                              f"missing {missing}", "Pass the whole layer, or select the params "
                              "with functional_model(module, loss_fn, params=...)."))


def check_model_params(cfg: InfluenceConfig, params: Params) -> None:
    """Validate ``params`` (named here, not by the first inner transform) against the model's
    shapes."""
    check_params(cfg.name, "params", params)
    layered_keys(cfg, params)
    if cfg.model is not None:
        for k, v in params.items():
            want = cfg.model.params.get(k)
            if want is not None and v.shape != want.shape:
                raise ValueError(_msg(cfg.name, "params", f"the model's shape "
                                      f"{list(want.shape)} at key {k!r}", list(v.shape)))


def build_state(cfg: InfluenceConfig, params: Params, train, tapped) -> InfluenceState:
    """The state of ``cfg.solver`` at checked ``params`` on validated ``train``: the inverse,
    its factors, the scoring capture and RelatIF's row scales."""
    ihvp, factors = build_inverse(cfg, params, train, tapped)
    scale = row_scale(cfg, params, ihvp, train)
    return InfluenceState(ihvp, factors, score_tap(cfg, params, ihvp, tapped), scale,
                          tuple(params), None if scale is None else train_print.take(
                              cfg.name, train, shuffled="none"))


def prepare(cfg: InfluenceConfig, params, train) -> InfluenceState | InfluenceEnsembleState:
    """``influence(...).prepare``: the inverse (and RelatIF's row scales) per checkpoint, from
    the training data or from precomputed K-FAC/EK-FAC factors given as ``train``."""
    name = cfg.name
    ckpts = checkpoints(name, params)
    factors = given_factors(cfg, train, 1 if ckpts is None else len(ckpts))
    if factors is not None:
        for p in [params] if ckpts is None else ckpts:
            layered_keys(cfg, check_params(name, "params", p))
        if ckpts is None:
            return from_factors(cfg, check_params(name, "params", params), factors[0])
        return InfluenceEnsembleState(tuple(from_factors(cfg, p, f)
                                            for p, f in zip(ckpts, factors, strict=True)))
    train = iter_batches(name, "train", train)  # errors name train, not an inner call
    first = peek(train)
    if first is None:
        raise ValueError(_msg(name, "train", "at least one batch", "an empty iterable"))
    with blame_data(name, "train", first):
        for p in [params] if ckpts is None else ckpts:
            check_model_params(cfg, p)
        if ckpts is None:
            return build_state(cfg, params, train, prepare_tap(cfg, params))
        tapped = prepare_tap(cfg, ckpts[0])  # the checkpoints share keys and shapes
        return InfluenceEnsembleState(once_per_call(lambda p: build_state(cfg, p, train, tapped),
                                                    ckpts))
