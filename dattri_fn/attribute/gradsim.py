"""Gradient-similarity methods: Grad-Dot, Grad-Cos, TracIn and TracIn-Cos over checkpoints.

    Grad-Dot     s_ij = <g_i, g_j>
    Grad-Cos     s_ij = <g_i, g_j> / (|g_i| |g_j|)
    TracIn       s_ij = sum_c lr_c <g_i(theta_c), g_j(theta_c)>
    TracIn-Cos   s_ij = sum_c lr_c cos(g_i(theta_c), g_j(theta_c))

with ``g = grad loss(params, z)`` (optionally randomly projected to ``proj_dim``). A positive
score means a gradient step on ``z_i`` lowers ``z_j``'s loss to first order: a proponent.
Without ``proj_dim`` the scores are exact (no silent projection).

``projection="kronecker"`` (with a FunctionalModel) projects each captured layer's gradient
``G = sum_t g_t [a_t, 1]^T`` as ``P_out^T G P_in`` from its factors, never forming ``G``
(LoGra's projection, :class:`~dattri_fn.transforms.kronecker.KroneckerProjector`): ``proj_dim``
is then ``k`` per side (or ``(k_in, k_out)``), each layer a ``k_out x k_in`` block, the other
parameters one dense block of ``k_in k_out``.

``loss`` (and ``target``) may be a plain per-example function or a
:class:`~dattri_fn.model.FunctionalModel`: with a model, the gradients of its ``nn.Linear``
layers stay factored (:mod:`dattri_fn.transforms.layer_grads`) and the scores never form ``[B, P]``.
``prepare(params, train)`` then checks each capture plan once and returns its decisions
(:class:`GradSimState`); ``score``/``self_score`` given that state apply them with no check
(given ``()``, each call checks once). When ``test`` is one Batch and ``train`` a Batch or a
list of them in the same layout, ``target`` is ``loss``'s model, there is no projection, no
``chunk_size`` and no Conv2d layer, ``score`` takes both sides' factors from ONE capture pass
over ``[test, *train]`` (per checkpoint) while it fits
:func:`~dattri_fn.operators.gauss_newton.memory_budget`, and forms the scores per given train
batch as the streamed path does (the same numbers; each pass costs a fixed ~0.3-0.7 ms of
set-up, most of it on small models).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import (
    _msg,
    batch_cat,
    batch_size,
    batch_slice,
    batch_to,
    blame_data,
    check_optional_int,
    check_positive,
    is_batch,
    refuse_ambiguous_list,
)
from .._types import Loss, Params
from ..model import FunctionalModel
from ..transforms import layer_grads
from ..transforms.layer_grads import (
    LayerGrads,
    LayerPlan,
    PlanDecisions,
    decided_plan,
    keep_tie_factors,
    layer_grads_fn,
    plan_decisions,
)
from .capture_rows import in_one_pass
from .gradsim_pass import one_pass_scores, pass_row_bytes
from .gradsim_project import (  # noqa: F401  (PROJECTIONS: importable from here, as before)
    PROJECTIONS,
    _inverse_norms,
    _kronecker,
    _projector,
    check_projection,
)
from .method import (
    Method,
    check_checkpoints,
    device_of,
    loss_and_plan,
    num_checkpoints,
    stacked_per_sample_grad,
)
from .pipeline import TopK, check_finite_self, collect, in_chunks, stream_scores, stream_self

_CHECK_ROWS = 3  # the examples check_plan compares with autodiff: prepare checks on these alone


class GradSimState(NamedTuple):
    """What a gradient-similarity method's ``prepare`` keeps: its capture plans' checks.

    The scores never depend on it: it only spares ``score`` and ``self_score`` the check of
    each capture plan (:func:`~dattri_fn.transforms.layer_grads.check_plan`: a factored pass
    over 3 examples compared with example 0's own autodiff row and with the pass's parameter
    gradient, :func:`~dattri_fn.transforms.layer_grads._gap_sums`), which ``prepare`` made once. Plain
    values (:class:`~dattri_fn.transforms.layer_grads.PlanDecisions`): saved, loaded and hashed
    like any state. ``()`` (the state before this one existed) is still accepted: each call
    then checks once, on its first batch of 2 or more examples.

    Attributes:
        train: the decisions of ``loss``'s plan, checked on the first 3 examples of the first
            training batch (a plain MLP's decided without the check:
            :func:`~dattri_fn.transforms.layer_grads.certified_plan`). None: nothing to check
            (``loss`` a plain function), several
            checkpoints (TracIn over C > 1: each call's own check costs less than a check
            here), or ``train`` not in memory at ``prepare`` (None, a DataLoader, a store:
            never read there, so a loader that can be read once loses nothing) or starting
            with a batch of one.
        test: decisions for ``target``'s plan. ``prepare`` leaves it None: a target model of
            its own reads test batches (whose layout may differ from train's), so each score
            call checks it on its own first test batch; None also when ``train``'s serve both
            sides. A state saved with decisions here is still applied.
    """

    train: PlanDecisions | None = None
    test: PlanDecisions | None = None


def _first_in_memory(func: str, train):
    """The first Batch of ``train`` when it is one Batch or a list/tuple of them (read without
    a pass: nothing consumed), else None."""
    if train is None:
        return None
    refuse_ambiguous_list(func, "train", train)
    if is_batch(train):
        return train
    if isinstance(train, (list, tuple)) and train and is_batch(train[0]):
        return train[0]
    return None


def _gradient_similarity(loss, name: str, *, target=None, lrs=None,
                         normalize: bool = False,
                         proj_dim: int | tuple[int, int] | None = None, kind: str = "rademacher",
                         seed: int = 0, chunk_size: int | None = None,
                         projection: str = "dense") -> Method:
    kron = check_projection(name, projection, proj_dim)
    check_optional_int(name, "chunk_size", chunk_size)
    loss_in = loss
    loss, plan = loss_and_plan(name, "loss", loss)
    target, plan_t = (loss, plan) if target is None else loss_and_plan(name, "target", target)
    if plan is None or plan_t is None:
        plan = plan_t = None  # both sides factored, or neither
    if kron and plan is None:
        got = (type(loss_in).__name__ if not isinstance(loss_in, FunctionalModel) else
               "a model without a capturable layer, or a plain target")
        raise ValueError(f"{name}(loss=...): expected a FunctionalModel with an attributed "
                         f"Linear-like layer (and target a FunctionalModel or None) for "
                         f"projection='kronecker', got {got}.")
    kept: dict = {}
    keys = None if plan is None else list(plan.model.params)
    if plan is not None and list(plan_t.model.params) != keys:
        raise ValueError(f"{name}(target=...): expected a FunctionalModel over the same "
                         f"parameters as loss {keys}, got {list(plan_t.model.params)}.")

    def stacked_of(params) -> Params:
        ckpts = check_checkpoints(name, params)
        # one checkpoint: views with a leading C = 1, not a copy of every parameter per call
        stacked = ({k: v.detach()[None] for k, v in ckpts[0].items()} if len(ckpts) == 1 else
                   {k: torch.stack([c[k].detach() for c in ckpts]) for k in ckpts[0]})
        if keys is not None and list(stacked) != keys:
            if sorted(stacked) != sorted(keys):
                raise ValueError(f"{name}(params=...): expected the keys of the model's params "
                                 f"{keys}, got {list(stacked)}.")
            # the plan forms rows in the model's order: a reordered dict is the same params
            stacked = {k: stacked[k] for k in keys}
        if plan is not None:
            bad = {k: list(v.shape[1:]) for k, v in stacked.items()
                   if v.shape[1:] != plan.model.params[k].shape}
            if bad:
                raise ValueError(_msg(name, "params", "the model's parameter shapes "
                                      f"{ {k: list(plan.model.params[k].shape) for k in bad} }",
                                      f"{bad}"))
        return stacked

    def prepare(params, train=None) -> GradSimState:
        stacked = stacked_of(params)
        first = None if plan is None else _first_in_memory(name, train)
        if first is None or batch_size(name, "train", first) < 2 or num_checkpoints(stacked) > 1:
            # Several checkpoints: a score call's own check rides on its first capture pass (the
            # one over test and train when they share it): autodiff on 3 examples and a no-grad
            # forward, less than this check's own factored pass over C checkpoints here.
            return GradSimState()
        # The check's own pass is not kept (no features here), so it runs on the examples it
        # compares alone (a checked plan holds for batches of any size). Params and batch are
        # validated above: check_plan's bare core.
        head = batch_to(batch_slice(first, 0, _CHECK_ROWS), device_of(stacked))
        with blame_data(name, "train", head):
            # a certified MLP's plan is decided without the check (issue 14)
            checked = plan_decisions(layer_grads.certified_plan(plan, stacked, head) or
                                     layer_grads._check(plan, stacked, head, keep_shapes=False)[0])
        # A target model of its own reads test batches, whose layout may differ from train's:
        # its plan is checked by each score call on that call's own first test batch.
        return GradSimState(checked, None)

    def held_plans(func: str, state) -> tuple[LayerPlan | None, LayerPlan | None]:
        """The plans ``state`` checked (decided, no pass), else the unchecked ones: a call then
        checks once, its first batch of >= 2 examples serving both sides when they share one."""
        if state is None or (type(state) is tuple and not state):
            return plan, plan_t
        if not isinstance(state, GradSimState):
            raise TypeError(_msg(func, "state", f"the GradSimState returned by {name}'s prepare "
                                 "(or ())", type(state).__name__))
        if plan is None and state != GradSimState():
            raise ValueError(_msg(func, "state", "an empty GradSimState (loss is a plain function: "
                                  "no capture plan to check)", "plan decisions",
                                  f"Pass the state {name}'s prepare returned."))
        try:
            mine = plan if state.train is None else decided_plan(plan, state.train)
            if plan_t is plan:
                return mine, mine
            return mine, plan_t if state.test is None else decided_plan(plan_t, state.test)
        except (TypeError, ValueError) as err:  # decisions made for another model
            raise ValueError(_msg(func, "state", f"the GradSimState of this {name}'s prepare",
                                  f"decisions this model's capture plan refuses ({err})")) from err

    def features(params, plans):
        stacked = stacked_of(params)
        plan_s, plan_q = plans  # this call's train-side and test-side plans
        C = num_checkpoints(stacked)
        v0 = next(iter(stacked.values()))
        if lrs is None:
            # read only by the dense path over several checkpoints: no tensor to make for one
            weights = None if C == 1 else torch.ones(C, dtype=v0.dtype, device=v0.device)
        else:
            weights = torch.as_tensor(lrs, dtype=torch.float64)
            if weights.shape != (C,):
                raise ValueError(f"{name}(lrs=...): expected {C} learning rates (one per "
                                 f"checkpoint in params), got {weights.numel()}. Pass params as "
                                 f"the list of checkpoints the rates belong to.")
            weights = weights.to(dtype=v0.dtype, device=v0.device)
        proj = None if kron else _projector(stacked, proj_dim, kind, seed)
        kp = _kronecker(plan, stacked, proj_dim, kind, seed, kept) if kron else None

        # A side's plan, checked in prepare, is applied as it is; an unchecked one is checked on
        # its first batch of this call and held (one check when both sides share the plan).
        # a Kronecker projection reads a tie from its members' factors (no [B, V D] rows)
        held = {id(p): layer_grads_fn(p if kp is None else keep_tie_factors(p))
                for p in (plan_s, plan_q) if p is not None}

        def grads(batch, fn, fn_plan) -> Tensor | LayerGrads:
            if fn_plan is None:
                G = stacked_per_sample_grad(  # [C, B, P]
                    fn, stacked, batch, refuse=(name, "loss" if fn is loss else "target"))
            elif kp is not None:
                G = kp.layer_grads(held[id(fn_plan)](stacked, batch))  # [C, B, d]
            else:
                lg = held[id(fn_plan)](stacked, batch)
                if proj is None:
                    return lg.scale(_inverse_norms(lg.sq_norms(), name)) if normalize else lg
                G = lg.to_dense()
            if proj is not None:
                G = proj(G.reshape(-1, G.shape[-1])).reshape(C, G.shape[1], -1)
            if normalize:
                # 0 / tiny = 0: a zero gradient scores 0 here too.
                G = G / G.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
            return G

        # Features stay [C, B, F]: the pipeline sums the per-checkpoint products.
        def train_f(batch) -> Tensor | LayerGrads:
            G = grads(batch, loss, plan_s)
            if isinstance(G, LayerGrads):
                return G if lrs is None else G.scale(weights[:, None])
            return G[0] if C == 1 and lrs is None else G * weights[:, None, None]

        def test_f(batch) -> Tensor | LayerGrads:
            G = grads(batch, target, plan_q)
            return G if isinstance(G, LayerGrads) or C > 1 or lrs is not None else G[0]

        device = device_of(stacked)
        one_pass = None
        if plan_s is not None and plan_s is plan_q and proj is None and kp is None and \
                chunk_size is None and all(plan_s.tapped.specs[n].kind != "conv2d"
                                           for n in plan_s.layers):
            # Both sides' factors from ONE capture pass over the test and train examples: each
            # pass costs a fixed ~0.3-0.7 ms of Python and autograd set-up (on small models most
            # of it), and per-example factors do not depend on the examples around them (eval
            # mode). Not with Conv2d layers: a convolution picks its algorithm by batch shape,
            # so its last bits would move with the grouping.
            row_bytes = pass_row_bytes(plan_s, stacked)

            def one_pass(batches: list, n_test: int) -> tuple[LayerGrads, LayerGrads]:
                """``(train rows, test rows)`` of ``[test, *train]`` from one pass."""
                G = grads(batch_to(batch_cat(batches), device), loss, plan_s)
                train_rows = G.rows(n_test, G.num_rows)
                return (train_rows if lrs is None else train_rows.scale(weights[:, None]),
                        G.rows(0, n_test))

            def both(batch) -> tuple[LayerGrads, LayerGrads]:
                """``(train side, test side)`` of one batch from one pass (self-scores)."""
                G = grads(batch, loss, plan_s)
                return (G if lrs is None else G.scale(weights[:, None])), G

            one_pass.row_bytes = row_bytes
            one_pass.both = both
        return (in_chunks(train_f, chunk_size), in_chunks(test_f, chunk_size), device,
                one_pass)

    def score(params, state, train, test, *, top_k: int | None = None,
              largest: bool = True) -> Tensor | TopK:
        check_optional_int(name, "top_k", top_k)
        train_f, test_f, device, one_pass = features(params, held_plans(name, state))
        merged = None if one_pass is None else in_one_pass(name, test, train,
                                                           one_pass.row_bytes)
        if merged is not None:
            try:
                train_rows, test_rows = one_pass(merged[0], merged[1][0])
            except Exception:  # noqa: BLE001 -- the usual path raises, naming the batch at fault
                merged = None
        if merged is not None:
            return one_pass_scores(name, train_rows, test_rows, merged[1][1:], top_k, largest)
        test_feats = collect(test_f, test, device=device, func=name, arg="test")
        return stream_scores(train_f, train, test_feats, top_k=top_k, largest=largest, func=name)

    def self_score(params, state, train) -> Tensor:
        train_f, test_f, device, one_pass = features(params, held_plans(name, state))
        if one_pass is not None and train is not None:
            refuse_ambiguous_list(name, "train", train)
            batches = [train] if is_batch(train) else train if (
                isinstance(train, (list, tuple)) and train and all(is_batch(b) for b in train)) \
                else None
            if batches is not None:  # in memory: both sides of a batch from one pass
                diag, seen = [], 0
                for b in batches:
                    seen += batch_size(name, "train", b, first=seen)  # a NaN named by index
                    with blame_data(name, "train", b):
                        t, p = one_pass.both(batch_to(b, device))
                    diag.append(t.row_dots(p))  # [b]
                return check_finite_self(name, torch.cat(diag))
        return stream_self(train_f, test_f, train, device=device, func=name)

    return Method(prepare, score, self_score, name)


def grad_dot(loss: Loss | FunctionalModel, *, target: Loss | FunctionalModel | None = None,
             proj_dim: int | tuple[int, int] | None = None,
             kind: str = "rademacher", seed: int = 0, chunk_size: int | None = None,
             projection: str = "dense") -> Method:
    """Return Grad-Dot: ``scores[i, j] = <g_i, g_j>`` at one checkpoint.  # -> [n_train, n_test]

    Args:
        loss: per-example loss ``loss(params, example) -> Tensor[]``, or a FunctionalModel
            (its ``loss``; its Linear layers' gradients stay factored: same scores, no
            ``[B, P]`` matrix).
        target: test-side function whose DECREASE a positive score predicts (default ``loss``);
            factored only when both ``loss`` and ``target`` are FunctionalModels.
        proj_dim: project gradients to this many dims first (None = exact, no projection);
            with ``projection="kronecker"``, ``k`` per layer side or ``(k_in, k_out)``.
        kind, seed: projector kind and seed (see :func:`dattri_fn.transforms.project.make_projector`;
            ``"mask"`` too with ``projection="kronecker"``).
        chunk_size: examples per per-sample-gradient call (bounds memory to chunk x P).
        projection: ``"dense"`` (one ``[P, d]`` projector) or ``"kronecker"`` (per layer
            ``P_out^T G P_in`` from the captured factors; ``loss`` must be a FunctionalModel;
            see :func:`dattri_fn.transforms.kronecker.make_kronecker_projector`).

    References:
        Charpiat et al. 2019, "Input Similarity from the Neural Network Perspective".
    """
    return _gradient_similarity(loss, "grad_dot", target=target, proj_dim=proj_dim, kind=kind, seed=seed,
                                chunk_size=chunk_size, projection=projection)


def grad_cos(loss: Loss | FunctionalModel, *, target: Loss | FunctionalModel | None = None,
             proj_dim: int | tuple[int, int] | None = None,
             kind: str = "rademacher", seed: int = 0, chunk_size: int | None = None,
             projection: str = "dense") -> Method:
    """Return Grad-Cos: ``scores[i, j] = <g_i, g_j> / (|g_i| |g_j|)``.  # -> [n_train, n_test]

    Args: as :func:`grad_dot`. Zero gradients score 0. Self-influence is 1 for nonzero g_i.
    """
    return _gradient_similarity(loss, "grad_cos", target=target, normalize=True, proj_dim=proj_dim, kind=kind,
                                seed=seed, chunk_size=chunk_size, projection=projection)


def _learning_rates(lrs, func: str = "tracin") -> Tensor:
    """Return ``lrs`` as a float64 ``[C]`` tensor, or raise naming ``<func>(lrs=...)``."""
    if isinstance(lrs, (str, bytes, Mapping, Set)) or not isinstance(lrs, (Tensor, Iterable)):
        raise TypeError(f"{func}(lrs=...): expected a sequence of learning rates, one per "
                        f"checkpoint in order, got {type(lrs).__name__}.")
    if not isinstance(lrs, Tensor):
        lrs = list(lrs)  # a generator is read once, here, not at every score call
    try:
        lrs_t = torch.as_tensor(lrs, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{func}(lrs=...): expected real numbers, got {lrs!r}.") from e
    if lrs_t.ndim != 1:
        raise ValueError(f"{func}(lrs=...): expected a 1-d sequence of learning rates, got "
                         f"shape {list(lrs_t.shape)}.")
    if lrs_t.numel() == 0:
        raise ValueError(f"{func}(lrs=...): expected one learning rate per checkpoint, got "
                         "none. TracIn sums over checkpoints: pass at least one checkpoint as params "
                         "and the learning rate in effect at each.")
    return lrs_t


def tracin(loss: Loss | FunctionalModel, *, lrs: Sequence[float] | Tensor,
           target: Loss | FunctionalModel | None = None,
           proj_dim: int | tuple[int, int] | None = None,
           kind: str = "rademacher", seed: int = 0, chunk_size: int | None = None,
           projection: str = "dense") -> Method:
    """Return TracIn-CP: ``scores[i, j] = sum_c lr_c <g_i(theta_c), g_j(theta_c)>``.

    ``params`` passed to ``score`` is the list of C checkpoints; gradients at all checkpoints are
    computed together by ``vmap`` over the stacked checkpoints.  # -> [n_train, n_test]

    Args:
        loss: per-example loss, or a FunctionalModel (factored Linear layers, as
            :func:`grad_dot`).
        lrs: the learning rate in effect at each checkpoint, ``[C]``.
        target: test-side function whose DECREASE a positive score predicts (default ``loss``).
        proj_dim, kind, seed, chunk_size, projection: as :func:`grad_dot` (the same projector
            at every checkpoint).

    References:
        Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient Descent",
        arXiv 2002.08484.
    """
    lrs_t = _learning_rates(lrs)
    for lr in lrs_t.tolist():
        check_positive("tracin", "lrs", lr)
    return _gradient_similarity(loss, "tracin", target=target, lrs=lrs_t, proj_dim=proj_dim, kind=kind,
                                seed=seed, chunk_size=chunk_size, projection=projection)


def tracin_cos(loss: Loss | FunctionalModel, *, lrs: Sequence[float] | Tensor,
               target: Loss | FunctionalModel | None = None,
               proj_dim: int | tuple[int, int] | None = None,
               kind: str = "rademacher", seed: int = 0, chunk_size: int | None = None,
               projection: str = "dense") -> Method:
    """Return TracIn-Cos: ``scores[i, j] = sum_c lr_c cos(g_i(theta_c), g_j(theta_c))``.

    The cosine is taken at each checkpoint (each gradient pair normalised with its own norms),
    then weighted by that checkpoint's learning rate and summed; a zero gradient scores 0.
    ``self_score`` is ``sum_c lr_c`` for train examples with nonzero gradients (target = loss).
    ``params`` is the list of C checkpoints.  # -> [n_train, n_test]

    Args: as :func:`tracin` (with ``proj_dim``, the cosine of the projected gradients).

    References:
        Pruthi et al. 2020 (TracIn, arXiv 2002.08484); the cosine form as in dattri's
        ``TracInAttributor`` with a normalising ``similarity="cos"``.
    """
    lrs_t = _learning_rates(lrs, "tracin_cos")
    for lr in lrs_t.tolist():
        check_positive("tracin_cos", "lrs", lr)
    return _gradient_similarity(loss, "tracin_cos", target=target, lrs=lrs_t, normalize=True,
                                proj_dim=proj_dim, kind=kind, seed=seed, chunk_size=chunk_size,
                                projection=projection)
