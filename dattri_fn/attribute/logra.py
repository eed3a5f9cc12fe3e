"""LoGra: influence through low-rank projected layer gradients, with EK-FAC in the projected space.

For a captured layer with input ``a`` (``[a, 1]`` when its bias is attributed) and output
gradient ``g`` (:mod:`dattri_fn.transforms.capture`), example ``i``'s weight gradient is
``DW_i = sum_t g_it a_it^T``. LoGra projects both factors before they meet:

    DW'_i = P_out^T DW_i P_in = sum_t (P_out^T g_it)(P_in^T a_it)^T      # [k_out, k_in]

so ``DW_i`` (``out x in``) is never formed: the cost per position is ``out k_out + in k_in``.
The curvature is EK-FAC on the projected factors (``A' = E[(1/T) sum_t a' a'^T]``,
``G' = E[sum_t g' g'^T]``, eigenvectors ``Q_A``, ``Q_G``, corrected eigenvalues
``Lambda = E[(Q_G^T DW'_i Q_A)^2]``), inverted per layer:

    M -> Q_G ((Q_G^T M Q_A) / (Lambda + damping)) Q_A^T

and ``scores[i, j] = <DW'_i, (F' + damping)^-1 DW'_j>`` summed over layers
(``[n_train, n_test]``; positive = up-weighting train ``i`` lowers test ``j``'s loss).
``proj_dim=None`` keeps the full factors: then LoGra IS EK-FAC influence on those layers.

References:
    Choe et al., "What is Your Data Worth to GPT? LLM-Scale Data Valuation with Influence
    Functions", 2024, arXiv 2405.13954 (LoGra).
    George et al., 2018, arXiv 1806.03884 (EK-FAC).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import (
    _msg,
    batch_leaves,
    batch_size,
    batch_to,
    blame_data,
    check_int,
    check_optional_int,
    check_params,
    check_positive,
    count_rows,
    is_batch,
    iter_batches,
    refuse_ambiguous_list,
    regrouped,
)
from ..model import FunctionalModel, check_bridged, check_eval, default_unpack
from ..operators.gauss_newton import memory_budget
from ..operators.kfac_layers import _kfac_specs, _unshared
from ..store import FeatureStore, StoreRecording, record_self, self_scores
from ..transforms import capture
from ..transforms.padding import Positions
from . import train_print
from .boundary import check_cached_train
from .capture_rows import cached_row_count, can_merge, capture_row_bytes, merged_passes
from .logra_basis import (  # noqa: F401 (_projection)
    _cast,
    _check_dtype,
    _eigvecs,
    _projection,
    _projections,
    _widths,
)
from .logra_curvature import _add_lambda, _eigen_rows, _eigvals, _factored_sums, _precondition
from .logra_rows import (
    _cached_spans,
    _features,
    _flat_row_bytes,
    _Gather,
    _outer_rows,
    _projected,
    _raw,
    _sliceable,
)
from .logra_stats import _accumulate
from .method import Method
from .pipeline import TopK, check_finite_self, collect, stream_scores


class LoGraState(NamedTuple):
    """What :func:`logra`'s ``prepare`` computes once from the training set.

    Attributes:
        projections: ``{layer: (P_in [in', k_in], P_out [out, k_out])}`` (None: not projected).
        eigvecs: ``{layer: (Q_A [k_in, k_in], Q_G [k_out, k_out])}``.
        eigvals: ``{layer: Lambda + damping}``, EK-FAC's corrected eigenvalues.  # [k_out, k_in]
        train_features: ``DW'_i`` of every training example, layers side by side, or None
            (``cache_features=False``, or held factored in ``train_factors``).  # [n_train, d]
        train_factors: where every layer took one position (``T = 1``) for every example,
            ``{layer: (a' [n_train, k_in], g' [n_train, k_out])}`` instead of the features:
            ``DW'_i = g'_i a'_i^T``, ``k_in + k_out`` numbers per layer and example instead of
            ``k_in k_out``; :meth:`feature_rows` forms rows of the features from them.
        train_print: the rows' print (:mod:`.train_print`; None: counted only).  # [n_train]

    Layers of one shape share storage: their ``eigvecs`` are views of one batched ``eigh`` per
    matrix size, their ``eigvals`` (CPU, <= 32768 entries a layer) of one ``[L, k_out, k_in]``
    stack. One entry held after the state is dropped keeps its group's values alive: no more
    than the state held for that group. ``.clone()`` it to hold it alone; the state does not
    clone (one copy per layer and prepare, for memory the state holds anyway; review RC L1).
    """

    projections: dict
    eigvecs: dict
    eigvals: dict
    train_features: Tensor | None
    train_factors: dict | None = None
    train_print: Tensor | None = None

    def cached_rows(self) -> int | None:
        """The number of training examples whose features the state holds (None: none)."""
        return cached_row_count(self.train_features, self.train_factors)

    def feature_rows(self, start: int = 0, stop: int | None = None) -> Tensor | None:
        """``DW'_i`` of the cached examples ``start:stop``, layers side by side, from whichever
        form the state holds (None: none).  # [stop - start, d]"""
        if self.train_features is not None:
            return self.train_features[start:stop]
        if not self.train_factors:
            return None
        return _outer_rows({ln: (a[start:stop], g[start:stop])
                            for ln, (a, g) in self.train_factors.items()})


_BLOCK_BYTES = 2**18  # least bytes a block of features formed from cached factors may take
_KRON_MAX = 256  # a layer's k_out * k_in up to which its eigenbasis is applied as one Kronecker GEMM
# a capture pass of prepare holds at most memory_budget() / _PASS_SHARE measured bytes (1 MiB of
# the default 256 MiB), a batch over it in slices: LoGra keeps only k_in + k_out numbers per layer
# and example from a pass, so the pass's batch, activations and gradients are its peak
_PASS_SHARE = 256


def logra(model: FunctionalModel, *, proj_dim: int | tuple[int, int] | None = 16,
          damping: float | None = None, seed: int = 0, chunk_size: int | None = None,
          batch_rows: int | None = None, cache_features: bool = True) -> Method:
    """Return LoGra: ``s_ij = <DW'_i, (F' + damping)^-1 DW'_j>`` over captured layers.  # [n_train, n_test]

    Args:
        model: a FunctionalModel with a ``loss_fn``; its ``nn.Linear``, Hugging Face ``Conv1D``
            and ``nn.Conv2d`` layers whose weight is in ``model.params`` are attributed (any
            forward: the capture engine needs no trace). Other attributed parameters are left
            out after one warning naming them (select them away with ``functional_model(...,
            params=...)`` to silence it).
        proj_dim: ``k`` for both sides, or ``(k_in, k_out)``: each layer's feature is
            ``k_out x k_in``; a side no wider than ``k`` is kept whole; None = no projection.
        damping: added to every projected eigenvalue; None = ``0.1 * mean(Lambda)`` per layer.
        seed: the projections' seed (layer ``l`` uses ``seed``-derived generators).
        chunk_size: examples per batched forward/backward (bounds memory).
        batch_rows: merge consecutive batches into calls of at least this many examples
            (1: as given). None: ``prepare`` takes one Batch, or a list or tuple of them, in
            capture passes of at most ``memory_budget() / 256`` measured bytes (1 MiB of the
            default :func:`~dattri_fn.operators.gauss_newton.memory_budget`): small batches
            merged, a larger one in slices, rows in order (no slicing while a BatchNorm or
            Dropout is in training mode: then a list is merged only, a Batch taken whole;
            :mod:`dattri_fn.attribute.capture_rows`); a DataLoader or store as given. The
            grouping moves the curvature sums at the rounding level only.
        cache_features: keep the train features ``[n_train, d]`` in the state, so ``score`` and
            ``self_score`` read no training data (``train`` may be None). With False, ``train``
            is streamed on every call, or read from a feature store (:mod:`dattri_fn.store`):
            ``score`` given ``record_store(...)`` writes the projected rows ``DW'_i``, given
            the opened store reads no training data; ``self_score`` given ``record_store(...)``
            writes ``s_ii`` to ``<store>/self`` under the state's hash (they depend on the
            eigenbasis), given the opened store reads them back, refusing another state.

    Returns:
        ``Method(prepare, score, self_score, "logra")``; ``prepare(params, train) -> LoGraState``.

    Raises:
        TypeError/ValueError: naming the argument: a model without a loss_fn or without a
            capturable layer, bad settings, a list of checkpoints, a state of another model.
    """
    name = "logra"
    if not isinstance(model, FunctionalModel):
        raise TypeError(_msg(name, "model", "a FunctionalModel from functional_model(module, "
                             "loss_fn)", type(model).__name__))
    if model.loss_fn is None:
        raise ValueError(_msg(name, "model", "a FunctionalModel built with a loss_fn",
                              "loss_fn=None"))
    check_bridged(name, "model", model)  # its layers are captured with module and loss_fn
    check_eval(name, "model", model)  # train-mode Dropout: random gradients and factors
    k_in, k_out = (proj_dim, proj_dim) if not isinstance(proj_dim, tuple) else proj_dim
    for k, arg in ((k_in, "proj_dim"), (k_out, "proj_dim")):
        check_optional_int(name, arg, k)
    if damping is not None:
        damping = check_positive(name, "damping", damping, allow_zero=True)
    check_int(name, "seed", seed, minimum=0)
    check_optional_int(name, "chunk_size", chunk_size)
    rows_min = check_optional_int(name, "batch_rows", batch_rows)
    every = _kfac_specs(model.module)
    specs = {n: s for n, s in every.items() if s.weight in model.params}
    # left out in one warning: weights another layer reads with its own bias; layers refused by module
    shared = {**_unshared(model.module, specs, every), **capture.module_problems(model.module, specs)}
    why = " (" + "; ".join(f"{n}: {w}" for n, w in shared.items()) + ")" if shared else ""
    specs = {n: s for n, s in specs.items() if n not in shared}
    if not specs:
        raise ValueError(_msg(name, "model", "an attributed nn.Linear, Conv1D or Conv2d layer "
                              "(its weight in model.params)", "none" + why))
    owned = {k for s in specs.values() for k in (s.weight, s.bias)}
    left = [k for k in model.params if k not in owned]
    if left:
        warnings.warn(f"logra: attributing through the layers {list(specs)} only; these "
                      f"parameters are left out: {left}{why}.", RuntimeWarning, stacklevel=2)
    unpack = model.unpack or default_unpack
    # Every layer's projections, drawn once here from the seed and the weights' widths (an
    # explicit value: prepare casts them, or draws a narrowed layer set's own)
    all_widths = {n: (model.params[s.weight].numel() // s.out_features + (s.bias in model.params),
                      s.out_features) for n, s in specs.items()}
    drawn = _projections(all_widths, k_in, k_out, seed)
    like0 = model.params[next(iter(specs.values())).weight]
    drawn_like = _cast(drawn, like0)
    taps: dict = {}  # layer tuple -> tapped forward (built once per layer set)

    def tapped_for(layers: tuple[str, ...]):
        if layers not in taps:
            taps[layers] = capture.tap(model.module, layers)
        return taps[layers]

    # the raw factors of a pass: the layers' tapped forward, cached above, and this logra's chunks
    raw = partial(_raw, tapped_for, specs, model, unpack, chunk_size)

    def state_of(func: str, params) -> dict:
        if isinstance(params, (list, tuple)):
            raise TypeError(_msg(func, "params", "one params dict (LoGra runs on one model)",
                                 f"a {type(params).__name__} of {len(params)}"))
        params = check_params(func, "params", params)
        if list(params) != list(model.params):
            raise ValueError(_msg(func, "params", f"the keys of model.params {list(model.params)}",
                                  f"{list(params)}"))
        return {**model.fixed, **params}

    def narrowed(func: str, problems: dict) -> tuple[str, ...]:
        """The layers left once those the capture engine cannot factor are dropped (one
        warning names them and why)."""
        why = "; ".join(f"{n or '<root>'}: {w}" for n, w in problems.items())
        warnings.warn(f"{func}: leaving out layers the capture engine cannot factor: {why}.",
                      RuntimeWarning, stacklevel=4)
        kept = tuple(n for n in specs if n not in problems)
        if not kept:
            raise ValueError(_msg(func, "model", "at least one layer the capture engine can "
                                  "factor", "none"))
        return kept

    def first_io(func: str, state: dict, batch) -> tuple[tuple[str, ...], dict]:
        """``(layers, raw io)`` of the first batch: every layer is tried, and the capture's own
        check in that forward (a :class:`~dattri_fn.transforms.capture.CaptureError` naming
        the layers it cannot factor) narrows them: no separate checking forward."""
        try:
            return tuple(specs), raw(state, tuple(specs), batch)
        except capture.CaptureError as err:
            layers = narrowed(func, err.problems)
        return layers, raw(state, layers, batch)

    def projections_for(io: dict, like: Tensor) -> dict:
        """The layers' ``(P_in, P_out)``: fixed by the seed, the layer order and the widths
        (the ones drawn at construction when every layer is captured)."""
        full = _widths(io, specs, model)
        if full != all_widths:  # a narrowed layer set: its own indices, so its own draws
            return _cast(_projections(full, k_in, k_out, seed), like)
        if like.dtype == like0.dtype and like.device == like0.device:
            return drawn_like
        return _cast(drawn, like)

    def precondition(state: LoGraState, phi: Tensor) -> Tensor:  # [b, d] -> [b, d]
        return _precondition(state.eigvecs, state.eigvals, phi, _KRON_MAX)

    def feature_fn(params_state: dict, state: LoGraState, func: str, arg: str, eigen=False):
        layers, rows_of = tuple(state.eigvecs), partial(_eigen_rows, eigvecs=state.eigvecs,
                                                        eigvals=state.eigvals)

        def rows(batch) -> Tensor:  # features, or eigen=True: preconditioned eigenbasis rows
            with blame_data(func, arg, batch):
                io = _projected(raw(params_state, layers, batch), state.projections, specs, model)
                return rows_of(io) if eigen else _features(io)

        return rows

    def prepare(params, train) -> LoGraState:
        func = f"{name}.prepare"
        st = state_of(func, params)
        device = next(iter(st.values())).device
        data = regrouped(func, "train", train, rows_min)
        # bytes one example held in the last capture pass (its batch and raw factors): caps the
        # merged passes that follow (_PASS_SHARE)
        held: list = [None]
        total = None  # the training set's rows where known before any pass: buffers filled in place
        refuse_ambiguous_list(func, "train", train)
        listed = [train] if is_batch(train) else train
        split = _sliceable(model.module)
        if rows_min is None and (can_merge(listed) or (split and isinstance(listed, (list, tuple))
                                                        and len(listed) == 1 and is_batch(listed[0]))):
            # batches in memory: capture passes of at most _PASS_SHARE's bytes (fewer, merged,
            # for many small batches; a batch over it, one given alone included, in slices)
            budget, weights = memory_budget(), [st[s.weight] for s in specs.values()]
            merged = True
            total = count_rows(func, "train", listed, check=False)  # merged_passes checks each
            first = _flat_row_bytes(model, specs, listed[0])

            def passes():
                return merged_passes(func, "train", listed,
                                     lambda b: capture_row_bytes(b, weights), budget,
                                     measured=lambda: first if held[0] is None else held[0],
                                     share=_PASS_SHARE, split=split)
        else:
            merged = False

            def passes():
                return iter_batches(func, "train", data)
        A: dict = {}
        G: dict = {}
        n, layers, projections = 0, None, None
        # {layer: (_Gather of a' [n, k_in], of g' [n, k_out])} while the layer has T = 1 in every
        # batch: Lambda then comes from the rotated factors, without rotating the k_out x k_in
        # features; while every layer is in it, the cache holds these factors, not the features
        factors: dict = {}
        feats = _Gather(total)  # the features, once a layer has T > 1 (cache_features)
        positions = Positions(func, model.module)  # A' over the real positions its layers read
        for batch in passes():
            if not merged:  # merged_passes checked each batch it merged
                batch_size(func, "train", batch, first=n)
            batch = batch_to(batch, device)
            leaves = batch_leaves(batch)
            in_bytes, b = sum(t.nbytes for t in leaves), leaves[0].shape[0]
            leaves = None
            with blame_data(func, "train", batch):
                if layers is None:
                    layers, io = first_io(func, st, batch)
                    if cache_features:
                        factors = {ln: (_Gather(total), _Gather(total)) for ln in layers}
                else:
                    io = raw(st, layers, batch)
            positions.start(batch)
            held[0] = -(-(in_bytes + sum(a.nbytes + g.nbytes for a, g in io.values())) // max(b, 1))
            if projections is None:
                projections = projections_for(io, next(iter(io.values()))[0])
            # the raw factors and the (merged) batch are dropped before the features exist
            io = _projected(io, projections, specs, model, transposed=True)
            batch = None
            _accumulate(io, n, A, G, factors, feats, len(layers), cache_features,
                        {ln: projections[ln][0] is None and specs[ln].bias not in model.params
                         for ln in io}, positions)
            n += b
        if layers is None:
            raise ValueError(_msg(func, "train", "at least one batch", "an empty iterable"))
        eigvecs = _eigvecs({ln: (A[ln], G[ln]) for ln in layers}, func, n, scale=n)  # A'/n, G'/n
        factors = {ln: (fa.value(), fg.value()) for ln, (fa, fg) in factors.items()}
        sums = _factored_sums(factors, eigvecs, layers)
        rest = [ln for ln in layers if ln not in factors]
        add_lambda = partial(_add_lambda, sums, eigvecs, rest, kron_max=_KRON_MAX)
        cached = feats.value() if cache_features and rest else None
        if not rest:
            pass
        elif cache_features:
            r0 = 0
            for size in feats.sizes:  # pass by pass, as the features were formed
                add_lambda(cached[r0:r0 + size])
                r0 += size
        else:
            fn = feature_fn(st, LoGraState(projections, eigvecs, {}, None), func, "train")
            for batch in passes():
                add_lambda(fn(batch_to(batch, device)))
        eigvals = _eigvals(func, sums, n, damping)
        return LoGraState(projections, eigvecs, eigvals, cached,
                          factors if cache_features and not rest else None)

    def check_state(func: str, state) -> None:
        if not isinstance(state, LoGraState):
            raise TypeError(_msg(func, "state", "the LoGraState returned by logra's prepare",
                                 type(state).__name__))

    def cached_spans(state: LoGraState, device, eigen: bool = False) -> tuple:
        return _cached_spans(state, device, _BLOCK_BYTES, state.eigvecs if eigen else None)

    def score(params, state: LoGraState, train, test, *, top_k: int | None = None,
              largest: bool = True) -> Tensor | TopK:
        func = f"{name}.score"
        check_state(func, state)
        st = state_of(func, params)
        _check_dtype(func, state.eigvecs, {n: st[specs[n].weight] for n in state.eigvecs})
        device = next(iter(st.values())).device
        check_optional_int(func, "top_k", top_k)
        fn = feature_fn(st, state, func, "train")
        # T = 1 rows cached as factors: scored in the eigenbasis (_eigen_rows), the train
        # factors rotated block by block in _cached_spans (a store's rows are features: the
        # preconditioner's path). Decided from cached_rows(), as the scoring branch below is:
        # a state with train_factors={} caches nothing and streams train as features.
        eigen = (state.train_features is None and state.cached_rows() is not None
                 and not isinstance(test, (FeatureStore, StoreRecording)))
        test_fn = feature_fn(st, state, func, "test", eigen)
        test_pre = collect(test_fn, test, device=device, func=func, arg="test")
        test_pre = test_pre if eigen else precondition(state, test_pre)
        if state.cached_rows() is not None:
            check_cached_train(func, train, state.cached_rows(), read=False, rows=state.train_print)
            if (state.train_features is not None and top_k is None
                    and state.train_features.dtype == test_pre.dtype):
                # the whole [n_train, n_test] is returned anyway: one product, no block copies
                return state.train_features.to(device) @ test_pre.T
            # factored rows: scored block by block, never all features at once
            rows, spans = cached_spans(state, device, eigen)
            if top_k is None and state.train_factors is not None and (
                    next(iter(state.train_factors.values()))[0].dtype == test_pre.dtype):
                out = test_pre.new_empty(state.cached_rows(), test_pre.shape[0])
                for s, e in spans:  # each block's product written in place (one block: out)
                    torch.mm(rows(s, e), test_pre.T, out=out if len(spans) == 1 else out[s:e])
                return out
            # (index batches: stream_scores counts a batch's rows)
            return stream_scores(lambda b: rows(int(b[0][0]), int(b[0][-1]) + 1),
                                 [(torch.arange(s, e),) for s, e in spans], test_pre,
                                 top_k=top_k, largest=largest, func=func)
        if train is None:
            raise ValueError(_msg(func, "train", "the training data (the state caches no "
                                  "features: cache_features=False)", "None"))
        return stream_scores(fn, regrouped(func, "train", train, rows_min), test_pre, top_k=top_k,
                             largest=largest, func=func)

    def self_score(params, state: LoGraState, train) -> Tensor:
        func = f"{name}.self_score"
        check_state(func, state)
        st = state_of(func, params)
        device = next(iter(st.values())).device
        if state.cached_rows() is not None:
            check_cached_train(func, train, state.cached_rows(), read=False, rows=state.train_print)
            rows, spans = cached_spans(state, device)
            blocks = (rows(s, e) for s, e in spans)
        elif train is None:
            raise ValueError(_msg(func, "train", "the training data (the state caches no "
                                  "features: cache_features=False)", "None"))
        elif isinstance(train, FeatureStore):
            # s_ii = <DW'_i, (F' + damping)^-1 DW'_i> depends on the eigenbasis (the state).
            return self_scores(func, train, state=state).to(device)
        elif isinstance(train, StoreRecording):
            fn = feature_fn(st, state, func, "train")

            def diag(b):  # [b]: the same per-batch product as from the data
                phi = fn(b)
                return (phi * precondition(state, phi)).sum(1)

            return record_self(func, train, diag, device=device, state=state)
        else:
            _check_dtype(func, state.eigvecs, {n: st[specs[n].weight] for n in state.eigvecs})
            fn = feature_fn(st, state, func, "train")
            blocks = (fn(batch_to(b, device)) for b in
                      iter_batches(func, "train", regrouped(func, "train", train, rows_min)))
        return check_finite_self(func, torch.cat([(phi * precondition(state, phi)).sum(1)
                                                  for phi in blocks]))

    prepare = train_print.stamped(prepare, f"{name}.prepare")
    return Method(prepare, score, self_score, name)


__all__ = ["LoGraState", "logra"]
