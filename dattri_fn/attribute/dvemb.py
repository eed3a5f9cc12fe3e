"""DVEmb: data value embeddings from the per-step gradients recorded during an SGD run.

A run of plain SGD (:class:`~dattri_fn.training.Record` with ``grads=`` stores, momentum 0)
takes at step ``t`` the batch ``B_t`` at ``theta_t`` with rate ``eta_t``. Up-weighting ``z`` in
step ``t``'s batch mean moves ``theta_{t+1}`` by ``-(eta_t / |B_t|) g_t(z) delta``, and every
later step ``k`` carries a perturbation by its Jacobian ``I - eta_k (H_k + wd I)`` (``wd`` the
record's coupled weight decay). DVEmb linearises the run with

    H_k = (1/|B_k|) sum_{z' in B_k} g_k(z') g_k(z')^T      (curvature="fisher", the paper's)
    H_k = Hessian of step k's batch mean loss at theta_k   (curvature="hessian", exact)

and embeds each training example as the sum over the steps ``t`` that read it of

    e(z) = sum_t (eta_t / |B_t|) [prod_{k = T-1 .. t+1} (I - eta_k (H_k + wd I))] g_t(z)

so that ``scores[i, j] = <e(z_i), grad target(theta_T, z_j)>`` (positive = up-weighting
``z_i`` lowers ``z_j``'s loss, to first order through the whole run). With
``curvature="hessian"`` this is exactly MAGIC's metagradient for plain SGD (the linearisation
of a step is its Jacobian); ``"fisher"`` needs only the recorded gradients. With projected
stores (``GradSpec(proj_dim=d)``) everything lives in the ``d``-dimensional space: ``g -> R^T g``
(``R`` the store's projector), the test gradients are projected with the same ``R``, and
``H_k`` is the Fisher of the projected gradients.

``projection=`` projects UNPROJECTED stores at ``prepare`` instead (dattri's DVEmb projects its
per-example gradients the same way): a seeded :class:`~dattri_fn.transforms.Projector` (the same
embeddings as stores recorded with its ``proj_dim``/``seed``/``kind``) or any dense ``[P, d]``
matrix ``R`` (``torch.eye(P)``: the exact, unprojected embeddings). Memory then drops from
``P^2 + n P`` to ``d^2 + n d``.

The embeddings are computed once in ``prepare`` by one backward sweep over the steps carrying
the product as a dense ``[d, d]`` matrix (memory ``d^2 + n d``, time ``O(T B d^2)``); scoring is
then one ``[n, d] x [d, n_test]`` product for any test set. The paper's score omits the
``1 / |B_t|`` (a constant for equal batches) and it compresses the product further; neither is
done here.

Note:
    The linearised run is stable only where ``eta_k lambda_max(H_k + wd I) < 2`` at every step.
    The recorded (empirical) Fisher's top eigenvalue can be many times the Hessian's: on
    digits-cnn trained by plain SGD at ``lr = 0.2`` it reached ``eta lambda = 15`` (51 of 160
    steps above 2), the product grew ~1e19 and DVEmb's LDS fell to 0.10 while the run itself
    was stable (MAGIC 0.62). Check ``eta * eigvalsh(G^T G / B)[-1]`` of the stores, or use
    ``curvature="hessian"`` on small models.

References:
    Wang, Mittal, Song & Jia, "Capturing the Temporal Dependence of Training Data Influence",
    arXiv 2412.09538 (data value embedding); dattri-LLM's ``DVEmbAttributor``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import hessian, vmap

from .._checks import _msg, batch_size, iter_batches
from .._types import Loss
from ..model import FunctionalModel
from ..training.record import Record, check_record
from ..training.run import take
from ..transforms.grad import Refuse, refusing
from ..tree import ravel
from .method import Method, loss_and_plan, stacked_per_sample_grad
from .pipeline import collect, merge_topk


class DVEmbState(NamedTuple):
    """``embeddings [n_train, d]``; ``projection`` ``{"proj_dim", "seed", "kind", "nnz"}`` of
    the seeded projection (of the stores or of ``dvemb(projection=...)``; ``proj_dim`` None:
    unprojected, ``d = P``), or ``{"matrix": R [P, d]}`` for a dense ``projection``."""

    embeddings: Tensor
    projection: dict


def _stores(func: str, record: Record) -> tuple[list, dict]:
    from ..store import open_store

    if len(record.grad_stores) != record.steps:
        raise ValueError(_msg(func, "params", "a Record with per-step gradient stores (start_record("
                              "..., grads=GradSpec(...)))",
                              f"{len(record.grad_stores)} stores for {record.steps} steps"))
    stores = [open_store(p) for p in record.grad_stores]
    cfg = stores[0].manifest["config"]
    return stores, {"proj_dim": cfg.get("proj_dim"), "seed": cfg.get("seed", 0),
                    "kind": cfg.get("projection", "rademacher"), "nnz": cfg.get("nnz", 1)}


def _check_projection(func: str, projection):
    from ..transforms.projector import Projector

    if projection is None or isinstance(projection, Projector):
        return projection
    if isinstance(projection, Tensor) and projection.ndim == 2 and projection.is_floating_point():
        return projection
    got = (f"a tensor of shape {list(projection.shape)}" if isinstance(projection, Tensor)
           else type(projection).__name__)
    raise TypeError(_msg(func, "projection", "None, a Projector (make_projector) or a floating "
                         "[P, d] matrix", got))


def _batch_hessian(loss: Loss, params, batch) -> Tensor:
    flat0, unravel = ravel(params)
    n = batch_size("dvemb", "train", batch)
    return hessian(lambda f: vmap(loss, in_dims=(None, 0))(unravel(f), batch).sum() / n)(flat0)


def dvemb(loss: Loss | FunctionalModel, *, curvature: str = "fisher",
          target: Loss | FunctionalModel | None = None, projection=None) -> Method:
    """Return DVEmb: ``scores[i, j] = <e(z_i), R^T grad target(theta_T, z_j)>``.

    ``params`` given to ``prepare``/``score``/``self_score`` is the
    :class:`~dattri_fn.training.Record` of a plain SGD run recorded with per-step gradient
    stores; ``prepare(record, train)`` returns the embeddings of the ``n`` examples of
    ``train`` (indexed as the record's batch rows; see the module docstring).
    # -> [n_train, n_test]

    Args:
        loss: per-example training loss, or a FunctionalModel (its ``loss``).
        curvature: ``"fisher"`` (the batch's recorded gradients) or ``"hessian"`` (the exact
            batch Hessian at every step: needs unprojected stores, a checkpoint at every step
            and the training data in ``prepare``).
        target: test-side function whose DECREASE a positive score predicts (default ``loss``).
        projection: project unprojected stores at ``prepare``: a
            :class:`~dattri_fn.transforms.Projector` of ``dim = P`` or a dense ``[P, d]``
            matrix (``curvature="fisher"`` only); None: use the stores as recorded.
    """
    name = "dvemb"
    if curvature not in ("fisher", "hessian"):
        raise ValueError(_msg(name, "curvature", "'fisher' or 'hessian'", repr(curvature)))
    # every model is vmapped here (no capture plan): a refusal names the argument to rewrite
    train_refuse = Refuse(name, "loss", capture=False)
    test_refuse = Refuse(name, "loss" if target is None else "target", capture=False)
    loss, _ = loss_and_plan(name, "loss", loss)
    target = loss if target is None else loss_and_plan(name, "target", target)[0]
    projection = _check_projection(name, projection)
    if projection is not None and curvature != "fisher":
        raise ValueError(_msg(name, "curvature", "'fisher' with a projection (the Hessian "
                              "is exact only unprojected)", repr(curvature)))

    def prepare(params, train) -> DVEmbState:
        record = check_record(name, params)
        hp = record.optimizer
        if hp.get("name") != "sgd" or float(hp.get("momentum", 0.0)) != 0.0:
            raise ValueError(_msg(name, "params", "a Record of plain SGD (momentum 0)",
                                  f"{hp.get('name')!r} with momentum {hp.get('momentum')}"))
        stores, proj = _stores(name, record)
        batches = list(iter_batches(name, "train", train))
        n = sum(batch_size(name, "train", b) for b in batches)
        wd = float(hp.get("weight_decay", 0.0))
        ckpts = {c.step: c for c in record.checkpoints}
        data = None
        if curvature == "hessian":
            if proj["proj_dim"] is not None:
                raise ValueError(_msg(name, "curvature", "'fisher' for projected gradient "
                                      "stores ('hessian' is exact only unprojected)",
                                      "'hessian'"))
            missing = [t for t in range(record.steps) if t not in ckpts]
            if missing:
                raise ValueError(_msg(name, "params", "a checkpoint at every step for "
                                      "curvature='hessian' (checkpoint_every=1)",
                                      f"none at steps {missing[:5]}"))
            from .._checks import batch_cat

            data = batch_cat(batches) if len(batches) > 1 else batches[0]
        project = None
        if projection is not None:
            P = stores[-1].read().shape[-1]
            if proj["proj_dim"] is not None:
                raise ValueError(_msg(name, "projection", "None for stores recorded projected "
                                      f"(proj_dim={proj['proj_dim']})", "a projection"))
            width = projection.dim if not isinstance(projection, Tensor) else projection.shape[0]
            if width != P:
                raise ValueError(_msg(name, "projection", f"an input dimension of P = {P}",
                                      f"{width}"))
            if isinstance(projection, Tensor):
                proj = {"matrix": projection}
                project = lambda G: G @ projection.to(G)
            else:
                proj = {"proj_dim": projection.proj_dim, "seed": projection.seed,
                        "kind": projection.kind, "nnz": projection.nnz}
                project = projection
        read = (lambda t: stores[t].read()) if project is None else (
            lambda t: project(stores[t].read()))
        G_last = read(record.steps - 1)
        d = G_last.shape[-1]
        dtype, device = G_last.dtype, G_last.device
        E = torch.zeros(n, d, dtype=dtype, device=device)
        prod = torch.eye(d, dtype=dtype, device=device)  # prod_{k > t} (I - eta_k (H_k + wd I))
        for t in range(record.steps - 1, -1, -1):
            G = read(t)  # [B_t, d]
            rows = record.order[t].to(device)
            eta, b = float(record.lrs[t]), G.shape[0]
            E.index_add_(0, rows, (eta / b) * (G @ prod.T))
            if curvature == "fisher":
                step = (prod @ G.T) @ G / b  # prod H_t
            else:
                with refusing(train_refuse):
                    H = _batch_hessian(loss, ckpts[t].params, take(data, record.order[t]))
                step = prod @ H
            prod = prod - eta * (step + wd * prod)
        return DVEmbState(E, proj)

    def _test_features(record: Record, state: DVEmbState):
        final = {k: v[None] for k, v in record.final.params.items()}
        projector = None
        if "matrix" in state.projection:
            R = state.projection["matrix"]
            projector = lambda G: G @ R.to(G)
        elif state.projection["proj_dim"] is not None:
            from ..transforms.project import make_projector

            P = sum(v.numel() for v in record.final.params.values())
            projector = make_projector(P, proj_dim=state.projection["proj_dim"],
                                       kind=state.projection["kind"],
                                       seed=state.projection["seed"],
                                       nnz=state.projection.get("nnz", 1),
                                       dtype=state.embeddings.dtype, packed=False)

        def f(fn):
            def feats(batch) -> Tensor:
                G = stacked_per_sample_grad(fn, final, batch, refuse=test_refuse)[0]
                return G if projector is None else projector(G)
            return feats

        return f

    def _check(params, state):
        record = check_record(name, params)
        if not isinstance(state, DVEmbState):
            raise TypeError(_msg(name, "state", "the DVEmbState of dvemb(...).prepare",
                                 type(state).__name__))
        return record

    def _rows(train, state):
        n = sum(batch_size(name, "train", b) for b in iter_batches(name, "train", train))
        if n != state.embeddings.shape[0]:
            raise ValueError(_msg(name, "train", f"the {state.embeddings.shape[0]} examples "
                                  "prepare embedded", f"{n}"))

    def score(params, state: DVEmbState, train, test, *, top_k: int | None = None):
        record = _check(params, state)
        _rows(train, state)
        Q = collect(_test_features(record, state)(target), test, func=name, arg="test")
        scores = state.embeddings @ Q.T.to(state.embeddings.dtype)
        return scores if top_k is None else merge_topk(None, scores, 0, top_k, True)

    def self_score(params, state: DVEmbState, train) -> Tensor:
        record = _check(params, state)
        _rows(train, state)
        Q = collect(_test_features(record, state)(target), train, func=name, arg="train")
        return (state.embeddings * Q.to(state.embeddings.dtype)).sum(-1)

    return Method(prepare, score, self_score, name)


__all__ = ["DVEmbState", "dvemb"]
