"""Influence's ``score`` and ``self_score`` over a prepared state.

Test gradients are preconditioned once; training rows stream through the shared pipeline
either as raveled gradients (:func:`train_side`) or, for K-FAC/EK-FAC on the model itself,
layer by layer from the captured ``(a, g)`` of each batch (:func:`layer_side`), through the
capture held in the state. Used by :func:`~dattri_fn.attribute.influence.influence`.
"""

from __future__ import annotations

import torch

from .._checks import _msg, batch_leaves, batch_size, check_params, regrouped
from .._types import Loss, Params
from ..operators import kfac
from ..operators.kfac_stats import _tokens as kfac_tokens
from ..transforms.grad import per_sample_grad_unchecked
from ..transforms.layer_grads import LayerPlan, layer_grads_fn
from ..tree import ravel_batched
from . import train_print
from .influence_config import InfluenceConfig, InfluenceEnsembleState, InfluenceState, checkpoints
from .influence_layers import (  # noqa: F401 (moved at stop 25)
    _NOT_CALLED,
    _flat_rows,
    _Retaps,
    _unreached,
    _unread,
    _without_uncalled,
    layer_pass,
)
from .method import device_of
from .pipeline import collect, in_chunks, stream_scores, stream_self


def _relatif_scale(kind: str, G: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Return ``1 / n_i`` per row: ``n_i = sqrt|g_i^T Q_i|`` ("l") or ``|Q_i|`` ("theta"),
    with ``Q_i = (C + damping I)^-1 g_i``; 0 where ``n_i = 0`` (a zero gradient scores 0).  # [B]"""
    sq = (G * Q).sum(1).abs() if kind == "l" else (Q * Q).sum(1)
    pos = sq > 0
    return torch.where(pos, sq.where(pos, 1).rsqrt(), 0)


def _grad_rows(fn: Loss, plan: LayerPlan | None, l2: float, params: Params, stream=None,
               arg: str = "loss"):
    """Return ``batch -> [B, P]`` raveled per-example gradients of ``fn + l2 |p|^2``.

    With a plan, Linear layers come from one batched backward (``l2`` added as ``2 l2 p``);
    without, ``fn`` already holds the ``l2`` term and ``vmap(grad)`` does it. ``stream``: a
    :func:`~dattri_fn.transforms.layer_grads.layer_grads_fn` of ``plan`` shared with the other
    side of this call (:func:`shared_stream`), else one of its own. ``arg``: the argument
    ``fn`` came from, which its errors name (``influence(target=...)``).
    """
    if plan is None:
        # no loop to fall back to: vmap's refusal of the model is named (RU2 M2)
        return lambda b: ravel_batched(per_sample_grad_unchecked(fn, params, b,
                                                                 refuse=("influence", arg)))
    stacked = {k: v[None] for k, v in params.items()}
    shift = 2 * l2 * torch.cat([v.reshape(-1) for v in params.values()]) if l2 else None
    # checked on the stream's first batch of >= 2 examples, then held
    layer_grads = layer_grads_fn(plan) if stream is None else stream

    def rows(b):
        G = layer_grads(stacked, b).to_dense()[0]
        return G if shift is None else G.add_(shift)

    return rows


class _Formed:
    """Scores already formed for a training batch, in the pipeline's structured-rows protocol
    (``scores`` / ``row_dots`` return them whatever the other side)."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def scores(self, other) -> torch.Tensor:
        return self.values

    def row_dots(self, other) -> torch.Tensor:
        return self.values


def shared_stream(cfg: InfluenceConfig):
    """One gradient stream for both sides of a score/self_score call and every checkpoint when
    they share a plan (no ``target``): its plan is checked once, on the first batch of 2 or
    more examples it gets (a checked plan holds for any batch and params); None otherwise."""
    return layer_grads_fn(cfg.plan) if cfg.plan is not None and cfg.plan_t is cfg.plan else None


def grads(cfg: InfluenceConfig, params: Params, test: bool = False, stream=None):
    """``batch -> [B, P]`` train gradients of ``loss + l2 |p|^2`` (``test``: of the target),
    ``chunk_size`` rows at a time; ``stream``: from :func:`shared_stream`."""
    # Params are validated here, once per public call; batches by collect/stream_*.
    name = cfg.name
    check_params(name, "params", params)
    fn_plan = cfg.plan_t if test else cfg.plan
    if fn_plan is not None and list(params) != list(fn_plan.model.params):
        raise ValueError(f"{name}(params=...): expected the keys of the model's params "
                         f"in this order {list(fn_plan.model.params)}, got {list(params)}.")
    rows = (_grad_rows(cfg.test_fn, cfg.plan_t, 0.0, params, stream,
                       "loss" if cfg.target is None else "target") if test
            else _grad_rows(cfg.train_fn if cfg.plan is None else cfg.base, cfg.plan, cfg.l2,
                            params, stream))
    return in_chunks(rows, cfg.chunk_size)


def _check_state(name: str, state, params) -> Params:
    """``params`` checked against ``state``, in the key order ``prepare`` laid the state out in
    (``state.keys``): the same keys in another order are reordered (a plain ``loss(params,
    example)`` ravels in the dict's order, so the same dict reordered would meet another
    layout); other keys are refused, naming ``params``."""
    if not isinstance(state, InfluenceState):
        raise TypeError(f"{name}(state=...): expected the InfluenceState returned by "
                        f"prepare, got {type(state).__name__}.")
    keys = getattr(state, "keys", None)
    if keys is not None and isinstance(params, dict) and tuple(params) != keys:
        if len(params) != len(keys) or set(params) != set(keys):
            raise ValueError(_msg(name, "params", f"the keys the state was prepared with "
                                  f"{list(keys)} (in any order)", f"{list(params)}",
                                  "Score with the params the state was prepared with."))
        params = {k: params[k] for k in keys}
    P = sum(v.numel() for v in check_params(name, "params", params).values())
    if P != state.ihvp.dim:
        raise ValueError(f"{name}(params=...): expected params of the model the state was "
                         f"prepared with (P = {state.ihvp.dim}), got P = {P}. Prepare the "
                         f"state with these params.")
    return params


def pairs(name: str, params, state) -> list[tuple[Params, InfluenceState]]:
    """``[(params_c, state_c)]`` for one checkpoint or an ensemble, checked against each
    other."""
    ckpts = checkpoints(name, params)
    if ckpts is None:
        if isinstance(state, InfluenceEnsembleState):
            raise TypeError(f"{name}(params=...): expected the list of "
                            f"{len(state.states)} checkpoints the InfluenceEnsembleState "
                            "was prepared with, got one params dict.")
        return [(_check_state(name, state, params), state)]
    if not isinstance(state, InfluenceEnsembleState):
        raise TypeError(f"{name}(state=...): expected the InfluenceEnsembleState that "
                        f"prepare returns for a list of checkpoints, got "
                        f"{type(state).__name__}.")
    if len(state.states) != len(ckpts):
        raise ValueError(f"{name}(params=...): expected the {len(state.states)} "
                         f"checkpoints the state was prepared with, got {len(ckpts)}.")
    return [(_check_state(name, st, p), st) for p, st in zip(ckpts, state.states, strict=True)]


class _Cursor:
    """The first training row of the next batch in one pass over ``train`` (the pipeline
    takes the batches in order, once each): where RelatIF's prepared row scales resume."""

    def __init__(self, name: str, n: int):
        self.name, self.n, self.at = name, n, 0

    def take(self, b: int) -> slice:
        """The rows of the next batch, of ``b`` examples."""
        if self.at + b > self.n:
            raise ValueError(_msg(self.name, "train", f"the {self.n} training examples the "
                                  "state was prepared with (RelatIF's row scales are per "
                                  "training row)", f"more than {self.n}"))
        self.at += b
        return slice(self.at - b, self.at)

    def done(self) -> None:
        if self.at != self.n:
            raise ValueError(_msg(self.name, "train", f"the {self.n} training examples the "
                                  "state was prepared with (RelatIF's row scales are per "
                                  "training row)", f"{self.at}"))


def train_side(cfg: InfluenceConfig, ps, scales: bool, stream=None):
    """``(batch -> [B, C P], cursor)``: per checkpoint ``g_i / C``; RelatIF: also ``/ n_i``,
    from the state's row scales (``scales``; ``cursor`` then checks the row count after the
    pass) or from one more inverse application per batch."""
    fns = [(grads(cfg, p, stream=stream), st) for p, st in ps]
    weight = 1.0 / len(ps)
    scaled = scales and cfg.relatif is not None and all(st.row_scale is not None for _, st in ps)
    cursor = _Cursor(cfg.name, len(ps[0][1].row_scale)) if scaled else None

    def rows(b):
        parts, at = [], cursor.take(batch_size(cfg.name, "train", b)) if scaled else None
        for g, st in fns:
            G = g(b)
            if scaled:
                G = G * st.row_scale[at, None]
            elif cfg.relatif is not None:  # one more inverse application
                G = G * _relatif_scale(cfg.relatif, G, st.ihvp(G))[:, None]
            parts.append(G if len(fns) == 1 else G * weight)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    return rows, cursor


def test_side(cfg: InfluenceConfig, ps, stream=None):
    """``batch -> [B, C P]``: per checkpoint ``(C_c + damping I)^-1 g_j``."""
    fns = [(grads(cfg, p, test=True, stream=stream), st.ihvp) for p, st in ps]

    def rows(b):
        parts = [ihvp(g(b)) for g, ihvp in fns]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    return rows


def captured_test(cfg: InfluenceConfig, ps) -> bool:
    """Whether the test gradients can come from the states' captures (:func:`captured_grads`):
    K-FAC/EK-FAC on the model's own loss (no ``target``), no tied weight and a capture held in
    each state (params in the inverse's diagonal block take their autodiff rows there, as on
    the training side)."""
    return cfg.layered and cfg.target is None and all(
        st.tap is not None and not getattr(st.tap, "tied", ())
        and getattr(st.ihvp, "ravel", None) is not None for _, st in ps)


def captured_grads(cfg: InfluenceConfig, p: Params, st: InfluenceState,
                   looped: list | None = None):
    """``batch -> [B, P]`` test gradients ``DW_j = sum_t g_jt a_jt^T`` per layer (bias: ``a``
    augmented with ones) from the state's captured forward (:func:`layer_pass`), and the
    autodiff rows of the inverse's diagonal groups, raveled by the inverse's layout.

    The same rows as the layer-gradient plan's (:func:`grads` with ``test=True``) with no plan
    check (one autograd pass over per-example parameter copies, ~6 ms on digits-lr): the
    capture was built for these params in ``prepare``. With one token per example (``T = 1``)
    each entry is one product, as the plan's: bit for bit on the digits tasks. ``looped``: as
    :func:`layer_pass`'s, shared with the training side of the call. ``p``: params that
    :func:`pairs` checked in this call (no second finiteness scan of the same tensors).
    """
    QA = st.ihvp.eigen[0]
    looped = [] if looped is None else looped  # vmap's refusal: one warning per call

    def rows(b):
        parts: dict[str, dict[int, torch.Tensor]] = {}

        def step(start, layer, a, g):
            if a is None:  # a diagonal group: its autodiff gradient rows [b, p]
                parts.setdefault(layer, {})[start] = g
                return
            a, g = kfac_tokens(a, g, QA[layer].shape[0] == a.shape[-1] + 1)
            parts.setdefault(layer, {})[start] = g.mT @ a  # [b, T, o], [b, T, i] -> [b, o, i]

        layer_pass(cfg, p, st, b, step, looped, arg="test")
        return st.ihvp.ravel({layer: r[0] if len(r) == 1 else torch.cat([r[k] for k in sorted(r)])
                              for layer, r in parts.items()})

    return rows


def layer_side(cfg: InfluenceConfig, ps, test_f: torch.Tensor, looped: list | None = None):
    """``batch -> [B, n]`` (``[B, L n]`` per layer) scores against ``test_f`` (``[n, C
    P]``), layer by layer (:func:`~dattri_fn.operators.kfac.layer_scores`) as each layer's
    ``g`` arrives: no ``[B, P]`` gradient matrix."""
    l2 = cfg.l2
    sizes = [st.ihvp.dim for _, st in ps]
    offsets = [sum(sizes[:c]) for c in range(len(ps))]
    blocks = [st.ihvp.blocks(test_f[:, o:o + P]) for (_, st), o, P in zip(ps, offsets, sizes,
                                                                           strict=True)]
    if cfg.query_rank is not None:  # kronfluence's low-rank query gradients
        blocks = [kfac.low_rank_blocks(bl, cfg.query_rank) for bl in blocks]
    dense = lambda bl: bl[0] @ bl[1] if isinstance(bl, tuple) else bl  # noqa: E731
    # the l2 term 2 l2 <params, p_j> of every train row, split by layer
    extra = [{layer: (dense(bl) * sb).flatten(1).sum(1) for (layer, bl), sb in
              zip(blocks[c].items(), st.ihvp.blocks(2 * l2 * torch.cat(
                  [v.reshape(-1) for v in p.values()])[None]).values(), strict=True)}
             if l2 else None for c, (p, st) in enumerate(ps)]
    weight = 1.0 / len(ps)
    # vmap's refusal of the model: one warning per call (kfac_diag), shared with the test side
    looped = [] if looped is None else looped

    def rows_of(b):
        parts: dict[str, dict[int, torch.Tensor]] = {}
        for c, (p, st) in enumerate(ps):
            def step(start, layer, a, g, c=c):
                io = g if a is None else (a, g)  # a diagonal group: its gradient rows
                v = kfac.layer_scores({layer: io}, {layer: blocks[c][layer]},
                                      dtype=cfg.score_dtype)[layer]
                if extra[c] is not None:
                    v = v + extra[c][layer]
                if len(ps) > 1:
                    v = v * weight
                rows = parts.setdefault(layer, {})
                rows[start] = v if start not in rows else rows[start] + v

            layer_pass(cfg, p, st, b, step, looped)
        # (one chunk: its scores as they are, no one-piece cat copy)
        per = {layer: r[0] if len(r) == 1 and 0 in r else torch.cat([r[k] for k in sorted(r)])
               for layer, r in parts.items()}
        if cfg.per_layer:
            return _Formed(torch.cat([per[k] for k in ps[0][1].ihvp.parts], 1))
        # summed from the first layer's scores: sum()'s 0 + s_1 is a copy (equal values; a
        # -0.0 entry becomes +0.0 there, and == holds between them)
        it = iter(per.values())
        total = next(it)
        for v in it:
            total = total + v
        return _Formed(total)

    return rows_of


def store_given(train) -> bool:
    from ..store import FeatureStore, StoreRecording

    return isinstance(train, (FeatureStore, StoreRecording))


def same_rows(train, ps) -> bool:
    """Whether RelatIF's prepared row scales fit ``train``: its print (the same rows, in order;
    else one more inverse application per batch gives each row its own)."""
    return not store_given(train) and train_print.matches(train, ps[0][1].train_print)


def score(cfg: InfluenceConfig, params, state, train, test, *, top_k: int | None = None,
          largest: bool = True):
    """``influence(...).score``: ``g_i^T (C + damping I)^-1 g_j`` for every train ``i`` and
    test ``j``, the test side preconditioned once.  # -> [n_train, n_test] (or TopK, or
    {layer: [n_train, n_test]})"""
    name, rows = cfg.name, cfg.rows
    ps = pairs(name, params, state)
    layers = cfg.layered and not store_given(train)
    if cfg.per_layer and not layers:
        raise TypeError(_msg(name, "train", "training data (per-layer scores need each "
                             "batch's layers)", type(train).__name__))
    if cfg.per_layer and top_k is not None:
        raise ValueError(_msg(name, "top_k", "None with per_layer=True (rank the sum or "
                              "one layer's scores yourself)", repr(top_k)))
    # The inverse is applied to all n_test gradients at once: an iterative solver then
    # passes over the training data once per iteration, not once per test batch.
    looped: list = []  # vmap's refusal of the model, for both sides: one warning per call
    if layers and captured_test(cfg, ps):  # the test side from the state's capture: no check
        stream, fns = None, [captured_grads(cfg, p, st, looped) for p, st in ps]
    else:
        stream = shared_stream(cfg)  # one plan check for the call, not one per side/checkpoint
        fns = [grads(cfg, p, test=True, stream=stream) for p, _ in ps]
    parts = [st.ihvp(collect(fn, regrouped(name, "test", test, rows), device=device_of(p),
                             func=name, arg="test")) for fn, (p, st) in zip(fns, ps, strict=True)]
    test_f = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    side, cursor = ((layer_side(cfg, ps, test_f, looped), None) if layers
                    else train_side(cfg, ps, scales=same_rows(train, ps), stream=stream))
    S = stream_scores(side, regrouped(name, "train", train, rows), test_f,
                      top_k=top_k, largest=largest, func=name)
    if cursor is not None:
        cursor.done()
    if not cfg.per_layer:
        return S
    names = list(ps[0][1].ihvp.parts)
    return dict(zip(names, S.unflatten(1, (len(names), -1)).unbind(1), strict=True))


def record_key(cfg: InfluenceConfig, ps) -> dict:
    """What a self-score recorded to a store depends on beyond the params and the data (the
    store's own request): the settings and the inverse's factors, hashed with the record."""
    def setting(v):
        return v if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__

    settings = {k: setting(v) for k, v in sorted(cfg.options.items())}
    return {"settings": repr((cfg.solver, float(cfg.damping), setting(cfg.curvature),
                              float(cfg.l2), cfg.relatif, settings)),
            "factors": [st.factors for _, st in ps]}


def self_score(cfg: InfluenceConfig, params, state, train) -> torch.Tensor:
    """``influence(...).self_score``: the diagonal ``g_i^T (C + damping I)^-1 g_i`` (RelatIF:
    over ``n_i``) without the full matrix.  # -> [n_train]"""
    name = cfg.name
    ps = pairs(name, params, state)
    given = store_given(train)
    key = record_key(cfg, ps) if given else None
    data = regrouped(name, "train", train, cfg.rows)
    if cfg.layered and cfg.l2 == 0 and cfg.target is None and not given:
        looped: list = []  # vmap's refusal of the model: one warning per call (kfac_diag)

        def diag(b):
            total: list = []  # [n] self-scores of the batch, summed over layers and checkpoints

            for p, st in ps:
                def step(start, layer, a, g, st=st):
                    io = g if a is None else (a, g)  # a diagonal group: its gradient rows
                    v = kfac.layer_self_scores(st.ihvp, {layer: io}, layers=[layer])[layer]
                    if not total:  # (stream_self checked b, finite values included)
                        total.append(v.new_zeros(batch_leaves(b)[0].shape[0]))
                    total[0][start:start + len(v)] += v / len(ps)

                layer_pass(cfg, p, st, b, step, looped)
            return _Formed(total[0])

        return stream_self(diag, lambda b: _Formed(None), data, device=device_of(ps[0][0]),
                           func=name, state=key)
    stream = shared_stream(cfg)
    side, cursor = train_side(cfg, ps, scales=not given and same_rows(train, ps), stream=stream)
    S = stream_self(side, test_side(cfg, ps, stream), data, device=device_of(ps[0][0]), func=name,
                    state=key)
    if cursor is not None:
        cursor.done()
    return S
