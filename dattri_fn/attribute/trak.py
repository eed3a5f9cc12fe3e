"""TRAK: random-projected after-kernel features, a per-checkpoint kernel and an ensemble average.

For checkpoint ``c`` (of ``C``, or ``C`` independently trained models) and example ``z``:

    phi_c(z)  = R_c^T grad_theta f(theta_c; z)                    # [d], R_c: [P, d], seed + c
    K_c       = (Phi_c^T Phi_c + damping I)^-1                    # [d, d], Phi_c: train rows
    Qbar_i    = (1/C) sum_c Q(theta_c; z_i)                       # the output-to-loss weight

    scores[i, j] = ((1/C) sum_c phi_c(z_i)^T K_c phi_c(z_j)) * Qbar_i      # [n_train, n_test]

``f`` is the model output function (for classification the margin
``logit_y - logsumexp_{c != y} logit_c``) and ``Q`` its weight (``1 - p_y`` for that margin and
cross-entropy). A positive score means up-weighting train ``i`` raises test ``j``'s margin, i.e.
LOWERS its loss: a proponent.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._checks import (
    _msg,
    batch_size,
    batch_to,
    check_int,
    check_optional_int,
    check_positive,
    count_rows,
    is_batch,
    iter_batches,
    peek,
    regrouped,
)
from .._types import Params
from ..model import FunctionalModel, batched_loss, check_eval
from ..store import FeatureStore, StoreRecording, record_self, self_scores
from ..transforms.kronecker import FACTOR_KINDS
from ..transforms.layer_grads import decided_plan, layer_plan
from ..transforms.project import KINDS
from . import train_print, trak_mlp
from .boundary import check_cached_train, check_example_fn
from .method import Method, num_checkpoints
from .outputs import (  # noqa: F401  (the classification_* helpers are imported from trak too)
    _MARGIN_FIX,
    _WEIGHT_FIX,
    OutputFn,
    classification_margin,
    classification_margin_loss,
    classification_weight,
    classification_weight_loss,
)
from .pipeline import TopK, stream_scores
from .trak_dual import dual_scores, dual_self_scores
from .trak_features import FeatureConfig, feature_calls, named
from .trak_kernel import (  # noqa: F401  (names served from trak before the split)
    dual_kernel,
    factored_width,
    gram_dtype,
    gram_of,
    pack_rows,
    packed_diag,
    packed_matmul,
    packed_size,
    primal_kernel,
    singular,
    unpacked,
)
from .trak_pair import _captured, _same_value, _weight_follows  # noqa: F401  (served from trak)
from .trak_state import (  # noqa: F401  (_CACHED_ENTRIES, _moved: served from trak before the split)
    _CACHED_ENTRIES,
    TRAKState,
    WeightedRows,
    _moved,
    cached_chunks,
    check_state,
    factored_state,
    one_block_scores,
    stacked_dtype,
    test_rows,
    train_rows,
)


# -- the method --------------------------------------------------------------------------
def trak(output_fn: OutputFn | FunctionalModel, *, weight_fn: OutputFn | FunctionalModel | None = None,
         proj_dim: int | None = None,
         kind: str = "rademacher", seed: int = 0, damping: float = 1e-3,
         chunk_size: int | None = None, cache_features: bool = True,
         feature_dtype: torch.dtype | None = None, batch_rows: int | None = None,
         projection: str = "dense") -> Method:
    """Return TRAK: ``s_ij = (1/C sum_c phi_i^c^T K_c phi_j^c) * Qbar_i``.  # -> [n_train, n_test]

    With ``phi^c = R_c^T grad f(theta_c; z)`` (``R_c`` the ``[P, d]`` projection of
    :func:`dattri_fn.transforms.project.make_projector` with seed ``seed + c`` for checkpoint ``c``:
    independent projections make an ensemble of near-identical models still average out the
    projection noise, LDS 0.57 against 0.44 with one shared R on digits-lr),
    ``K_c = (Phi_c^T Phi_c + damping I)^-1`` and ``Qbar_i = (1/C) sum_c Q(theta_c; z_i)``.
    As in TRAK's ensemble, the kernel-weighted feature products are averaged over checkpoints
    and the weights ``Q`` are averaged separately, then multiplied (not the mean of per-checkpoint
    products). Scores are ``[n_train, n_test]``; positive = up-weighting train ``i`` LOWERS test
    ``j``'s loss (a proponent). ``self_score`` is the diagonal ``s_ii``.

    ``params`` is one params dict or a list of ``C`` checkpoints / independently trained models
    (same keys and shapes). ``prepare`` streams the training set; with the cache and a countable
    ``train`` (a Batch or a list of them) it fills the ``[C, n_train, d]`` cache in place and
    forms ``Phi_c^T Phi_c`` from it (:func:`gram_of`: large blocks, upper block triangle),
    otherwise it accumulates ``Phi_c^T Phi_c`` batch by batch. Features at all checkpoints come
    from one ``vmap`` over the stacked checkpoints, except where the ``C`` dense rademacher
    projections would take over 4 MiB together: countable data (a cached ``train`` here,
    ``test`` in ``score``) are then read once per checkpoint, holding one ``R_c`` at a time,
    each Gram formed right after its pass. A rademacher ``R`` is kept between calls as packed
    signs (one bit per entry), unpacked dense only while its own checkpoint's rows are
    projected (one dense ``R`` alive at a time); other kinds keep a dense ``R`` of up to
    2**22 entries. Gradients are densified by blocks of about 2**16 entries (at least 128 rows)
    and each block is projected straight into its rows of the cache. Each kernel is factored
    and inverted by Cholesky in float64, one checkpoint at a time. When ``d > n_train``, the
    features are cached and ``train`` is countable, it uses
    the dual kernel ``(Phi_c Phi_c^T + damping I)^-1`` (``[n_train, n_train]``) instead: the
    same scores, since ``(Phi^T Phi + damping I)^-1 Phi^T = Phi^T (Phi Phi^T + damping I)^-1``,
    without the ``d x d`` matrix, so TRAK without projection stays cheap for any ``P`` when
    ``n_train`` is moderate; there, with ``output_fn`` a FunctionalModel whose layers are all
    flat, the ``n x n`` Gram comes from the captured factors
    (``sum_layers (a_i . a_j)(g_i . g_j)``, :func:`~dattri_fn.attribute.trak_kernel.factored_gram`)
    when they are narrower than the rows; the state then keeps those factors
    (``TRAKState.train_factors``: ``n (in' + out)`` entries a layer, not the ``[C, n_train, P]``
    rows) and each kernel's lower triangle block-packed (about half of ``[n, n]``), and
    ``score``/``self_score`` meet the test rows' factors the same way (``n m (in' + out)``).

    Args:
        output_fn: ``f(params, example) -> Tensor[]``, the model output of ONE example
            (classification: :func:`classification_margin`, which also takes a binary
            classifier's one logit and 0/1 labels), or a FunctionalModel whose loss is
            that output (``functional_model(module, classification_margin_loss)``): its
            ``nn.Linear`` gradients then come from one batched backward
            (:mod:`dattri_fn.transforms.layer_grads`), not a per-example ``vmap``; same features.
        weight_fn: ``Q(params, example) -> Tensor[]``, the output-to-loss weight
            (classification with the margin: :func:`classification_weight`, ``1 - p_y``);
            a FunctionalModel means its ``loss``, taken for a whole batch by one forward; None = 1.
        proj_dim: ``d``; None = no projection, ``phi`` is the full ``[P]`` gradient (the kernel
            is then ``[P, P]``: only for small models).
        kind, seed: the projector's kind (``"rademacher"``, ``"gaussian"``, ``"sjlt"``) and seed.
        damping: ABSOLUTE ``>= 0`` added to ``Phi^T Phi``, a SUM over the training set (not a
            mean), so its relative effect shrinks as ``n_train`` grows. Needed (> 0) when
            ``d > n_train`` or when the output gradients span fewer than ``d`` directions (e.g.
            the margin's gradient w.r.t. a softmax bias always sums to zero).
        chunk_size: examples per per-sample-gradient call (bounds memory to ``C x chunk x P``).
        batch_rows: merge consecutive batches of ``train`` and ``test`` into calls of at least
            this many examples (fewer, larger gradient and projection calls; same scores).
        cache_features: keep the projected train features ``[C, n_train, d]`` and weights in the
            state, so ``score``/``self_score`` need no train pass (``train`` may be None). A
            ``train`` given anyway must have ``n_train`` examples (checked for a Batch or a list
            of Batches) and is not read. With False, ``train`` is streamed again on every call,
            or read from a feature store (:mod:`dattri_fn.store`): ``score`` given
            ``record_store(...)`` writes the weighted rows ``Qbar_i phi_ci / C``, given the
            opened store it reads no training data; ``self_score`` given ``record_store(...)``
            writes ``s_ii`` to ``<store>/self`` under the state's hash (they depend on ``K``),
            given the opened store it reads them back, refusing another state by name.
        feature_dtype: dtype of the projection's product and of the cached features; None =
            the params' dtype. ``torch.bfloat16`` halves the cache and, on hardware with
            bfloat16 matrix units (recent x86 CPUs, CUDA GPUs), runs the projection several
            times faster, at a relative error of about ``2**-8`` per feature, far below the
            projection's own ``sqrt(2 / d)`` distortion (TRAK's reference implementation keeps
            its features in float16). ``Q``, the kernel and the scores keep the params' dtype;
            the kernel is still factored in float64 (its per-batch Gram then is one float32
            GEMM: products of bfloat16 values are exact in float32). ``torch.float16`` works
            the same way but has no fast GEMM on CPUs. Without projection (``proj_dim=None``)
            there is no projection noise to hide the rounding: the rows are kept dense in
            ``feature_dtype`` (never factored) and the kernel is formed from those same rounded
            rows, so scores are exact for the rounded gradients and off the unrounded ones by the
            rounding as the kernel amplifies it (3.5e-3 relative on a 20-example MLP in the
            tests, 1.8e-3 in review R3's case, where a Gram of the full-precision factors, as
            formed before stop 21, mixed two precisions and was 2.3e-2 off).
        projection: ``"dense"`` (one ``[P, d]`` projection ``R_c``) or ``"kronecker"``: each
            captured layer's gradient ``G = sum_t g_t [a_t, 1]^T`` projected as
            ``P_out^T G P_in`` from its factors (LoGra's projection, ``proj_dim`` = ``k`` per
            side or ``(k_in, k_out)``), without forming ``G``; ``output_fn`` must then be a
            FunctionalModel (:func:`~dattri_fn.transforms.kronecker.make_kronecker_projector`).

    Returns:
        ``Method(prepare, score, self_score, "trak")``; ``prepare(params, train) -> TRAKState``;
        ``score(params, state, train, test, *, top_k=None, largest=True)`` -> ``[n_train,
        n_test]`` or :class:`~dattri_fn.attribute.pipeline.TopK`;
        ``self_score(params, state, train) -> [n_train]``.

    Raises:
        TypeError/ValueError: naming the argument: bad settings here; at call time checkpoints
            with mismatched keys/shapes, NaN params, an ``output_fn``/``weight_fn`` that does not
            return a scalar, examples the model rejects, a state from other params/``proj_dim``,
            or a singular ``Phi^T Phi + damping I`` (raise ``damping``).

    References:
        Park et al., "TRAK: Attributing Model Behavior at Scale" (ICML 2023), arXiv 2303.14186.

    Example:
        >>> fm = functional_model(net, F.cross_entropy)
        >>> m = trak(classification_margin(fm.forward), weight_fn=classification_weight(
        ...     fm.forward), proj_dim=512)
        >>> state = m.prepare(checkpoints, train_loader)
        >>> scores = m.score(checkpoints, state, None, test_batch)   # [n_train, n_test]
    """
    name = "trak"
    plan = keys = None
    # the margin and its weight bridged from one module: an example the margin accepts, the
    # weight accepts too (below), so the boundary calls only the margin on it
    weight_checked = _weight_follows(output_fn, weight_fn)
    check_eval(name, "output_fn", output_fn)  # train-mode Dropout: random gradients
    check_eval(name, "weight_fn", weight_fn)
    if isinstance(output_fn, FunctionalModel):
        if output_fn.loss_fn is None:
            raise ValueError(_msg(name, "output_fn", "a FunctionalModel built with a loss_fn "
                                  "(the output function)", "loss_fn=None"))
        plan, keys, output_fn = layer_plan(output_fn), list(output_fn.params), output_fn.loss
    weight_rows = None
    if isinstance(weight_fn, FunctionalModel):
        if weight_fn.loss_fn is None:
            raise ValueError(_msg(name, "weight_fn", "a FunctionalModel built with a loss_fn "
                                  "(the weight function)", "loss_fn=None"))
        weight_rows, weight_fn = batched_loss(weight_fn), weight_fn.loss
    if not callable(output_fn):
        raise TypeError(_msg(name, "output_fn", "a callable (params, example) -> Tensor[] or a "
                             "FunctionalModel", type(output_fn).__name__))
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(_msg(name, "weight_fn", "None or a callable (params, example) -> "
                             "Tensor[]", type(weight_fn).__name__))
    if projection not in ("dense", "kronecker"):
        raise ValueError(_msg(name, "projection", "'dense' or 'kronecker'", repr(projection)))
    if projection == "kronecker" and plan is None:
        raise ValueError(_msg(name, "output_fn", "a FunctionalModel for projection='kronecker' "
                              "(its layers are what is factored)", type(output_fn).__name__))
    if projection == "kronecker" and proj_dim is None:
        raise ValueError(_msg(name, "proj_dim", "k (per side) or (k_in, k_out) for "
                              "projection='kronecker'", "None"))
    if not (projection == "kronecker" and isinstance(proj_dim, tuple)):
        check_optional_int(name, "proj_dim", proj_dim)
    kinds = FACTOR_KINDS if projection == "kronecker" else KINDS
    if kind not in kinds:
        raise ValueError(_msg(name, "kind", f"one of {kinds}", repr(kind)))
    check_int(name, "seed", seed, minimum=0)
    damping = check_positive(name, "damping", damping, allow_zero=True)
    check_optional_int(name, "chunk_size", chunk_size)
    rows_min = check_optional_int(name, "batch_rows", batch_rows)
    if not isinstance(cache_features, bool):
        raise TypeError(_msg(name, "cache_features", "a bool", type(cache_features).__name__))
    if feature_dtype is not None and (not isinstance(feature_dtype, torch.dtype)
                                      or not feature_dtype.is_floating_point):
        raise TypeError(_msg(name, "feature_dtype", "None or a floating torch.dtype",
                             repr(feature_dtype)))
    # the margin and its weight from one module: Q from the capture pass's margins
    # (weight_checked means both are FunctionalModels, so weight_rows is set; plan is None for a
    # model with no Linear-type layer, which trak_features guards)
    cfg = FeatureConfig(output_fn, weight_fn, plan, keys, proj_dim, kind, seed, chunk_size, rows_min,
                        feature_dtype, {}, weight_rows, projection, weight_checked)

    def setup(func: str, params, state=None):
        """The feature engine of this call: a prepared state's plan decisions applied, if any."""
        decisions = state.plan if isinstance(state, TRAKState) else None
        if decisions is not None and cfg.plan is not None:
            try:
                decided_plan(cfg.plan, decisions)
            except (TypeError, ValueError) as err:  # decisions made for another model
                raise ValueError(_msg(func, "state", "the TRAKState of this trak's prepare",
                                      f"plan decisions this model refuses ({err})")) from err
        return feature_calls(func, params, cfg, decisions)

    def check_first(func: str, arg: str, first: Params, data, device):
        """Validate the first example of ``data`` eagerly, once (the public boundary); return
        what to read ``data`` through from then on: a loader is wrapped in one
        :func:`iter_batches` view whose first batch was peeked, not consumed, so a loader that
        can be read only once loses nothing."""
        view = iter_batches(func, arg, data)
        batch = peek(view)
        if batch is None:
            raise ValueError(_msg(func, arg, "at least one batch", "an empty iterable"))
        batch_size(func, arg, batch)
        batch = batch_to(batch, device)
        # a plain MLP's margin: the call is certain to give a scalar (trak_mlp), not made
        if not trak_mlp.example_ok(cfg.plan, output_fn, first, batch):
            check_example_fn(func, "output_fn", arg, output_fn, first, batch, fix=_MARGIN_FIX)
        if weight_fn is not None and arg == "train" and not weight_checked:
            check_example_fn(func, "weight_fn", arg, weight_fn, first, batch, fix=_WEIGHT_FIX)
        return data if is_batch(data) else view

    def split(out: Tensor) -> tuple[Tensor, Tensor]:  # -> phi [C, b, d], Qbar [b]
        return out[..., :-1], out[..., -1].mean(0)

    def prepare(params, train) -> TRAKState:
        func = f"{name}.prepare"
        calls = setup(func, params)
        stacked, d, first, device, fdt = calls.stacked, calls.d, calls.first, calls.device, calls.fdt
        train = check_first(func, "train", first, train, device)
        # every batch is validated as it is read
        total = count_rows(func, "train", train, check=False) if cache_features else None
        if total is not None and d > total and damping == 0:
            raise singular(func, "all (d > n_train)", d, total, damping)
        data = regrouped(func, "train", train, rows_min)
        dtype = stacked_dtype(stacked)
        if total is not None:
            # Rows known up front: the cache is filled in place, then the kernel is read from
            # it (no per-batch Gram: fewer, larger GEMMs, and only the upper block triangle).
            # By checkpoint (big projections): one R held, and each Gram formed and factored
            # right after its checkpoint's pass.
            C = num_checkpoints(stacked)
            wts = torch.empty(total, dtype=dtype, device=device)
            # Dual form: with d > n_train the n x n kernel (Phi Phi^T + damping I)^-1 gives the
            # same scores, (Phi^T Phi + damping I)^-1 Phi^T = Phi^T (Phi Phi^T + damping I)^-1,
            # and never forms the d x d one (d = P without projection).
            if d > total and calls.factors is not None:
                return factored_state(func, calls, data, total, dtype, wts, damping)
            feats = torch.empty((C, total, d), dtype=fdt, device=device)
            passes = range(C) if calls.by_checkpoint(data) else [None]
            if d > total:
                for c in passes:
                    calls.fill(func, data, feats, wts, c)
                return TRAKState(dual_kernel(func, feats, d, dtype, damping), feats, wts,
                                 calls.plan())
            grams = (gram_of(f, gram_dtype(fdt, dtype)) for c in passes
                     for f in calls.fill(func, data, feats, wts, c))
            K = primal_kernel(func, grams, C, d, total, dtype, device, damping, feats, fdt)
            return TRAKState(K, feats, wts, calls.plan())
        # Uncounted data (a DataLoader) or no cache: Phi^T Phi accumulated batch by batch.
        gram, phis, weights, n = None, [], [], 0
        with named(func, "train"), calls.holding():
            for batch in iter_batches(func, "train", data):
                batch_size(func, "train", batch)
                phi, q = split(calls.packed(batch_to(batch, device)))
                if gram is None:
                    gram = phi.new_zeros((phi.shape[0], d, d), dtype=torch.float64)
                for c in range(phi.shape[0]):
                    gram_of(phi[c].to(fdt), gram_dtype(fdt, dtype), out=gram[c])
                if cache_features:
                    phis.append(phi.to(fdt))
                    weights.append(q)
                n += phi.shape[1]
        K = primal_kernel(func, gram, gram.shape[0], d, n, dtype, device,
                          damping, phis if cache_features else None, fdt)
        if not cache_features:
            return TRAKState(K, None, None, calls.plan())
        return TRAKState(K, torch.cat(phis, dim=1), torch.cat(weights), calls.plan())


    def score(params, state: TRAKState, train, test, *, top_k: int | None = None,
              largest: bool = True) -> Tensor | TopK:
        func = f"{name}.score"
        calls = setup(func, params, state)
        stacked, d, first, device = calls.stacked, calls.d, calls.first, calls.device
        dual = check_state(func, state, stacked, d, calls)
        K = state.kernel.to(device)
        test = check_first(func, "test", first, test, device)
        if dual:
            return dual_scores(func, state, K, dual, calls, train, test, device, top_k,
                               largest)
        test_feats = test_rows(K, calls.collect(func, "test", test, device).to(K.dtype))
        if state.train_features is not None:
            check_cached_train(func, train, state.train_features.shape[1], read=False,
                               rows=state.train_print)
            idx, rows = cached_chunks(state, device)
            if top_k is None and len(idx) == 1:
                # the whole cache is one block: its product directly, the same operations as
                # stream_scores' one block (its checks too), without its loop and the copy into
                # a second [n_train, n_test] (~0.45 of ~8 ms a score on digits-lr)
                return one_block_scores(func, train_rows(*rows(idx[0])), test_feats)
            return stream_scores(lambda i: train_rows(*rows(i)), idx, test_feats, top_k=top_k,
                                 largest=largest, func=func)
        if train is None:
            raise ValueError(_msg(func, "train", "the training data (the state caches no "
                                  "features: cache_features=False)", "None"))
        if isinstance(train, (FeatureStore, StoreRecording)):
            # A store holds plain rows: w_i phi_ci stacked over checkpoints, [C, b, d].
            if isinstance(train, StoreRecording):
                check_first(func, "train", first, train.data, device)
            rows = lambda b: (lambda phi, q: phi * (q / phi.shape[0])[None, :, None])(
                *split(calls.packed(b)))
            with named(func, "train"), calls.holding():
                return stream_scores(rows, train, test_feats, top_k=top_k, largest=largest,
                                     func=func)
        train = check_first(func, "train", first, train, device)
        with named(func, "train"), calls.holding():
            return stream_scores(lambda b: train_rows(*split(calls.packed(b))),
                                 regrouped(func, "train", train, rows_min), test_feats,
                                 top_k=top_k, largest=largest, func=func)

    def self_score(params, state: TRAKState, train) -> Tensor:
        func = f"{name}.self_score"
        calls = setup(func, params, state)
        stacked, d, first, device = calls.stacked, calls.d, calls.first, calls.device
        dual = check_state(func, state, stacked, d, calls)
        K = state.kernel.to(device)
        if dual:
            return dual_self_scores(func, state, K, dual, train, device)
        if state.train_features is not None:
            check_cached_train(func, train, state.train_features.shape[1], read=False,
                               rows=state.train_print)
            idx, rows = cached_chunks(state, device)
            blocks = (rows(i) for i in idx)
        elif train is None:
            raise ValueError(_msg(func, "train", "the training data (the state caches no "
                                  "features: cache_features=False)", "None"))
        elif isinstance(train, (FeatureStore, StoreRecording)):
            # s_ii depends on K (the state): recorded under its hash, read back only with it.
            if isinstance(train, FeatureStore):
                return self_scores(func, train, state=state).to(device)
            check_first(func, "train", first, train.data, device)

            def diag(b):  # [b]: the same per-batch product as from the data
                phi, q = split(calls.packed(b))
                return train_rows(phi, q).row_dots(test_rows(K, phi))

            with named(func, "train"), calls.holding():
                return record_self(func, train, diag, device=device, state=state)
        else:
            train = check_first(func, "train", first, train, device)
            merged = iter_batches(func, "train", regrouped(func, "train", train, rows_min))
            blocks = (split(calls.packed(batch_to(b, device))) for b in merged
                      if batch_size(func, "train", b))
        with named(func, "train"), \
                contextlib.nullcontext() if state.train_features is not None else calls.holding():
            return torch.cat([train_rows(phi, q).row_dots(test_rows(K, phi))
                              for phi, q in blocks])

    prepare = train_print.stamped(prepare, f"{name}.prepare")
    return Method(prepare, score, self_score, name)
