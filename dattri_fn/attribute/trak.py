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
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import (
    _msg,
    batch_size,
    batch_slice,
    batch_to,
    check_int,
    check_optional_int,
    check_positive,
    count_rows,
    iter_batches,
    regrouped,
)
from .._types import Params
from ..layer_grads import layer_grads_stacked, layer_plan
from ..model import FunctionalModel
from .method import Method, num_checkpoints, stack_checkpoints, stacked_per_sample_grad
from .pipeline import TopK, collect, in_chunks, merge_topk, stream_scores

OutputFn = Callable[[Params, Any], Tensor]
_MARGIN_FIX = "For classification use classification_margin(forward)."
_WEIGHT_FIX = "For classification use classification_weight(forward)."


class TRAKState(NamedTuple):
    """What :func:`trak`'s ``prepare`` computes once from the training set.

    Attributes:
        kernel: ``K_c = (Phi_c^T Phi_c + damping I)^-1`` per checkpoint  # [C, d, d]
            or, in the dual form (``d > n_train``, features cached, ``damping > 0``),
            ``(Phi_c Phi_c^T + damping I)^-1``.  # [C, n_train, n_train]
        train_features: the projected train features ``phi_c(z_i)``, or None when built with
            ``cache_features=False``.  # [C, n_train, d]
        train_weights: ``Qbar_i = (1/C) sum_c Q(theta_c; z_i)``, or None likewise.  # [n_train]
    """

    kernel: Tensor
    train_features: Tensor | None
    train_weights: Tensor | None


# -- classification helpers --------------------------------------------------------------
def example_label(example) -> Tensor:
    """Return the label of one example: ``example["labels"]`` for a dict, else ``example[-1]``."""
    if isinstance(example, Mapping):
        if "labels" not in example:
            raise ValueError(_msg("example_label", "example", "a dict with a 'labels' key",
                                  f"keys {list(example)}"))
        return example["labels"]
    if isinstance(example, (tuple, list)) and len(example) >= 2:
        return example[-1]
    raise TypeError(_msg("example_label", "example", "a (x, ..., y) tuple/list or a dict with "
                         "'labels'", type(example).__name__, "Pass your own label_fn."))


def classification_margin(forward: Callable[[Params, Any], Tensor],
                          label_fn: Callable[[Any], Tensor] = example_label) -> OutputFn:
    """Return ``f(params, z) = logit_y - logsumexp_{c != y} logit_c``, TRAK's margin.  # -> []

    Args:
        forward: ``forward(params, example) -> logits [K]`` for ONE example (e.g.
            ``functional_model(module).forward``).
        label_fn: ``example -> y`` (an integer 0-d tensor); default: the last element of a
            tuple example or ``example["labels"]``.

    Returns:
        ``output_fn(params, example) -> Tensor[]``, vmappable. ``sigmoid(f) = p_y``, the softmax
        probability of the label, so raising ``f`` lowers the cross-entropy.
    """

    return _margin_fn("classification_margin", forward, label_fn)


def _margin_fn(func: str, forward: Callable[[Params, Any], Tensor],
               label_fn: Callable[[Any], Tensor]) -> OutputFn:
    def margin(params: Params, example) -> Tensor:
        logits = forward(params, example)
        if not isinstance(logits, Tensor) or logits.ndim != 1:
            got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(_msg(func, "forward", "logits of shape [K] for one example",
                                  f"{got}"))
        y = _class_labels(func, label_fn(example), logits.shape[0]).reshape(1)
        own = _gather_labels(func, logits, y, 0).squeeze(0)
        mask = torch.arange(logits.shape[0], device=logits.device) == y
        return own - logits.masked_fill(mask, float("-inf")).logsumexp(0)

    return margin


def _class_labels(func: str, y, K: int, *, batched: bool = False) -> Tensor:
    """Return ``y`` as int64 class indices in ``[0, K)``, or raise naming ``func``'s labels.

    A float label would be truncated (1.5 -> class 1) and an out-of-range one gives a raw index
    error. Values are checked eagerly; under a torch.func transform they cannot be read, and
    :func:`_gather_labels` reports the out-of-range index instead.
    """
    arg = "labels" if batched else "example"
    want = "integer class labels [B]" if batched else "an integer class label (one per example)"
    if not isinstance(y, Tensor):
        raise TypeError(_msg(func, arg, f"{want} as a Tensor", type(y).__name__))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(_msg(func, arg, want, f"dtype {y.dtype}",
                             "Class labels index the logits: convert them with .long()."))
    if (y.ndim != 1) if batched else (y.numel() != 1):
        raise ValueError(_msg(func, arg, want, f"label shape {list(y.shape)}"))
    if torch._C._functorch.maybe_current_level() is None:
        bad = (y < 0) | (y >= K)
        if bool(bad.any()):
            raise ValueError(_msg(func, arg, f"class labels in [0, {K}) for {K} logits",
                                  f"label {int(y[bad].reshape(-1)[0])}"))
    return y.long()


def _gather_labels(func: str, logits: Tensor, y: Tensor, dim: int) -> Tensor:
    """Return ``logits.gather(dim, y)``; an out-of-range label raises naming ``func``'s labels."""
    try:
        return logits.gather(dim, y)
    except RuntimeError as err:  # under vmap: the labels' values could not be checked first
        if "out of bounds" not in str(err):
            raise
        arg = "example" if dim == 0 else "labels"
        raise ValueError(_msg(func, arg, f"class labels in [0, {logits.shape[-1]}) for "
                              f"{logits.shape[-1]} logits", f"an out-of-range label ({err})"))\
            from err


def classification_margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Return the batch mean of ``logit_y - logsumexp_{c != y} logit_c``.  # [B, K], [B] -> []

    The batch-loss form of :func:`classification_margin`, for
    ``functional_model(module, classification_margin_loss)``: pass that model as ``trak``'s
    ``output_fn`` and its ``nn.Linear`` gradients come from the factored path.
    """
    labels = _class_labels("classification_margin_loss", labels, logits.shape[1], batched=True)
    own = _gather_labels("classification_margin_loss", logits, labels[:, None], 1).squeeze(1)
    mask = torch.arange(logits.shape[1], device=logits.device) == labels[:, None]
    return (own - logits.masked_fill(mask, float("-inf")).logsumexp(1)).mean()


def classification_weight_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Return the batch mean of ``1 - p_y = sigmoid(-margin)``.  # [B, K], [B] -> []"""
    labels = _class_labels("classification_weight_loss", labels, logits.shape[1], batched=True)
    own = _gather_labels("classification_weight_loss", logits, labels[:, None], 1).squeeze(1)
    mask = torch.arange(logits.shape[1], device=logits.device) == labels[:, None]
    return torch.sigmoid(logits.masked_fill(mask, float("-inf")).logsumexp(1) - own).mean()


def classification_weight(forward: Callable[[Params, Any], Tensor],
                          label_fn: Callable[[Any], Tensor] = example_label) -> OutputFn:
    """Return ``Q(params, z) = 1 - p_y = sigmoid(-margin)``, TRAK's weight for the margin.  # -> []

    ``d CE / d margin = -(1 - p_y)``: the factor that turns a change of the margin into a change
    of the cross-entropy loss. Args as :func:`classification_margin`.
    """
    margin = _margin_fn("classification_weight", forward, label_fn)
    return lambda params, example: torch.sigmoid(-margin(params, example))


# -- boundary checks ---------------------------------------------------------------------
def first_example(batch):
    """Return row 0 of every leaf of a Batch: one example, the leading dim removed."""
    if isinstance(batch, Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        return {k: v[0] for k, v in batch.items()}
    return type(batch)(v[0] for v in batch)


def check_example_fn(func: str, arg: str, data_arg: str, fn: Callable, params: Params, batch,
                     *, ndim: int = 0, fix: str = "") -> Tensor:
    """Call ``fn(params, example_0)`` eagerly; raise a clear error unless it gives an ``ndim``-d
    Tensor (a failing call is blamed on the data, the usual cause)."""
    try:
        out = fn(params, first_example(batch))
    except (RuntimeError, IndexError) as err:
        raise ValueError(_msg(func, data_arg, f"examples that {arg} accepts (the layout of the "
                              "training examples)", f"an error on the first example: {err}"))\
            from err
    if not isinstance(out, Tensor):
        raise TypeError(_msg(func, arg, "a function returning a Tensor per example",
                             type(out).__name__))
    if out.ndim != ndim:
        want = "a scalar Tensor[]" if ndim == 0 else f"a {ndim}-d Tensor"
        raise ValueError(_msg(func, arg, f"a function returning {want} per example",
                              f"shape {list(out.shape)}", fix))
    return out


def first_batch(func: str, arg: str, data, device):
    """Return the first Batch of ``data`` on ``device``, checked; raise if there is none."""
    for batch in iter_batches(func, arg, data):
        batch_size(func, arg, batch)
        return batch_to(batch, device)
    raise ValueError(_msg(func, arg, "at least one batch", "an empty iterable"))


def check_cached_train(func: str, train, n_cached: int) -> None:
    """Raise if ``train`` has != ``n_cached`` rows: a Batch or a list/tuple of them counted, a
    DataLoader by its dataset's length (a loader over a subset scores no other rows)."""
    n = None if train is None else count_rows(func, "train", train)
    dataset = getattr(train, "dataset", None)
    if n is None and dataset is not None and hasattr(dataset, "__len__"):
        n = len(dataset)
        size = getattr(train, "batch_size", None)
        if getattr(train, "drop_last", False) and size:
            n -= n % size
    if n is not None and n != n_cached:
        raise ValueError(_msg(func, "train", f"the {n_cached} training examples the state was "
                              "prepared on (its cached features are used)", f"{n} examples",
                              "Call prepare on this training set, or pass train=None."))


_DENSE_ENTRIES = 2**21  # up to this b * P (or R held), a checkpoint's [b, P] is densified
_ROW_BLOCK_ENTRIES = 2**19  # densified per projection call when R is held: rows x P entries
_HELD_BYTES = 2**22  # over this, the C dense R's of a pass are held one at a time
_CACHED_ENTRIES = 2**19  # cached features widened and scored per block: C x rows x d entries


_GRAM_ROWS = 512  # rows per widened block of gram_of
_GRAM_COLS = 128  # column block of gram_of's upper block triangle
_GRAM_WHOLE = 192  # up to this d, gram_of multiplies whole blocks of rows


def gram_of(x: Tensor, wide: torch.dtype = torch.float64, *, out: Tensor | None = None) -> Tensor:
    """Return ``x^T x`` in float64, by blocks of rows and the upper column-block triangle.  # -> [d, d]

    Each block of rows is widened to ``wide`` and multiplied there (float32 suffices for
    half-precision rows: their products are exact), each block's product summed in float64.
    With ``d > 192`` (``_GRAM_WHOLE``) only the column-block pairs ``i <= j`` are multiplied
    (``(k + 1) / 2k`` of the flops for ``k`` blocks of 128) and the rest mirrored. ``out``: a
    float64 ``[d, d]`` symmetric accumulator to add ``x^T x`` to (no second ``[d, d]``), returned.
    """
    n, d = x.shape
    h = d if d <= _GRAM_WHOLE else _GRAM_COLS
    g = x.new_zeros((d, d), dtype=torch.float64) if out is None else out
    buf = None
    for s in range(0, n, _GRAM_ROWS):
        blk = x[s:s + _GRAM_ROWS]
        if blk.dtype != wide:
            if buf is None:
                buf = x.new_empty((min(n, _GRAM_ROWS), d), dtype=wide)
            blk = buf[:blk.shape[0]].copy_(blk)
        for a in range(0, d, h):
            g[a:a + h, a:] += blk[:, a:a + h].mT @ blk[:, a:]
    for a in range(h, d, h):
        g[a:a + h, :a] = g[:a, a:a + h].mT
    return g


class WeightedRows(NamedTuple):
    """TRAK's train rows ``w_i phi_ci`` with the weight kept apart.  # phi [C, b, d], w [b]

    ``scores`` scales the ``[b, n]`` product instead of a ``[C, b, d]`` copy of the features.
    """

    phi: Tensor
    w: Tensor

    def scores(self, other: Tensor) -> Tensor:
        """Return ``w_i sum_c <phi_ci, other_cj>``.  # other [C, n, d] -> [b, n]"""
        return torch.bmm(self.phi, other.transpose(1, 2)).sum(0).mul_(self.w[:, None])

    def row_dots(self, other: Tensor) -> Tensor:
        """Return ``w_i sum_c <phi_ci, other_ci>``.  # -> [b]"""
        return (self.phi * other).sum((0, 2)) * self.w

    @staticmethod
    def cat(blocks) -> WeightedRows:
        return WeightedRows(torch.cat([b.phi for b in blocks], 1), torch.cat([b.w for b in blocks]))


class _Calls(NamedTuple):
    """What one of :func:`trak`'s calls works with, built from its params by ``setup``."""

    stacked: Params  # {key: [C, ...]}
    packed: Callable  # batch -> [C, b, d + 1] in the params' dtype: features, then Q
    collect: Callable  # (func, arg, data, device) -> [C, n, d] in fdt
    fill: Callable  # (func, data, feats, wts, c) -> the rows of the cache it wrote
    by_checkpoint: Callable  # data -> whether it is read once per checkpoint
    holding: Callable  # c | None -> a context holding that checkpoint's (every) dense R
    d: int
    first: Params  # checkpoint 0
    device: torch.device
    fdt: torch.dtype  # the features' dtype


# -- the method --------------------------------------------------------------------------
def trak(output_fn: OutputFn | FunctionalModel, *, weight_fn: OutputFn | FunctionalModel | None = None,
         proj_dim: int | None = None,
         kind: str = "rademacher", seed: int = 0, damping: float = 1e-3,
         chunk_size: int | None = None, cache_features: bool = True,
         feature_dtype: torch.dtype | None = None, batch_rows: int | None = None) -> Method:
    """Return TRAK: ``s_ij = (1/C sum_c phi_i^c^T K_c phi_j^c) * Qbar_i``.  # -> [n_train, n_test]

    With ``phi^c = R_c^T grad f(theta_c; z)`` (``R_c`` the ``[P, d]`` projection of
    :func:`dattri_fn.project.make_projector` with seed ``seed + c`` for checkpoint ``c``:
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
    signs (one bit per entry, unpacked by each call); other kinds keep a dense ``R`` of up to
    2**22 entries. Each kernel is factored and inverted by Cholesky in float64, one checkpoint
    at a time. When ``d > n_train``, the features are cached and ``train`` is countable, it uses
    the dual kernel ``(Phi_c Phi_c^T + damping I)^-1`` (``[n_train, n_train]``) instead: the
    same scores, since ``(Phi^T Phi + damping I)^-1 Phi^T = Phi^T (Phi Phi^T + damping I)^-1``,
    without the ``d x d`` matrix, so TRAK without projection stays cheap for any ``P`` when
    ``n_train`` is moderate.

    Args:
        output_fn: ``f(params, example) -> Tensor[]``, the model output of ONE example
            (classification: :func:`classification_margin`), or a FunctionalModel whose loss is
            that output (``functional_model(module, classification_margin_loss)``): its
            ``nn.Linear`` gradients then come from one batched backward
            (:mod:`dattri_fn.layer_grads`), not a per-example ``vmap``; same features.
        weight_fn: ``Q(params, example) -> Tensor[]``, the output-to-loss weight
            (classification with the margin: :func:`classification_weight`, ``1 - p_y``);
            a FunctionalModel means its ``loss``; None = 1.
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
            of Batches) and is not read. With False, ``train`` is streamed again on every call.
        feature_dtype: dtype of the projection's product and of the cached features; None =
            the params' dtype. ``torch.bfloat16`` halves the cache and, on hardware with
            bfloat16 matrix units (recent x86 CPUs, CUDA GPUs), runs the projection several
            times faster, at a relative error of about ``2**-8`` per feature, far below the
            projection's own ``sqrt(2 / d)`` distortion (TRAK's reference implementation keeps
            its features in float16). ``Q``, the kernel and the scores keep the params' dtype;
            the kernel is still factored in float64 (its per-batch Gram then is one float32
            GEMM: products of bfloat16 values are exact in float32). ``torch.float16`` works
            the same way but has no fast GEMM on CPUs.

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
    from ..project import KINDS, make_projector

    plan = keys = None
    if isinstance(output_fn, FunctionalModel):
        if output_fn.loss_fn is None:
            raise ValueError(_msg(name, "output_fn", "a FunctionalModel built with a loss_fn "
                                  "(the output function)", "loss_fn=None"))
        plan, keys, output_fn = layer_plan(output_fn), list(output_fn.params), output_fn.loss
    if isinstance(weight_fn, FunctionalModel):
        weight_fn = weight_fn.loss
    if not callable(output_fn):
        raise TypeError(_msg(name, "output_fn", "a callable (params, example) -> Tensor[] or a "
                             "FunctionalModel", type(output_fn).__name__))
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(_msg(name, "weight_fn", "None or a callable (params, example) -> "
                             "Tensor[]", type(weight_fn).__name__))
    check_optional_int(name, "proj_dim", proj_dim)
    if kind not in KINDS:
        raise ValueError(_msg(name, "kind", f"one of {KINDS}", repr(kind)))
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
    projectors: dict = {}  # (P, dtype, device, c) -> Projector

    def setup(func: str, params) -> _Calls:
        stacked = stack_checkpoints(func, params)
        if keys is not None and list(stacked) != keys:
            raise ValueError(_msg(func, "params", f"the keys of output_fn's params {keys}",
                                  f"{list(stacked)}"))
        v0 = next(iter(stacked.values()))
        P = sum(v[0].numel() for v in stacked.values())
        C = num_checkpoints(stacked)
        d = P if proj_dim is None else proj_dim
        fdt = v0.dtype if feature_dtype is None else feature_dtype

        def projector(c: int):  # kept by the method: a rademacher R's packed signs persist
            key = (P, v0.dtype, v0.device, c)
            if key not in projectors:
                projectors[key] = make_projector(P, proj_dim=proj_dim, kind=kind, seed=seed + c,
                                                 dtype=v0.dtype, device=v0.device)
            return projectors[key]

        projs = None if proj_dim is None else [projector(c) for c in range(C)]

        @contextlib.contextmanager
        def holding(c: int | None = None):
            """Hold checkpoint ``c``'s dense R (None: every checkpoint's) for one pass."""
            with contextlib.ExitStack() as stack:
                for p in (projs or []) if c is None else [projs[c]]:
                    stack.enter_context(p.kept(fdt, v0.device))
                yield

        def dense_buffer(buffers: list, b: int) -> Tensor | None:
            """``[1, b, P]`` in fdt from ``buffers`` (one tensor, grown when needed): a stream's
            batches reuse one buffer; None = a fresh tensor per call."""
            if buffers is None:
                return None
            if not buffers or buffers[0].shape[0] < b:
                buffers[:] = [v0.new_empty((b, P), dtype=fdt)]
            return buffers[0][:b].unsqueeze(0)

        def feature_rows(batch, buffers: list | None = None, one: int | None = None):
            """Yield ``[b, d]`` in fdt per checkpoint; ``one``: that checkpoint only."""
            sub, plist = (stacked, projs) if one is None else (
                {k: v[one:one + 1] for k, v in stacked.items()}, None if projs is None else [projs[one]])
            lg = None if plan is None else layer_grads_stacked(plan, sub, batch)
            if lg is not None and plist is not None:
                b = lg.num_rows
                for c, proj in enumerate(plist):
                    lc = lg.select(c)
                    if proj.holdable or b * P <= _DENSE_ENTRIES:  # densified, then projected:
                        # by blocks of rows when R is held dense (the block stays small)
                        rb = max(1, _ROW_BLOCK_ENTRIES // P) if proj.holdable else b
                        parts = [proj(lc.rows(r, r + rb).to_dense(
                            fdt, out=dense_buffer(buffers, min(rb, b - r)))[0])
                            for r in range(0, b, rb)]
                        yield parts[0] if len(parts) == 1 else torch.cat(parts)
                    else:  # one checkpoint's columns per projector step: never [b, P]
                        yield proj.apply_columns(lambda s, e, lc=lc: lc.columns(s, e)[0].to(fdt),
                                                 b, dtype=fdt, device=v0.device)
                return
            if lg is not None:
                yield from lg.to_dense(fdt)  # unprojected: [b, P] each
                return
            G = stacked_per_sample_grad(output_fn, sub, batch).to(fdt)  # [C, b, P], one vmap
            yield from (G if plist is None else (p(g) for p, g in zip(plist, G, strict=True)))

        def features(batch, one: int | None = None) -> Tensor:  # [C, b, d] in fdt ([1, b, d] for one)
            return torch.stack(list(feature_rows(batch, one=one)))

        def weights(batch, b: int) -> Tensor:  # Qbar [b] in the params' dtype
            if weight_fn is None:
                return torch.ones(b, dtype=v0.dtype, device=v0.device)
            per_ckpt = lambda p: vmap(weight_fn, in_dims=(None, 0))(p, batch)
            return vmap(per_ckpt)(stacked).to(v0.dtype).mean(0)

        def packed(batch) -> Tensor:  # [C, b, d + 1] in the params' dtype: features, then Q
            G = features(batch).to(v0.dtype)
            Q = weights(batch, G.shape[1])
            return torch.cat([G, Q.expand(G.shape[0], -1).unsqueeze(-1)], dim=-1)

        def by_checkpoint(data) -> bool:
            """Whether ``data`` is read once per checkpoint, holding one dense R at a time: when
            the ``C > 1`` R's that a pass holds (packed rademacher signs unpacked) would take
            over 4 MiB together, for a Batch or a list of them (the same rows in the same order
            on every pass)."""
            held = 0 if projs is None else projs[0].held_bytes(fdt)
            return C > 1 and C * held > _HELD_BYTES and count_rows(func, "data", data,
                                                                   check=False) is not None

        def collect_features(func: str, arg: str, data, device) -> Tensor:  # [C, n, d] in fdt
            data = regrouped(func, arg, data, rows_min)
            if not by_checkpoint(data):
                with holding():
                    return collect(in_chunks(features, chunk_size), data, device=device, func=func,
                                   arg=arg)
            per_ckpt = []
            for c in range(C):
                with holding(c):
                    per_ckpt.append(collect(in_chunks(functools.partial(features, one=c), chunk_size),
                                            data, device=device, func=func, arg=arg))
            return torch.cat(per_ckpt)

        def fill(func: str, data, feats: Tensor, wts: Tensor, c: int | None) -> Tensor:
            """Write every row of checkpoint ``c`` (None: all) and the weights into the cache
            ``feats`` ``[C, n, d]``, ``wts`` ``[n]``; return the rows written ``[1 or C, n, d]``."""
            n, buffers = 0, []
            with holding(c):
                for batch in iter_batches(func, "train", data):
                    batch = batch_to(batch, v0.device)
                    b = batch_size(func, "train", batch)
                    step = b if chunk_size is None else chunk_size
                    for s in range(0, b, step):
                        part = batch if step >= b else batch_slice(batch, s, s + step)
                        rows = slice(n + s, n + min(b, s + step))
                        for i, phi in enumerate(feature_rows(part, buffers, c)):
                            feats[i if c is None else c, rows] = phi
                        if not c:  # None or 0: the weights, once
                            wts[rows] = weights(part, rows.stop - rows.start)
                    n += b
            return feats if c is None else feats[c:c + 1]

        return _Calls(stacked, in_chunks(packed, chunk_size), collect_features, fill, by_checkpoint,
                      holding, d, {k: v[0] for k, v in stacked.items()}, v0.device, fdt)

    def check_first(func: str, arg: str, first: Params, data, device) -> None:
        """Validate the first example of ``data`` eagerly, once (the public boundary)."""
        batch = first_batch(func, arg, data, device)
        check_example_fn(func, "output_fn", arg, output_fn, first, batch, fix=_MARGIN_FIX)
        if weight_fn is not None and arg == "train":
            check_example_fn(func, "weight_fn", arg, weight_fn, first, batch, fix=_WEIGHT_FIX)

    def split(out: Tensor) -> tuple[Tensor, Tensor]:  # -> phi [C, b, d], Qbar [b]
        return out[..., :-1], out[..., -1].mean(0)

    def singular(func: str, where, d: int, n: int) -> ValueError:
        return ValueError(_msg(func, "damping", "Phi^T Phi + damping I positive definite at "
                               "every checkpoint", f"a singular matrix at checkpoints {where} "
                               f"(d={d}, n_train={n}, damping={damping})",
                               "Raise damping or lower proj_dim."))

    def dual_kernel(func: str, feats: Tensor, d: int, dtype) -> Tensor:
        """``(Phi Phi^T + damping I)^-1`` per checkpoint, by Cholesky in float64.  # [C, n, n]"""
        n = feats.shape[1]
        gram = feats.new_empty((feats.shape[0], n, n), dtype=torch.float64)
        for c, f in enumerate(feats):  # one checkpoint's float64 copy at a time
            f64 = f.to(torch.float64)
            torch.mm(f64, f64.T, out=gram[c])
        del f64
        gram.diagonal(dim1=-2, dim2=-1).add_(damping)
        L, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()):
            raise singular(func, torch.nonzero(info).flatten().tolist(), d, feats.shape[1])
        return torch.cholesky_inverse(L).to(dtype)

    def primal_kernel(func: str, grams, C: int, d: int, n: int, dtype, device) -> Tensor:
        """``(gram_c + damping I)^-1`` by Cholesky, factored and inverted in place in each
        float64 ``gram_c`` (an iterable's item, taken only when needed).  # [C, d, d]"""
        K = torch.empty((C, d, d), dtype=dtype, device=device)
        info = torch.empty((), dtype=torch.int32, device=device)
        bad = []
        for c, g in enumerate(grams):
            g.diagonal().add_(damping)
            g = g.mT  # the same symmetric matrix, column-major: LAPACK then works in g itself
            torch.linalg.cholesky_ex(g, out=(g, info))
            if int(info) != 0:
                bad.append(c)
                continue
            K[c] = torch.cholesky_inverse(g, out=g)
            del g
        if bad:
            raise singular(func, bad, d, n)
        return K

    def prepare(params, train) -> TRAKState:
        func = f"{name}.prepare"
        calls = setup(func, params)
        stacked, d, first, device, fdt = calls.stacked, calls.d, calls.first, calls.device, calls.fdt
        check_first(func, "train", first, train, device)
        # every batch is validated as it is read
        total = count_rows(func, "train", train, check=False) if cache_features else None
        if total is not None and d > total and damping == 0:
            raise singular(func, "all (d > n_train)", d, total)
        data = regrouped(func, "train", train, rows_min)
        dtype = stacked_dtype(stacked)
        if total is not None:
            # Rows known up front: the cache is filled in place, then the kernel is read from
            # it (no per-batch Gram: fewer, larger GEMMs, and only the upper block triangle).
            # By checkpoint (big projections): one R held, and each Gram formed and factored
            # right after its checkpoint's pass.
            C = num_checkpoints(stacked)
            feats = torch.empty((C, total, d), dtype=fdt, device=device)
            wts = torch.empty(total, dtype=dtype, device=device)
            passes = range(C) if calls.by_checkpoint(data) else [None]
            # Dual form: with d > n_train the n x n kernel (Phi Phi^T + damping I)^-1 gives the
            # same scores, (Phi^T Phi + damping I)^-1 Phi^T = Phi^T (Phi Phi^T + damping I)^-1,
            # and never forms the d x d one (d = P without projection).
            if d > total:
                for c in passes:
                    calls.fill(func, data, feats, wts, c)
                return TRAKState(dual_kernel(func, feats, d, dtype), feats, wts)
            grams = (gram_of(f, gram_dtype(fdt, dtype)) for c in passes
                     for f in calls.fill(func, data, feats, wts, c))
            return TRAKState(primal_kernel(func, grams, C, d, total, dtype, device), feats, wts)
        # Uncounted data (a DataLoader) or no cache: Phi^T Phi accumulated batch by batch.
        gram, phis, weights, n = None, [], [], 0
        with calls.holding():
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
        K = primal_kernel(func, gram, gram.shape[0], d, n, dtype, device)
        if not cache_features:
            return TRAKState(K, None, None)
        return TRAKState(K, torch.cat(phis, dim=1), torch.cat(weights))

    def gram_dtype(fdt: torch.dtype, dtype: torch.dtype) -> torch.dtype:
        """float32 for half-precision features with float32 params (exact products, one fast
        GEMM per block), else float64: float32 Phi^T Phi is too ill-conditioned to factor once
        d approaches n_train."""
        return torch.float32 if fdt.itemsize <= 2 and dtype == torch.float32 else torch.float64

    def stacked_dtype(stacked) -> torch.dtype:
        return next(iter(stacked.values())).dtype

    def check_state(func: str, state, stacked, d: int) -> bool:
        """Raise unless ``state`` fits these checkpoints and ``d``; return True for the dual form."""
        if not isinstance(state, TRAKState):
            raise TypeError(_msg(func, "state", "the TRAKState returned by trak's prepare",
                                 type(state).__name__))
        C = num_checkpoints(stacked)
        n = None if state.train_features is None else state.train_features.shape[1]
        if n is not None and n < d and tuple(state.kernel.shape) == (C, n, n):
            return True
        if tuple(state.kernel.shape) != (C, d, d):
            raise ValueError(_msg(func, "state", f"a kernel of shape [C, d, d] = [{C}, {d}, {d}] "
                                  "(prepared with the same checkpoints and proj_dim)",
                                  f"{list(state.kernel.shape)}"))
        return False

    def train_rows(phi: Tensor, q: Tensor) -> WeightedRows:  # [C, b, d], [b]
        return WeightedRows(phi, q / phi.shape[0])

    def test_rows(K: Tensor, phi: Tensor) -> Tensor:  # [C, b, d] -> [C, b, d], rows K_c phi
        return phi @ K

    def cached_chunks(state: TRAKState, device):
        """Row ranges of the cached features and ``idx -> train rows``, ``C x rows x d`` about
        ``_CACHED_ENTRIES`` a block (256 to 4096 rows): bounds the widened copy of a bfloat16
        cache and the ``[rows, n_test]`` score block."""
        C, n, d = state.train_features.shape
        block = max(256, min(4096, _CACHED_ENTRIES // max(1, C * d)))
        feats, wts = state.train_features.to(device), state.train_weights.to(device)
        dtype = wts.dtype  # the params' dtype; a bfloat16 cache is widened block by block
        # 1-tuples: a list of bare tensors would read as ONE (x, y, ...) batch
        idx = [(torch.arange(s, min(n, s + block), device=device),)
               for s in range(0, n, block)]

        # One widening buffer for every block: a fresh block each time lets the C allocator's
        # dynamic thresholds keep freed copies resident. A block is used before the next is read.
        buf = None if feats.dtype == dtype else feats.new_empty((C, min(n, block), d), dtype=dtype)

        def rows(i):  # views of the cache, not an indexed copy (one sync per block)
            start, b = int(i[0][0]), i[0].shape[0]
            part = feats[:, start:start + b]
            return (part if buf is None else buf[:, :b].copy_(part)), wts[start:start + b]

        return idx, rows

    def score(params, state: TRAKState, train, test, *, top_k: int | None = None,
              largest: bool = True) -> Tensor | TopK:
        func = f"{name}.score"
        calls = setup(func, params)
        stacked, d, first, device = calls.stacked, calls.d, calls.first, calls.device
        dual = check_state(func, state, stacked, d)
        K = state.kernel.to(device)
        check_first(func, "test", first, test, device)
        if dual:
            check_cached_train(func, train, state.train_features.shape[1])
            check_optional_int(func, "top_k", top_k)
            test_phi = calls.collect(func, "test", test, device).to(K.dtype)
            feats, wts = state.train_features.to(device, K.dtype), state.train_weights.to(device)
            # K_c (Phi_c Psi_c^T): [C, n, n] x [C, n, m], summed over checkpoints
            S = torch.bmm(K, torch.bmm(feats, test_phi.mT)).sum(0)
            S.mul_((wts / K.shape[0])[:, None])
            return S if top_k is None else merge_topk(None, S, 0, top_k, largest)
        test_feats = test_rows(K, calls.collect(func, "test", test, device).to(K.dtype))
        if state.train_features is not None:
            check_cached_train(func, train, state.train_features.shape[1])
            idx, rows = cached_chunks(state, device)
            return stream_scores(lambda i: train_rows(*rows(i)), idx, test_feats, top_k=top_k,
                                 largest=largest, func=func)
        if train is None:
            raise ValueError(_msg(func, "train", "the training data (the state caches no "
                                  "features: cache_features=False)", "None"))
        check_first(func, "train", first, train, device)
        with calls.holding():
            return stream_scores(lambda b: train_rows(*split(calls.packed(b))),
                                 regrouped(func, "train", train, rows_min), test_feats,
                                 top_k=top_k, largest=largest, func=func)

    def self_score(params, state: TRAKState, train) -> Tensor:
        func = f"{name}.self_score"
        calls = setup(func, params)
        stacked, d, first, device = calls.stacked, calls.d, calls.first, calls.device
        dual = check_state(func, state, stacked, d)
        K = state.kernel.to(device)
        if dual:
            check_cached_train(func, train, state.train_features.shape[1])
            feats, wts = state.train_features.to(device, K.dtype), state.train_weights.to(device)
            # s_ii = sum_c [K_c Phi_c Phi_c^T]_ii / C * Qbar_i, row by row without the n x n
            return (torch.bmm(K, feats) * feats).sum((0, 2)) * (wts / K.shape[0])
        if state.train_features is not None:
            check_cached_train(func, train, state.train_features.shape[1])
            idx, rows = cached_chunks(state, device)
            blocks = (rows(i) for i in idx)
        elif train is None:
            raise ValueError(_msg(func, "train", "the training data (the state caches no "
                                  "features: cache_features=False)", "None"))
        else:
            check_first(func, "train", first, train, device)
            merged = iter_batches(func, "train", regrouped(func, "train", train, rows_min))
            blocks = (split(calls.packed(batch_to(b, device))) for b in merged
                      if batch_size(func, "train", b))
        with contextlib.nullcontext() if state.train_features is not None else calls.holding():
            return torch.cat([train_rows(phi, q).row_dots(test_rows(K, phi))
                              for phi, q in blocks])

    return Method(prepare, score, self_score, name)
