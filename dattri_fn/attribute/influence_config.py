"""Influence's settings, validated once, and the states its ``prepare`` returns."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from .._checks import _msg, check_int, check_optional_int, check_positive
from .._types import LinOp, Loss, Params
from ..model import FunctionalModel, bridged, check_bridged, check_eval, default_unpack
from .method import check_checkpoints, loss_and_plan

RELATIF = ("l", "theta")
SOLVERS = ("explicit", "cg", "minres", "lissa", "arnoldi", "datainf", "kfac", "ekfac")
CURVATURES = ("gauss_newton", "hessian", "fisher")


def _with_l2(loss: Loss, l2: float) -> Loss:
    """Return ``(p, z) -> loss(p, z) + l2 |p|^2``."""
    if l2 == 0:
        return loss
    return lambda p, z: loss(p, z) + l2 * sum((v * v).sum() for v in p.values())


class InfluenceState(NamedTuple):
    """``ihvp``: the inverse operator ``V -> (C + damping I)^-1 V``; ``factors``: the tensors it
    was built from (eigenpairs, a Cholesky factor, K-FAC factors...) or ``None`` for
    matrix-free solvers; ``tap``: the captured forward that scores K-FAC/EK-FAC layer by layer
    (None on the raveled path); ``row_scale``: RelatIF's ``1 / n_i`` for the training rows
    ``prepare`` saw, in order (``[n_train]``; None without RelatIF or without training data);
    ``keys``: the params' keys in the order ``prepare`` laid the inverse out in (``score`` and
    ``self_score`` take the same keys in any order and reorder them to it; None in a state
    saved before stop 22, which takes params as given); ``train_print``: with ``row_scale``, the
    print of those rows (:mod:`~dattri_fn.attribute.train_print`): ``score`` uses ``row_scale``
    only for the same rows in that order, else one more inverse application per batch."""

    ihvp: LinOp
    factors: Any
    tap: Any = None
    row_scale: torch.Tensor | None = None
    keys: tuple[str, ...] | None = None
    train_print: torch.Tensor | None = None


class InfluenceEnsembleState(NamedTuple):
    """``states``: one :class:`InfluenceState` per checkpoint, in the order of the params list
    given to ``prepare`` (each checkpoint has its own curvature and inverse)."""

    states: tuple[InfluenceState, ...]


class InfluenceConfig(NamedTuple):
    """:func:`~dattri_fn.attribute.influence.influence`'s settings after validation.

    ``damping`` includes ``2 l2`` on the Gauss-Newton, whose ``curvature`` is then the
    :func:`~dattri_fn.operators.gauss_newton` builder; ``train_fn`` is ``loss + l2 |p|^2`` and
    ``test_fn`` the test side, ``plan``/``plan_t`` their batched-gradient plans; ``layered``:
    K-FAC/EK-FAC scored layer by layer from captured ``(a, g)``; ``factored``: ``explicit``'s
    dense Hessian from per-layer factors; ``sketch``: ``"auto"`` for block CG on the
    Gauss-Newton, ``"always"`` for CG's Nystrom preconditioner (else None);
    ``precondition``: ``"kfac"``/``"ekfac"`` for CG's ``M``."""

    name: str
    solver: str
    damping: float
    curvature: Any
    l2: float
    relatif: str | None
    per_layer: bool
    query_rank: int | None
    chunk_size: int | None
    rows: int | None
    options: dict
    loss: Any
    model: FunctionalModel | None
    target: Any
    train_fn: Loss
    base: Loss
    plan: Any
    test_fn: Loss
    plan_t: Any
    layered: bool
    factored: bool
    score_dtype: Any
    sketch: str | None
    precondition: str | None
    precondition_options: dict


def influence_config(loss: Loss | FunctionalModel, *, solver, damping: float,
                     curvature: str | Callable[[Params, Any], LinOp] | None, target, model,
                     l2: float, chunk_size: int | None, batch_rows: int | None,
                     relatif: str | None, per_layer: bool, solver_options: dict
                     ) -> InfluenceConfig:
    """Return the validated :class:`InfluenceConfig` of ``influence(loss, ...)``; errors name
    ``influence(<arg>=...)``."""
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
    _check_required(solver, solver_options)
    if solver == "lissa":  # refused here, not later as ihvp_lissa(scale=...) (review RH L2)
        check_positive("influence", "scale", solver_options["scale"])
    if solver == "arnoldi":
        check_int("influence", "rank", solver_options["rank"])
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
    for arg, fn in (("loss", loss), ("target", target), ("model", model)):
        check_eval("influence", arg, fn)  # train-mode Dropout: random gradients and factors
    if curvature is None:
        # a replaced loss (not bridged): the Hessian of that loss, not G of module and loss_fn
        curvature = ("gauss_newton" if isinstance(loss, FunctionalModel)
                     and loss.loss_fn is not None and bridged(loss) else "hessian")
    if (isinstance(curvature, str) and curvature not in CURVATURES) or not (
            isinstance(curvature, str) or callable(curvature)):
        raise ValueError(f"influence(curvature=...): expected one of {list(CURVATURES)} or a "
                         f"callable (params, train) -> LinOp, got {curvature!r}.")
    if curvature in ("gauss_newton", "hessian") and solver in ("explicit", "cg", "minres", "lissa",
                                                              "arnoldi") \
            and isinstance(loss, FunctionalModel):
        from ..operators.gauss_newton import no_second_order

        bag = no_second_order(loss, loss.params)
        if bag is not None:
            raise ValueError(_msg("influence", "curvature", "'fisher' (or solver 'kfac'/'ekfac') "
                                  f"for a model whose nn.EmbeddingBag {bag!r} is attributed: torch "
                                  "has neither its forward-mode derivative nor its double backward",
                                  repr(curvature)))
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
        check_bridged("influence", "loss", loss, " with curvature='gauss_newton'",
                      ", or pass curvature='hessian'")
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
    if solver in ("kfac", "ekfac") and model is loss:
        # the factors come from module and loss_fn: they would invert another loss's curvature
        check_bridged("influence", "loss", model, f" with solver {solver!r}")
    precondition = solver_options.get("M") if isinstance(solver_options.get("M"), str) else None
    precondition_options: dict = {}
    if isinstance(solver_options.get("M"), Solver) and solver_options["M"].name in ("kfac",
                                                                                    "ekfac"):
        # solvers.ekfac(fisher="expected"): the factors' settings of the preconditioner
        precondition, precondition_options = solver_options["M"].name, solver_options["M"].options
        if "query_rank" in precondition_options:
            raise ValueError("influence(M=...): expected factor settings only, got query_rank "
                             "(a scoring option) in the preconditioner.")
    _check_fisher(model, solver_options if solver in ("kfac", "ekfac") else {})
    _check_fisher(model, precondition_options if precondition in ("kfac", "ekfac") else {})
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
    _check_known(solver, solver_options)
    return InfluenceConfig(
        name=f"if_{solver}", solver=solver, damping=damping, curvature=curvature, l2=l2,
        relatif=relatif, per_layer=per_layer, query_rank=query_rank, chunk_size=chunk_size,
        rows=rows, options=solver_options, target=target, model=model,
        # a replaced loss is a plain per-example loss here: the batched and factored Hessian
        # paths would differentiate module with loss_fn (stop 26 review RG H1)
        loss=loss.loss if isinstance(loss, FunctionalModel) and not bridged(loss) else loss,
        train_fn=train_fn, base=base, plan=plan, test_fn=test_fn, plan_t=plan_t, layered=layered,
        factored=(solver == "explicit" and curvature == "hessian"
                  and isinstance(loss, FunctionalModel) and loss.loss_fn is not None
                  and loss.unpack in (None, default_unpack) and bridged(loss)),
        score_dtype=score_dtype,
        sketch="always" if force_sketch else "auto" if auto_sketch else None,
        precondition=precondition, precondition_options=precondition_options)


_REQUIRED = {"scale": "a float above the largest eigenvalue of the damped curvature (LiSSA's "
                      "step is 1/scale)",
             "rank": "a positive int (the number of top eigenpairs Arnoldi keeps)"}


def _inverse_fn(solver: str) -> Callable:
    from .. import solve
    from ..operators import datainf, kfac

    return {"explicit": solve.ihvp_explicit, "cg": solve.ihvp_cg, "minres": solve.ihvp_minres,
            "lissa": solve.ihvp_lissa, "arnoldi": solve.ihvp_arnoldi,
            "datainf": datainf.ihvp_datainf, "kfac": kfac.ihvp_kfac,
            "ekfac": kfac.ihvp_ekfac}[solver]


def _check_required(solver: str, options: dict) -> None:
    """Refuse at construction every keyword option the solver's inverse requires and that
    ``prepare`` does not pass itself (arnoldi's ``rank`` raised a raw TypeError there: RU2 M1)."""
    for name, p in inspect.signature(_inverse_fn(solver)).parameters.items():
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and name != "damping" \
                and options.get(name) is None:
            raise ValueError(f"influence({name}=...): expected "
                             f"{_REQUIRED.get(name, 'a value')} with solver={solver!r} (or pass "
                             f"solver=dattri_fn.solvers.{solver}(...)), got None.")


_OWN = {"damping", "blocks", "chunk_size", "tapped", "batch_rows"}  # prepare passes these itself


def _takes(solver: str) -> list[str]:
    """The keyword options ``prepare`` forwards to the solver's inverse (or factor builder)."""
    from ..operators import kfac

    fn = {"kfac": kfac.kfac_factors, "ekfac": kfac.ekfac_factors}.get(solver) or _inverse_fn(solver)
    return [n for n, p in inspect.signature(fn).parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in _OWN]


def _check_known(solver: str, options: dict) -> None:
    """Refuse at construction a keyword the solver does not take (LiSSA's ``max_iter`` raised
    ``ihvp_lissa``'s raw TypeError at ``prepare``: RU3 M1)."""
    takes = _takes(solver) + (["query_rank"] if solver in ("kfac", "ekfac") else [])
    unknown = [k for k in options if k not in takes]
    if unknown:
        raise TypeError(f"influence({unknown[0]}=...): solver {solver!r} takes "
                        f"{', '.join(takes) or 'no options'}, got {unknown[0]}="
                        f"{options[unknown[0]]!r}.")


def _check_fisher(model: FunctionalModel | None, options: dict) -> None:
    """Refuse the factors' ``fisher``/``seed``/``sampler`` here, not at ``prepare`` under the
    factor builder's name (``fisher='true'`` on a loss with no known sampler: RU2 H2)."""
    if model is None or model.loss_fn is None or "fisher" not in options:
        return
    from ..operators.kfac_fisher import fisher_losses

    fisher_losses("influence", model.loss_fn, options["fisher"], options.get("seed", 0),
                  options.get("sampler"))


def checkpoints(name: str, params) -> list[Params] | None:
    """The list of checkpoints (validated alike), or None for one params dict."""
    if isinstance(params, dict):
        return None
    if not isinstance(params, Sequence) or isinstance(params, (str, bytes)):
        raise TypeError(f"{name}(params=...): expected a params dict or a non-empty list of "
                        f"them (checkpoints), got {type(params).__name__}.")
    check_checkpoints(name, list(params))  # same keys and shapes, or an error naming one
    return list(params)
