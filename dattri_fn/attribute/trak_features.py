"""TRAK's feature engine: projected output gradients and weights at every checkpoint, streamed.

One value per call, built from the params by :func:`feature_calls`: features from one ``vmap``
over stacked checkpoints (or factored layer gradients through the capture engine), projected by a
seeded ``R_c`` per checkpoint; data read once per checkpoint when the ``C`` dense ``R``'s would not
fit together.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import (
    _msg,
    all_finite,
    batch_size,
    batch_slice,
    batch_to,
    count_rows,
    is_batch,
    iter_batches,
    regrouped,
)
from .._types import Params
from ..transforms.grad import refusing
from ..transforms.kronecker import kronecker_layers, make_kronecker_projector
from ..transforms.layer_grads import (
    NonFiniteExamples,
    PlanDecisions,
    decided_plan,
    keep_tie_factors,
    layer_grads_stream,
    plan_decisions,
)
from ..transforms.project import make_projector
from . import trak_mlp
from .method import num_checkpoints, stack_checkpoints, stacked_per_sample_grad
from .pipeline import collect, in_chunks
from .trak_errors import (
    NonFiniteGradient,
    _bad_column,
    _check_finite,
    _dense_cause,
    _refusal_cause,
    named,
)

_DENSE_ENTRIES = 2**21  # up to this b * P (or R held), a checkpoint's [b, P] is densified
_ROW_BLOCK_ENTRIES = 2**16  # densified per projection call when R is held: rows x P entries
_MIN_BLOCK_ROWS = 128  # but at least this many rows (smaller GEMMs lose speed)
_HELD_BYTES = 2**22  # over this, the C dense R's of a pass are held one at a time


class Calls(NamedTuple):
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
    # () -> the decisions of the plan the features apply, once checked (for a prepared state);
    # None: no plan, or not checked yet (no batch of >= 2 examples read)
    plan: Callable = lambda: None
    # (func, arg, data, device, wts=None) -> [LayerGrads] per batch, unprojected and factored,
    # the weights written into wts; None unless output_fn is a FunctionalModel and d = P
    factors: Callable | None = None


class FeatureConfig(NamedTuple):
    """The settings of one :func:`trak` method that its feature engine reads."""

    output_fn: Callable
    weight_fn: Callable | None
    plan: object  # a LayerPlan when output_fn came as a FunctionalModel, else None
    keys: list | None  # that FunctionalModel's params keys
    proj_dim: int | None
    kind: str
    seed: int
    chunk_size: int | None
    rows_min: int | None  # batch_rows
    feature_dtype: torch.dtype | None
    projectors: dict  # (P, dtype, device, c) -> Projector, kept by the method
    weight_rows: Callable | None = None  # (params, batch) -> Q [b] in one forward (a model's loss)
    projection: str = "dense"  # "kronecker": per-layer P_out^T G P_in from the captured factors
    # Q = sigmoid(-m) from the margins m the capture pass computed (output_fn and weight_fn the
    # margin and its weight bridged from one module: trak._weight_follows), no weight forward
    weight_from_pass: bool = False


def feature_calls(func: str, params, cfg: FeatureConfig,
                  decisions: PlanDecisions | None = None) -> Calls:
    """Return the feature engine for ``params`` (one dict or a list of checkpoints) under ``cfg``.

    ``phi_c(z) = R_c^T grad f(theta_c; z)`` with ``R_c`` seeded ``cfg.seed + c`` (kept in
    ``cfg.projectors`` between calls) and ``Q`` averaged over checkpoints; see :func:`trak`.
    ``decisions``: the capture plan's check from a prepared state (``Calls.plan()`` of the
    call that prepared it): applied with no check; None: checked on the first batch of 2 or
    more examples read, then held.
    """
    output_fn, weight_fn, plan, keys = cfg.output_fn, cfg.weight_fn, cfg.plan, cfg.keys
    public = func.split(".")[0]  # trak.prepare -> trak: whose output_fn/weight_fn a refusal names
    proj_dim, chunk_size, rows_min, projectors = (cfg.proj_dim, cfg.chunk_size, cfg.rows_min,
                                                  cfg.projectors)
    stacked = stack_checkpoints(func, params)
    if keys is not None and list(stacked) != keys:
        raise ValueError(_msg(func, "params", f"the keys of output_fn's params {keys}",
                              f"{list(stacked)}"))
    v0 = next(iter(stacked.values()))
    P = sum(v[0].numel() for v in stacked.values())
    C = num_checkpoints(stacked)
    if cfg.projection == "kronecker" and (plan is None or proj_dim is None):
        raise ValueError(_msg(func, "projection", "'kronecker' with output_fn a FunctionalModel "
                              "with a capturable layer and an int proj_dim",
                              f"plan={'none' if plan is None else 'ok'}, proj_dim={proj_dim}"))
    fdt = v0.dtype if cfg.feature_dtype is None else cfg.feature_dtype
    if decisions is not None and plan is None:
        raise ValueError(_msg(func, "state", "a state without plan decisions (output_fn is a "
                              "plain function: no capture plan)", "plan decisions"))
    # an unchecked plan is checked on the first batch of >= 2 examples, then held; the Kronecker
    # projector below reads cfg.plan's layers either way (same projector, prepared or not)
    applied = plan if decisions is None else decided_plan(plan, decisions)
    if applied is not None and cfg.projection == "kronecker":  # ties read from their factors
        applied = keep_tie_factors(applied)
    # [apply, held] of the capture stream: replaced by the decided plan's once a plain MLP's
    # first batch has decided it (trak_mlp: no plan check), so no later batch checks again
    stream = [None, None] if applied is None else list(layer_grads_stream(applied))
    # a plain MLP with the margin: its passes by trak_mlp.margin_pass (the engine's bits);
    # an unchecked plan is decided by its first batch of >= 2 examples there
    mlp = [None if applied is None or cfg.projection == "kronecker" else
           trak_mlp.pass_plan(applied)]
    # the stream hands back its passes' per-example losses (here the margins) where it ran
    # them (layer_grads_stream's apply(losses=...))
    from_pass = cfg.weight_from_pass and stream[0] is not None and weight_fn is not None

    def captured(sub: Params, batch, losses: list | None):
        """The stream's gradients of ``batch`` at ``sub``; ``losses`` (a list, or None)
        receives the passes' per-example margins ``[b]`` per checkpoint where they ran."""
        losses = losses if from_pass else None
        held = None if mlp[0] is None else stream[1]()
        if held is not None and (not held.checked or trak_mlp.fast_plan(held)):
            # unchecked: the first batch decides mlp[0], the certified plan (trak_mlp)
            lg = trak_mlp.margin_pass(held if held.checked else mlp[0], sub, batch, losses,
                                      first=not held.checked)
            if lg is not None:
                if not held.checked:
                    stream[:] = layer_grads_stream(mlp[0])
                return lg
        try:
            if losses is None:
                return stream[0](sub, batch)
            return stream[0](sub, batch, losses=losses)
        except NonFiniteExamples as err:
            # the plan check refuses examples whose autodiff gradients are not finite: named
            # as this call's data, with the parameter, as every later batch's scan names it
            raise _refusal_cause(output_fn, sub, batch) or err from err

    def decided() -> PlanDecisions | None:
        held = stream[1]
        return None if held is None or not held().checked else plan_decisions(held())

    def kronecker_projector(c: int):  # seed + c per checkpoint, as the dense projector's
        key = ("kronecker", tuple((k, tuple(v.shape[1:])) for k, v in stacked.items()),
               v0.dtype, v0.device, c)
        if key not in projectors:
            layers, rest = kronecker_layers(plan, {k: v[0] for k, v in stacked.items()})
            # its factors drawn once in the params' dtype, on their device (review R2 F2)
            projectors[key] = make_kronecker_projector(layers, proj_dim=proj_dim, kind=cfg.kind,
                                                       seed=cfg.seed + c, rest=rest,
                                                       dtype=v0.dtype, device=v0.device)
        return projectors[key]

    def projector(c: int):  # kept by the method: a rademacher R's packed signs persist
        key = (P, v0.dtype, v0.device, c)
        if key not in projectors:
            projectors[key] = make_projector(P, proj_dim=proj_dim, kind=cfg.kind, seed=cfg.seed + c,
                                             dtype=v0.dtype, device=v0.device)
        return projectors[key]

    kron = [kronecker_projector(c) for c in range(C)] if cfg.projection == "kronecker" else None
    projs = None if proj_dim is None or kron is not None else [projector(c) for c in range(C)]
    d = P if proj_dim is None else proj_dim if kron is None else kron[0].proj_dim

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

    def feature_rows(batch, buffers: list | None = None, one: int | None = None,
                     into: Tensor | None = None, hold_each: bool = False,
                     losses: list | None = None):
        """Yield ``[b, d]`` in fdt per checkpoint; ``one``: that checkpoint only. ``into``: the
        ``[C or 1, b, d]`` rows of a cache; unprojected factored rows are written there (no
        ``[C, b, P]`` temporary) and nothing is yielded. ``hold_each``: the caller holds no R;
        each checkpoint's dense R is held while its own rows are projected. ``losses``: a list
        that receives the capture passes' margins ``[b]`` per checkpoint (:func:`captured`)."""
        sub, plist = (stacked, projs) if one is None else (
            {k: v[one:one + 1] for k, v in stacked.items()}, None if projs is None else [projs[one]])
        lg = None if stream[0] is None else captured(sub, batch, losses)
        if kron is not None:  # never [b, P]: each layer's factors meet its own P_in, P_out
            for c in range(lg.dense.shape[0]):
                raw = kron[c if one is None else one].layer_grads(lg.select(c))[0]
                phi = raw.to(fdt)
                if not all_finite(phi):  # a NaN/inf or too-wide gradient, or the projection's
                    raise _dense_cause(lg.select(c), fdt)
                yield phi
            return
        if lg is not None and plist is not None:
            b = lg.num_rows
            buffers = [] if buffers is None else buffers  # one densified block per call at most
            for c, proj in enumerate(plist):
                lc = lg.select(c)
                dest = None if into is None else into[c]
                if proj.holdable or b * P <= _DENSE_ENTRIES:  # densified, then projected:
                    # by blocks of rows when R is held dense (the block stays small), each
                    # projected straight into its rows of the result (the cache, when given)
                    rb = max(_MIN_BLOCK_ROWS, _ROW_BLOCK_ENTRIES // P) if proj.holdable else b
                    if dest is None:
                        dest = v0.new_empty((b, proj.proj_dim), dtype=fdt)
                    with holding(c if one is None else one) if hold_each else \
                            contextlib.nullcontext():
                        for r in range(0, b, rb):
                            m = min(rb, b - r)
                            X = lc.rows(r, r + m).to_dense(fdt, out=dense_buffer(buffers, m))[0]
                            proj.apply_columns(lambda s, e, X=X: X[:, s:e], m, dtype=fdt,
                                               device=v0.device, out=dest[r:r + m])
                            del X
                else:  # one checkpoint's columns per projector step: never [b, P]
                    dest = proj.apply_columns(lambda s, e, lc=lc: lc.columns(s, e)[0].to(fdt),
                                              b, dtype=fdt, device=v0.device, out=dest)
                if not all_finite(dest):  # b*d, not b*P: the blocks skip the projector's scan
                    raise _dense_cause(lc, fdt)
                if into is None:  # written into the cache rows, else yielded
                    yield dest
                del dest  # not alive while the next checkpoint is projected
            return
        if lg is not None:  # unprojected: [b, P] each
            _check_finite(lg)
            # the products of finite factors, rounded into fdt, may still overflow (review R3 F4)
            rows = lg.to_dense(out=into) if into is not None else lg.to_dense(fdt)
            if not all_finite(rows):
                raise _dense_cause(lg, fdt)
            if into is None:
                yield from rows
            return
        G = stacked_per_sample_grad(output_fn, sub, batch, refuse=(public, "output_fn"))  # [C, b, P]
        if not all_finite(G):  # named here: the projector's own scan would name itself
            raise NonFiniteGradient(_bad_column(G, sub))
        if G.dtype != fdt:  # checked before the cast too: finite values may overflow fdt
            G = G.to(fdt)
            if not all_finite(G):
                raise NonFiniteGradient(_bad_column(G, sub), fdt)
        if plist is None:
            yield from G
            return
        for proj, g in zip(plist, G, strict=True):  # g checked above: no second scan of [b, P]
            phi = proj.apply_columns(lambda s, e, g=g: g[:, s:e], g.shape[0], dtype=fdt,
                                     device=g.device)
            if not all_finite(phi):  # every gradient fits fdt, R^T g does not
                raise NonFiniteGradient(None, fdt)
            yield phi

    def features(batch, one: int | None = None, losses: list | None = None) -> Tensor:
        """``[C, b, d]`` in fdt (``[1, b, d]`` for ``one``); ``losses``: as feature_rows'."""
        # rows written in place (no list of [b, d] blocks stacked), each R_c held only while
        # its own rows are projected: one dense R alive at a time
        out = v0.new_empty((C if one is None else 1, batch_size("features", "batch", batch), d),
                           dtype=fdt)
        i = 0
        for phi in feature_rows(batch, [], one, out, True, losses):
            out[i] = phi
            i += 1
            del phi
        return out

    def weights(batch, b: int, margins: list | None = None) -> Tensor:  # Qbar [b], params' dtype
        """``margins``: the capture passes' per-checkpoint margins of ``batch`` where all C
        were recorded (then ``Q_c = sigmoid(-m_c)``, the same ops on the same logits as the
        weight forward: the same bits); otherwise that forward runs."""
        if weight_fn is None:
            return torch.ones(b, dtype=v0.dtype, device=v0.device)
        if margins is not None and len(margins) == C and all(m.shape == (b,) for m in margins):
            # per checkpoint, as the weight forward does: elementwise ops on a [C * b] stack
            # could round its vectorised tail differently
            return torch.stack([torch.sigmoid(-m) for m in margins]).to(v0.dtype).mean(0)
        if cfg.weight_rows is not None:  # one batched forward per checkpoint, no vmap
            return torch.stack([cfg.weight_rows({k: v[c] for k, v in stacked.items()}, batch)
                                for c in range(C)]).to(v0.dtype).mean(0)
        per_ckpt = lambda p: vmap(weight_fn, in_dims=(None, 0))(p, batch)
        with refusing((public, "weight_fn")):  # the remedy: weight_fn a FunctionalModel (above)
            return vmap(per_ckpt)(stacked).to(v0.dtype).mean(0)

    def packed(batch) -> Tensor:  # [C, b, d + 1] in the params' dtype: features, then Q
        margins = [] if from_pass else None
        G = features(batch, losses=margins).to(v0.dtype)
        Q = weights(batch, G.shape[1], margins)
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
        with named(func, arg):
            return _collect_features(func, arg, data, device)

    def _collect_features(func: str, arg: str, data, device) -> Tensor:
        data = regrouped(func, arg, data, rows_min)
        if not by_checkpoint(data):
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
        # One call for the whole pass (one batch, no chunks): each R_c is then held only while
        # its own checkpoint is projected, not all C at once (the same R, unpacked as often)
        total = feats.shape[1]
        one_call = (chunk_size is None or chunk_size >= total) and (
            is_batch(data) or (rows_min is not None and total <= rows_min)
            or (isinstance(data, (list, tuple)) and len(data) == 1))
        # A pass over one checkpoint holds its R throughout; a pass over all of them holds
        # each R_c only while its own rows are projected (one dense R alive, unpacked once per
        # batch and checkpoint).
        hold_pass = c is not None and not one_call
        with named(func, "train"), holding(c) if hold_pass else contextlib.nullcontext():
            for batch in iter_batches(func, "train", data):
                batch = batch_to(batch, v0.device)
                b = batch_size(func, "train", batch, first=n)
                step = b if chunk_size is None else chunk_size
                for s in range(0, b, step):
                    part = batch if step >= b else batch_slice(batch, s, s + step)
                    rows = slice(n + s, n + min(b, s + step))
                    into = feats[:, rows] if c is None else feats[c:c + 1, rows]
                    # not enumerate: its reused result tuple would keep these rows alive while
                    # the next checkpoint's are formed
                    i = 0
                    margins = [] if from_pass and c is None else None  # all C passes run here
                    for phi in feature_rows(part, buffers, c, into, not hold_pass, margins):
                        feats[i if c is None else c, rows] = phi
                        i += 1
                        del phi
                    if not c:  # None or 0: the weights, once
                        wts[rows] = weights(part, rows.stop - rows.start, margins)
                n += b
        return feats if c is None else feats[c:c + 1]

    def factor_rows(func: str, arg: str, data, device, wts: Tensor | None = None) -> list:
        """The unprojected gradients of every row of ``data`` as captured, by batch (and
        ``chunk_size`` rows), in order: factored :class:`LayerGrads`, never ``[C, b, P]``;
        ``wts``: the ``[n]`` weights written there too."""
        with named(func, arg):
            return _factor_rows(func, arg, data, device, wts)

    def _factor_rows(func: str, arg: str, data, device, wts: Tensor | None) -> list:
        out, n = [], 0
        for batch in iter_batches(func, arg, regrouped(func, arg, data, rows_min)):
            batch = batch_to(batch, device)
            b = batch_size(func, arg, batch, first=n)
            step = b if chunk_size is None else chunk_size
            for s in range(0, b, step):
                part = batch if step >= b else batch_slice(batch, s, s + step)
                margins = [] if from_pass and wts is not None else None
                lg = captured(stacked, part, margins)
                _check_finite(lg)
                out.append(lg)
                if wts is not None:
                    wts[n + s:n + s + lg.num_rows] = weights(part, lg.num_rows, margins)
            n += b
        return out

    factored = stream[0] is not None and projs is None and kron is None and fdt == v0.dtype
    return Calls(stacked, in_chunks(packed, chunk_size), collect_features, fill, by_checkpoint,
                 holding, d, {k: v[0] for k, v in stacked.items()}, v0.device, fdt, decided,
                 factor_rows if factored else None)
