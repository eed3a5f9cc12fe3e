"""SOURCE: influence through training by approximate unrolling over a few segments.

Split the run of a :class:`~dattri_fn.training.Record` into ``L`` segments of consecutive steps
(each holding some of its checkpoints). Within segment ``l`` treat the dynamics as stationary:
curvature ``H_l`` (Gauss-Newton or Hessian of the mean training loss, averaged over the
segment's checkpoints, plus ``damping`` and any coupled weight decay), a diagonal optimizer
preconditioner ``P_l`` (identity for SGD; ``1 / (sqrt(v_hat) + eps)`` from the segment's
averaged bias-corrected Adam second moments), decoupled weight decay ``wd`` (AdamW), and the
training gradient of ``z`` averaged over the segment's checkpoints, ``gbar_l(z)``. With
``A_l = P_l H_l + wd I`` and ``c_l`` the segment's summed learning rates (times ``1/(1 - mu)``
for SGD heavy-ball momentum ``mu``), up-weighting ``z`` by ``delta`` moves the segment's end by

    delta theta_end = exp(-c_l A_l) delta theta_start - (delta / N) (I - exp(-c_l A_l)) A_l^-1 P_l gbar_l(z)

(the continuous-time solution of ``theta' = -(P_l (H_l theta + gbar/N delta) + wd theta)``),
and the test loss at the final parameters by ``-delta/N sum_l q_l^T Seg_l gbar_l(z)`` with
``q_{L-1} = grad target(theta_T)`` and ``q_{l-1} = exp(-c_l A_l)^T q_l``. So

    scores[i, j] = (1/N) sum_l q_l(z_j)^T (I - exp(-c_l A_l)) A_l^-1 P_l gbar_l(z_i),

positive = up-weighting ``z_i`` lowers ``z_j``'s loss. Each segment is computed in the
whitened, symmetric form ``S_l = P^1/2 H_l P^1/2 + wd I = U diag(lambda) U^T``:
``Seg_l = P^1/2 U phi(lambda) U^T P^1/2`` with ``phi = (1 - e^{-c lambda}) / lambda`` and
``exp(-c A)^T = P^-1/2 U e^{-c lambda} U^T P^1/2``.

``unroll="power"`` replaces the exponentials by the discrete steps
``prod_k (1 - eta_k lambda)`` and ``phi = sum_k eta_k prod_{k' > k} (1 - eta_k' lambda)`` over
the segment's per-step rates: exact for full-batch gradient descent with a constant ``H``,
``P`` and training gradient within each segment (e.g. a quadratic loss with one checkpoint per
one-step segment, where it equals MAGIC's exact metagradient).

Approximations (the paper's): stationary curvature, preconditioner and gradients within a
segment, estimated from the segment's checkpoints; Adam's moments treated as fixed (their own
response to ``z`` is dropped, as is momentum beyond the ``1/(1-mu)`` rate scale); mini-batch
noise replaced by its expectation (``1/N`` per example per step). Steps before the first
checkpoint belong to segment 0. Curvature ``"gn"``/``"hessian"`` is dense (``[P, P]`` per
segment, one ``eigh``): models of up to a few thousand parameters. ``"ekfac"`` (SGD records)
takes the EK-FAC of each segment's MIDDLE checkpoint, or with ``pooled=True`` (the paper's) one
EK-FAC of all the segment's ``C_l`` checkpoints pooled: factors ``A = (1/C_l) sum_c A_c``,
``G = (1/C_l) sum_c G_c``, their eigenbases ``Q_A, Q_G``, and corrected eigenvalues
``Lambda = (1/C_l) sum_c E_n[(Q_G^T DW_{n,c} Q_A)^2]`` with every checkpoint's per-example
gradient blocks rotated into the pooled basis; ``phi`` and the decay act on
``Lambda + damping + wd`` in that Kronecker eigenbasis: no ``[P, P]`` matrix.

References:
    Bae, Lin, Lorraine & Grosse, "Training Data Attribution via Approximate Unrolled
    Differentiation", arXiv 2405.12186 (Eqs. for the segment terms; App. D for momentum and
    Adam).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import hessian, vmap

from .._checks import _msg, all_finite, batch_size, check_int, check_positive, iter_batches
from .._types import Loss, Params
from ..model import FunctionalModel, check_bridged
from ..training.record import Record, check_record
from ..transforms.grad import Refuse, refusing
from ..tree import ravel
from .method import Method, loss_and_plan, stacked_per_sample_grad
from .pipeline import collect, stream_scores, stream_self
from .source_blame import blame_train, finite
from .source_ekfac import _check_kronecker_only, _check_sampler, _pooled_ekfac


class SourceSegment(NamedTuple):
    """One segment: steps ``[start, stop)``, its checkpoints ``stacked {name: [C_l, ...]}``,
    ``root_p [P]`` (``P_l^1/2``), ``eigvals [P]``/``eigvecs [P, P]`` of ``S_l``, ``phi [P]`` and
    ``decay [P]`` (``e^{-c lambda}`` or its discrete form). With ``curvature="ekfac"``:
    ``eigvals``/``eigvecs`` are None, ``factors`` the segment's EK-FAC and ``phi``/``decay``
    ``{layer: [out, in(+1)]}`` on its eigenvalues."""

    start: int
    stop: int
    stacked: Params
    root_p: Tensor
    eigvals: Tensor | None
    eigvecs: Tensor | None
    phi: Tensor | dict
    decay: Tensor | dict
    factors: object = None


class SourceState(NamedTuple):
    """The segments (in step order), the final params ``theta_T`` and ``n_train``."""

    segments: tuple[SourceSegment, ...]
    final: Params
    n_train: int


def _hessian(loss: Loss, params: Params, data) -> Tensor:
    """Dense Hessian of the mean loss over every batch of ``data``.  # -> [P, P]"""
    flat0, unravel = ravel(params)
    total, n = None, 0
    for batch in iter_batches("source", "train", data):
        b = batch_size("source", "train", batch)
        f = lambda flat, batch=batch: vmap(loss, in_dims=(None, 0))(unravel(flat), batch).sum()  # noqa: E731
        with refusing(Refuse("source", "loss", capture=False)):  # every model is vmapped here
            h = hessian(f)(flat0)
        total = h if total is None else total + h
        n += b
    return total / n


def _gauss_newton(fm: FunctionalModel, params: Params, data) -> Tensor:
    from ..operators.gauss_newton import gauss_newton

    return gauss_newton(fm)(params, data).dense()


def _split(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` consecutive, nearly equal pieces (the first ones longer)."""
    q, r = divmod(n, parts)
    out, s = [], 0
    for p in range(parts):
        e = s + q + (p < r)
        out.append(range(s, e))
        s = e
    return out


def _spectral(eigvals: Tensor, lrs: Tensor, unroll: str) -> tuple[Tensor, Tensor]:
    """Return ``(phi, decay)`` of the segment on the eigenvalues.  # [P] -> [P], [P]"""
    if unroll == "exp":
        c = float(lrs.sum())
        x = c * eigvals
        zero = x == 0
        ratio = torch.where(zero, 1.0, -torch.expm1(-x) / torch.where(zero, 1.0, x))
        return c * ratio, torch.exp(-x)
    phi, decay = torch.zeros_like(eigvals), torch.ones_like(eigvals)
    for eta in lrs.tolist():
        step = 1 - eta * eigvals
        phi, decay = phi * step + eta, decay * step
    return phi, decay


def source(loss: Loss | FunctionalModel, *, segments: int = 3, curvature: str = "gn",
           damping: float = 0.0, unroll: str = "exp",
           target: Loss | FunctionalModel | None = None, fisher: str = "true",
           pooled: bool = False) -> Method:
    """Return SOURCE: ``scores[i, j] = (1/N) sum_l q_l(z_j)^T Seg_l gbar_l(z_i)``.

    ``params`` given to ``prepare``/``score``/``self_score`` is the
    :class:`~dattri_fn.training.Record` of the run (SGD with or without momentum, Adam or
    AdamW; see the module docstring for the segments, the approximation and ``unroll``).
    ``prepare(record, train)`` builds each segment's dense curvature on ``train`` (all ``N``
    training examples) at its checkpoints, and its eigendecomposition.  # -> [n_train, n_test]

    Args:
        loss: per-example training loss, or a FunctionalModel (needed for ``curvature="gn"``).
        segments: ``L``; the record's checkpoints before ``T`` are cut into ``L`` consecutive
            groups (at most one segment per checkpoint).
        curvature: ``"gn"`` (Gauss-Newton of the FunctionalModel's loss,
            :func:`~dattri_fn.operators.gauss_newton.gauss_newton`), ``"hessian"``, or
            ``"ekfac"`` (SGD records of a FunctionalModel whose params are all Linear-like
            layers: the EK-FAC of each segment's middle checkpoint,
            :func:`~dattri_fn.operators.kfac.ekfac_factors`, its matrix functions taken on the
            corrected eigenvalues; no ``[P, P]`` matrix, so for models of any size).
        damping: added to every ``H_l`` (the record's coupled weight decay is added too).
        unroll: ``"exp"`` (the paper's continuous-time segments) or ``"power"`` (discrete steps).
        target: test-side function whose DECREASE a positive score predicts (default ``loss``).
        fisher: ``curvature="ekfac"``'s Fisher, ``"true"`` (sampled labels, the Gauss-Newton
            in expectation) or ``"empirical"``.
        pooled: ``curvature="ekfac"`` only: one EK-FAC of the segment's checkpoints pooled (the
            module docstring; ``3 C_l`` passes over ``train`` per segment) instead of the middle
            checkpoint's (2 passes). ``"gn"``/``"hessian"`` always average every checkpoint.

    Memory: ``L`` dense ``[P, P]`` eigenbases; time: ``L`` ``eigh`` of ``[P, P]`` plus the
    curvature at every checkpoint.

    Example:
        >>> method = source(fm, segments=3)
        >>> state = method.prepare(record, train)
        >>> scores = method.score(record, state, train, test)     # [n_train, n_test]
    """
    name = "source"
    segments = check_int(name, "segments", segments)
    damping = check_positive(name, "damping", damping, allow_zero=True)
    if curvature not in ("gn", "hessian", "ekfac"):
        raise ValueError(_msg(name, "curvature", "'gn', 'hessian' or 'ekfac'", repr(curvature)))
    if unroll not in ("exp", "power"):
        raise ValueError(_msg(name, "unroll", "'exp' or 'power'", repr(unroll)))
    if fisher not in ("true", "empirical"):
        raise ValueError(_msg(name, "fisher", "'true' or 'empirical'", repr(fisher)))
    if not isinstance(pooled, bool):
        raise TypeError(_msg(name, "pooled", "a bool", type(pooled).__name__))
    if pooled and curvature != "ekfac":
        raise ValueError(_msg(name, "pooled", f"False with curvature={curvature!r} (its curvature "
                              "is always the mean over the segment's checkpoints)", "True"))
    model = loss if isinstance(loss, FunctionalModel) else None
    if curvature in ("gn", "ekfac"):  # both formed from module and loss_fn (review RG H3)
        check_bridged(name, "loss", model, f" with curvature='{curvature}'",
                      ", or pass curvature='hessian'")
    if curvature in ("gn", "ekfac") and model is None:
        raise TypeError(_msg(name, "loss", f"a FunctionalModel for curvature='{curvature}' (or "
                             "pass curvature='hessian')", type(loss).__name__))
    if curvature == "ekfac" and fisher == "true":
        _check_sampler(model.loss_fn)
    train_refuse = Refuse(name, "loss", capture=False)
    test_refuse = Refuse(name, "loss" if target is None else "target", capture=False)
    loss, _ = loss_and_plan(name, "loss", loss)
    target = loss if target is None else loss_and_plan(name, "target", target)[0]

    def prepare(params, train) -> SourceState:
        func = f"{name}.prepare"
        record = check_record(name, params)
        hp = record.optimizer
        kind = hp.get("name")
        T = record.steps
        ckpts = [c for c in record.checkpoints if c.step < T]
        if not ckpts:
            raise ValueError(_msg(name, "params", f"a Record with checkpoints before T = {T}",
                                  "none", "Record with checkpoint_every or checkpoint_steps."))
        L = min(segments, len(ckpts))
        groups = [[ckpts[i] for i in r] for r in _split(len(ckpts), L)]
        bounds = [0] + [g[0].step for g in groups[1:]] + [T]
        wd = float(hp.get("weight_decay", 0.0))
        coupled = wd if kind in ("sgd", "adam") else 0.0
        decoupled = wd if kind == "adamw" else 0.0
        rate_scale = 1.0 / (1.0 - float(hp.get("momentum", 0.0))) if kind == "sgd" else 1.0
        keys = list(record.final.params)
        n = 0
        for b in iter_batches(func, "train", train):  # a NaN/inf input named by its index
            n += batch_size(func, "train", b, first=n)
        if curvature == "ekfac" and kind != "sgd":
            raise ValueError(_msg(name, "curvature", "'gn' or 'hessian' for an Adam/AdamW record "
                                  "(its diagonal preconditioner has no Kronecker eigenbasis)",
                                  "'ekfac'"))
        def segment(li: int, group, data) -> tuple[SourceSegment | None, str | None]:
            """Segment ``li`` of ``data``, and what of it is not finite (None: all is)."""
            if curvature == "ekfac":
                try:
                    seg = _ekfac_segment(model, group, record, keys, data, bounds[li],
                                         bounds[li + 1], damping + coupled, rate_scale,
                                         fisher=fisher, unroll=unroll, pooled=pooled)
                except ValueError as err:  # the factors' refusal of non-finite data
                    if not str(err).startswith(("ekfac_factors(data=", "kfac_factors(data=")):
                        raise
                    return None, "its EK-FAC factors (" + str(err).split("): ", 1)[1] + ")"
                ok = finite(*seg.phi.values(), *seg.decay.values())
                return seg, None if ok else "its phi or decay"
            H = None
            for c in group:
                h = (_gauss_newton(model, c.params, data) if curvature == "gn"
                     else _hessian(loss, c.params, data))
                H = h if H is None else H + h
            H = H / len(group)
            P = H.shape[0]
            eye = torch.eye(P, dtype=H.dtype, device=H.device)
            H = H + (damping + coupled) * eye
            if kind in ("adam", "adamw"):
                root_p = _adam_root(record, group, keys, T)
            else:
                root_p = torch.ones(P, dtype=H.dtype, device=H.device)
            S = root_p[:, None] * H * root_p[None, :] + decoupled * eye
            try:
                eigvals, eigvecs = torch.linalg.eigh((S + S.T) / 2)
            except RuntimeError:  # LAPACK may refuse a NaN/inf matrix (or return NaN)
                if all_finite(S):
                    raise
                return None, "its curvature"
            lrs = record.lrs[bounds[li]:bounds[li + 1]].to(H.dtype) * rate_scale
            phi, decay = _spectral(eigvals, lrs, unroll)
            stacked = {k: torch.stack([c.params[k] for c in group]) for k in keys}
            seg = SourceSegment(bounds[li], bounds[li + 1], stacked, root_p, eigvals, eigvecs,
                                phi, decay)
            return seg, None if finite(eigvecs, phi, decay) else "its eigenvectors, phi or decay"

        out = []
        for li, group in enumerate(groups):
            seg, bad = segment(li, group, train)
            if bad is not None:  # (finite(...): the one check on normal data, issue 20)
                blame_train(func, loss, group, keys, train, li, bad,
                            lambda data, li=li, group=group: segment(li, group, data)[1] is None)
            out.append(seg)
        return SourceState(tuple(out), record.final.params, n)

    def _check(params, state):
        check_record(name, params)
        if not isinstance(state, SourceState):
            raise TypeError(_msg(name, "state", "the SourceState of source(...).prepare",
                                 type(state).__name__))

    def train_f(state: SourceState):
        def f(batch) -> Tensor:  # [L, B, P]: gbar_l(z)
            return torch.stack([stacked_per_sample_grad(loss, s.stacked, batch, refuse=train_refuse).mean(0)
                                for s in state.segments])
        return f

    def test_f(state: SourceState):
        final = {k: v[None] for k, v in state.final.items()}

        def f(batch) -> Tensor:  # [L, k, P]: Seg_l^T q_l / N
            q = stacked_per_sample_grad(target, final, batch, refuse=test_refuse)[0]  # [k, P]
            rows = []
            for s in reversed(state.segments):
                if s.factors is not None:
                    from ..operators.kfac import kfac_operator

                    rows.append(kfac_operator(s.factors._replace(Lambda=s.phi))(q) / state.n_train)
                    q = kfac_operator(s.factors._replace(Lambda=s.decay))(q)
                    continue
                coords = (s.root_p * q) @ s.eigvecs  # [k, P] in the eigenbasis of S_l
                rows.append(((coords * s.phi) @ s.eigvecs.T) * s.root_p / state.n_train)
                q = ((coords * s.decay) @ s.eigvecs.T) / s.root_p
            return torch.stack(rows[::-1])
        return f

    def device_of(state):
        return next(iter(state.final.values())).device

    def score(params, state: SourceState, train, test, *, top_k: int | None = None,
              largest: bool = True):
        _check(params, state)
        test_feats = collect(test_f(state), test, device=device_of(state), func=name, arg="test")
        return stream_scores(train_f(state), train, test_feats, top_k=top_k, largest=largest,
                             func=name)

    def self_score(params, state: SourceState, train):
        _check(params, state)
        return stream_self(train_f(state), test_f(state), train, device=device_of(state),
                           func=name, state=state)

    return Method(prepare, score, self_score, name)


def _ekfac_segment(model: FunctionalModel, group, record: Record, keys, train, start: int,
                   stop: int, shift: float, rate_scale: float, *, fisher: str,
                   unroll: str, pooled: bool = False) -> SourceSegment:
    from ..operators.kfac import ekfac_factors

    _check_kronecker_only(model, group[0].params)
    if pooled:
        factors = _pooled_ekfac(model, group, train, fisher)
    else:
        mid = group[len(group) // 2]
        # others="error": phi/decay are taken of Lambda only (a diagonal block would be skipped;
        # _check_kronecker_only has named such params in source's own terms)
        factors = ekfac_factors(model.module, model.loss_fn, mid.params, train, fisher=fisher,
                                others="error")
    if list(factors.param_names) != keys:
        raise ValueError(_msg("source", "curvature", "'ekfac' on a model whose params are all "
                              f"Linear-like layers, in order ({keys})",
                              f"EK-FAC over {list(factors.param_names)}"))
    lrs = record.lrs[start:stop] * rate_scale
    phi, decay = {}, {}
    for layer, lam in factors.Lambda.items():
        lam = lam + shift
        phi[layer], decay[layer] = _spectral(lam, lrs.to(lam.dtype), unroll)
    stacked = {k: torch.stack([c.params[k] for c in group]) for k in keys}
    return SourceSegment(start, stop, stacked, torch.ones(()), None, None, phi, decay, factors)


def _adam_root(record: Record, group: Sequence, keys: list[str], T: int) -> Tensor:
    """``P^1/2 = (sqrt(vbar_hat) + eps)^-1/2``, ``vbar_hat`` the mean bias-corrected second
    moment over the group's checkpoints with a step taken (else the next such checkpoint)."""
    have = [c for c in group if c.moments.count > 0]
    if not have:
        later = [c for c in record.checkpoints if c.step > group[-1].step and c.moments.count > 0]
        have = later[:1]
    b2, eps = float(group[0].moments.betas[1]), float(group[0].moments.eps)
    v = torch.stack([torch.cat([c.moments.nu[k].reshape(-1) for k in keys])
                     / (1 - b2 ** c.moments.count) for c in have]).mean(0)
    return (v.sqrt() + eps).rsqrt()


__all__ = ["SourceSegment", "SourceState", "source"]
