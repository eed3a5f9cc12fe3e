"""FactGraSS's scoring side: the checks of a state against its factgrass, the features of cached
examples (as they are, or formed from cached factors in fixed row spans), ``score``,
``self_score`` and ``feature_rows`` (:func:`~dattri_fn.attribute.factgrass.factgrass` binds them
to its configuration, a :class:`_Config`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .._checks import (
    _msg,
    batch_to,
    check_optional_int,
    check_params,
    iter_batches,
    regrouped,
)
from ..model import FunctionalModel
from ..transforms.layer_grads import LayerPlan, decided_plan
from .boundary import check_cached_train
from .factgrass_blocks import (
    _blocks_of,
    _cached,
    _check_blocks,
    _check_sketch,
    _factor_rows,
    _precondition,
    _Sketches,
    _spans,
)
from .factgrass_rows import _Rows
from .pipeline import TopK, check_finite_self, collect, stream_scores

if TYPE_CHECKING:
    from .factgrass import FactGraSSState


class _Config(NamedTuple):
    """One factgrass's configuration, as its ``prepare``/``score``/``self_score`` read it."""

    name: str
    model: FunctionalModel
    plan: LayerPlan  # the model's capture plan, unchecked
    fingerprint: tuple  # FactGraSSState.sketch of this factgrass
    rows_min: int | None  # batch_rows
    curvature: str
    damping: float | None
    cache_features: bool
    chunk_size: int | None
    sketch_bytes: int  # factgrass._SKETCH_BYTES
    sketch_for: Callable  # params -> _Sketches
    keep_ties: Callable  # plan -> plan that reads ties from their factors (keep_tie_factors)


def feature_fn(cfg: _Config, params: dict, sk: _Sketches, func: str, arg: str,
               checked: LayerPlan | None = None, *,
               validated: bool = False) -> tuple[_Rows, Callable]:
    """``(rows, held)``: ``rows(batch) -> phi [b, d]`` for one stream (:class:`_Rows`), and
    ``held()``: the plan it applies (checked on its first chunk of >= 2 examples when
    ``checked`` is None). ``validated``: the stream's caller checks each batch before it
    passes it (``pipeline.collect``, ``stream_scores``)."""
    rows = _Rows(cfg.plan, params, sk, func, arg, cfg.chunk_size, cfg.sketch_bytes, checked,
                 cfg.keep_ties, validated)
    return rows, rows.held


def state_of(cfg: _Config, func: str, params) -> dict:
    """``params`` checked: one dict with the keys of the model's params."""
    if isinstance(params, (list, tuple)):
        raise TypeError(_msg(func, "params", "one params dict (FactGraSS runs on one "
                             "model)", f"a {type(params).__name__} of {len(params)}"))
    params = check_params(func, "params", params)
    if list(params) != list(cfg.model.params):
        raise ValueError(_msg(func, "params", f"the keys of model.params {list(cfg.model.params)}",
                              f"{list(params)}"))
    return params


def spans_of(cfg: _Config, sk: _Sketches, factors: dict) -> list:
    """The fixed row spans in which cached factors become features (:func:`_spans`)."""
    a0 = next(iter(factors.values()))[0]
    return _spans(a0.shape[0], _blocks_of(sk)[-1][2], max(sk.stage1.dims.values()),
                  a0.element_size(), cfg.sketch_bytes)


def check_state(cfg: _Config, func: str, state) -> LayerPlan | None:
    """Raise unless ``state`` is a FactGraSSState this model's plan can take; return the
    plan its decisions give (no check, no pass over data), None where it holds none."""
    from .factgrass import FactGraSSState  # (factgrass imports this module)

    if not isinstance(state, FactGraSSState):
        raise TypeError(_msg(func, "state", "the FactGraSSState returned by factgrass's "
                             "prepare", type(state).__name__))
    _check_sketch(func, state, cfg.fingerprint)
    if state.plan is None:
        return None
    try:
        return decided_plan(cfg.plan, state.plan)
    except (TypeError, ValueError) as err:  # decisions made for another model
        raise ValueError(_msg(func, "state", "the FactGraSSState of this factgrass's prepare",
                              f"decisions this model's capture plan refuses ({err})")) from err


def state_params(cfg: _Config, func: str, params, state: FactGraSSState) -> dict:
    """``state_of(cfg, func, params)``, refusing params of another dtype than the state's cached
    train rows (they would meet test rows of the params' dtype)."""
    got = state_of(cfg, func, params)
    rows = state.train_features if state.train_features is not None else None if (
        not state.train_factors) else next(iter(state.train_factors.values()))[0]
    dtype = next(iter(got.values())).dtype
    if rows is not None and rows.dtype != dtype:
        raise ValueError(_msg(func, "params", f"params in {rows.dtype}, the dtype of the "
                              "state's cached train rows", f"{dtype}",
                              "Cast the params, or call prepare again with them."))
    return got


def factor_rows(cfg: _Config, sk: _Sketches, state: FactGraSSState, device):
    """``(form, spans)``: ``form(r0, r1)`` gives the features of the state's cached
    examples ``r0:r1`` from its factors (on ``device``), in the spans ``prepare`` used."""
    factors = {b: (a.to(device), g.to(device)) for b, (a, g) in state.train_factors.items()}
    blocks = _blocks_of(sk)
    return ((lambda r0, r1: _factor_rows(sk, blocks, factors, r0, r1)),
            spans_of(cfg, sk, factors))


def score(cfg: _Config, params, state: FactGraSSState, train, test, *, top_k: int | None = None,
          largest: bool = True) -> Tensor | TopK:
    """factgrass's ``score`` (see :func:`~dattri_fn.attribute.factgrass.factgrass`)."""
    func = f"{cfg.name}.score"
    held = check_state(cfg, func, state)
    params = state_params(cfg, func, params, state)
    device = next(iter(params.values())).device
    check_optional_int(func, "top_k", top_k)
    sk = cfg.sketch_for(params)
    _check_blocks(func, state, sk)
    test_pre = _precondition(state, collect(feature_fn(cfg, params, sk, func, "test", held,
                                                       validated=True)[0],
                                            test, device=device, func=func, arg="test",
                                            fresh=True))  # _Rows allocates its rows
    if state.train_features is not None:
        check_cached_train(func, train, state.train_features.shape[0], read=False,
                           rows=state.train_print)
        feats = state.train_features
        if feats.device != device:  # (a dispatched .to is an op even where it is a no-op)
            feats = feats.to(device)
        if top_k is None and feats.dtype == test_pre.dtype:
            # the whole [n_train, n_test] is returned anyway: one product, no block copies
            return feats @ test_pre.T
        fn, blocks = _cached(feats)
        return stream_scores(fn, blocks, test_pre, top_k=top_k, largest=largest, func=func)
    if state.train_factors is not None:
        check_cached_train(func, train, state.cached_rows(), read=False,
                           rows=state.train_print)
        form, spans = factor_rows(cfg, sk, state, device)
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
    return stream_scores(feature_fn(cfg, params, sk, func, "train", held, validated=True)[0],
                         regrouped(func, "train", train, cfg.rows_min), test_pre, top_k=top_k,
                         largest=largest, func=func)


def self_score(cfg: _Config, params, state: FactGraSSState, train) -> Tensor:
    """factgrass's ``self_score`` (see :func:`~dattri_fn.attribute.factgrass.factgrass`)."""
    func = f"{cfg.name}.self_score"
    held = check_state(cfg, func, state)
    params = state_params(cfg, func, params, state)
    device = next(iter(params.values())).device
    if state.train_features is not None:
        check_cached_train(func, train, state.train_features.shape[0], read=False,
                           rows=state.train_print)
        fn, blocks = _cached(state.train_features.to(device))
        rows = (fn(i) for i in blocks)
    elif state.train_factors is not None:
        check_cached_train(func, train, state.cached_rows(), read=False,
                           rows=state.train_print)
        sk = cfg.sketch_for(params)
        _check_blocks(func, state, sk)
        form, spans = factor_rows(cfg, sk, state, device)
        rows = (form(r0, r1) for r0, r1 in spans)
    elif train is None:
        raise ValueError(_msg(func, "train", "the training data (the state caches no "
                              "features: cache_features=False)", "None"))
    else:
        sk = cfg.sketch_for(params)
        _check_blocks(func, state, sk)
        fn = feature_fn(cfg, params, sk, func, "train", held)[0]
        rows = (fn(batch_to(b, device)) for b in
                iter_batches(func, "train", regrouped(func, "train", train, cfg.rows_min)))
    # a NaN or inf self-score is refused naming its example (an overflowing example's features)
    return check_finite_self(func, torch.cat([(phi * _precondition(state, phi)).sum(1)
                                              for phi in rows]))


def feature_rows(cfg: _Config, params, state: FactGraSSState, start: int = 0,
                 stop: int | None = None) -> Tensor | None:
    """``phi`` of the cached examples ``start:stop``, from whichever form the state holds
    (the rows ``score`` uses, bit for bit; None: none cached).  # [stop - start, d]"""
    func = f"{cfg.name}.prepare.feature_rows"
    check_state(cfg, func, state)
    if state.train_features is not None:
        return state.train_features[start:stop]
    if state.train_factors is None:
        return None
    params = state_params(cfg, func, params, state)
    sk = cfg.sketch_for(params)
    _check_blocks(func, state, sk)
    form, spans = factor_rows(cfg, sk, state, next(iter(params.values())).device)
    start, stop, _ = slice(start, stop).indices(state.cached_rows())
    got = [form(r0, r1)[max(start, r0) - r0:min(stop, r1) - r0] for r0, r1 in spans
           if r0 < stop and r1 > start]
    if not got:
        return state.train_factors[state.blocks[0][0]][0].new_empty(0, state.blocks[-1][2])
    return got[0] if len(got) == 1 else torch.cat(got)
