"""dattri 0.3.0's attributors configured like our recipes, and our side matched to their definitions.

Used by ``python -m benchmarks.run --against dattri``; dattri is an optional benchmark extra
(``pip install dattri_fn[bench]``), never a runtime dependency. Read from dattri 0.3.0's source
(site-packages ``dattri/algorithm/*.py``, ``dattri/func/{hessian,projection,fisher}.py``).

Orientation and sign. Every dattri attributor used here returns ``[n_train, n_test]`` with
"positive = proponent", the library's convention, so the conversion is the identity:

=============  ===================  =====================================================  ========
ours           dattri class         what dattri returns                                    convert
=============  ===================  =====================================================  ========
if-explicit    IFAttributorExplicit g_i^T (H + reg I)^-1 g_j (H of the loss it is given)  identity
if-cg          IFAttributorCG       same, ``max_iter`` CG steps from x0 = v, no tolerance  identity
if-lissa       IFAttributorLiSSA    g_i^T (H + scaling*damping I)^-1 g_j (LiSSA recursion) identity
if-arnoldi     IFAttributorArnoldi  <g_i V/sqrt(l), g_j V/sqrt(l)>, top-|l| Ritz pairs     identity
if-datainf     IFAttributorDataInf  DataInf per LAYER (weight+bias of a module together)  identity
if-ekfac       IFAttributorEKFAC    EK-FAC empirical Fisher of the target, damping on L    identity
grad-dot       TracInAttributor     sum_c w_c <g_i, g_j>, w = [1]                         identity
grad-cos       TracInAttributor     normalized_grad=True                                  identity
tracin         TracInAttributor     w = learning rate per checkpoint                      identity
trak           TRAKAttributor       ``attribute(test, train)`` (test FIRST) -> [n_tr, n_te] identity
rps            RPSAttributor        <f_i, f_j> alpha_i[y_j] after fine-tuning the head      identity
if-cg-ens      IFAttributorCG       mean over the C checkpoints of the CG scores            identity
tracin-cos     TracInAttributor     normalized_grad=True, w = learning rate per checkpoint identity
knn-shapley    KNNShapleyAttributor exact KNN-Shapley, returns [n_TEST, n_TRAIN]           .T
logra          LoGraAttributor      per layer phi^T (F + r tr(F)/d I)^-1 phi, F = eFIM     identity
factgrass      FactGraSSAttributor  mask -> Kronecker -> projection, same eFIM inverse      identity
if-kfac        (none in 0.3.0)      --                                                     --
=============  ===================  =====================================================  ========

Hyper-parameter mapping (ours -> dattri), weight decay ``wd`` of the task, extra ``damping``:

* influence: dattri differentiates the loss it is given, so it gets ``CE + 0.5 wd |theta|^2``
  (the train side of our recipes) and ``regularization = damping``; our matched side uses the
  Hessian of the same loss (``curvature="hessian"``, damping ``damping``), where our recipe uses
  the Gauss-Newton with damping ``wd + damping`` (identical for digits-lr, whose Hessian is its
  Gauss-Newton). Our matched explicit side factors ``H + damping I`` by LU
  (``method="lu"``): dattri solves that literal, indefinite system, where our default drops
  the non-positive directions. Explicit/CG/LiSSA need the WHOLE training set as ONE cached
  batch: dattri sums the inverse over cached batches (``vector_product += ihvp(batch)``)
  instead of averaging the curvature. It recomputes the inverse for every (train batch, test batch) pair.
* LiSSA: dattri iterates ``x <- v + (1 - d) x - Hx / s`` and returns ``x / s = (H + s d I)^-1 v``,
  so ``scaling = scale`` and ``damping = damping / scale``; same depth and mini-batch size. Its
  collate function casts every non-first tensor to float, labels included: the loss casts back.
* Arnoldi: ``proj_dim = rank``, same ``max_iter``, ``regularization = damping``.
* DataInf / EK-FAC: ``regularization`` / ``damping = wd + damping`` as our recipe.
* TRAK: dattri divides gradients by ``sqrt(P)`` before a ``proj_dim`` projection with
  ``E[R R^T] = I`` (as ours), so ``regularization = damping / P`` gives the same kernel; its
  projection is drawn afresh per checkpoint (seed + 1e5 * checkpoint), ours too (seed + c).
* TracIn / Grad-Dot / Grad-Cos: ours is exact (no projection); dattri ALWAYS projects (its
  ``projector_kwargs=None`` still applies a module-level default of ``proj_dim=512``, a dict it
  also mutates in place), so it gets ``proj_type="identity"`` to compute the same quantity.
* RPS: ``l2_strength = wd / 2``. dattri fine-tunes the head weight (no bias) towards the model's
  own softmax outputs for up to 3000 line-search steps and takes ``alpha`` from those soft
  labels; ours does the same (``refit="predictions"``, the bias folded in as a constant feature
  and regularised like the weight), solved to a gradient bound (closed-form Newton-CG for a
  linear softmax head, :func:`dattri_fn.attribute.representer_fit.fit_head`): the scores
  correlate at 0.997-1.000.
* a bare ``nn.Linear`` (digits-lr) is wrapped as ``Sequential(Identity(), Linear)`` for dattri:
  its EK-FAC and RPS address layers by submodule name. dattri loads every checkpoint INTO the
  module it is given, so it gets a copy.
* EK-FAC: dattri 0.3.0 rotates by eigenvector rows where ``eigh`` returns columns, and scrambles
  the ``[W | b]`` block of a layer with a bias; :func:`dattri_ekfac_fixed` repairs both on
  dattri's own factors, and :func:`diagnose` reports its correlation with ours.
* if-cg-ens: dattri averages its per-checkpoint scores (the mean ours takes); our matched side is
  influence over the list of checkpoints with the Hessian, as ``if-cg``.
* tracin-cos / knn-shapley: the same definitions (cosine per checkpoint weighted by the
  learning rate; Jia et al.'s recursion, K = 5 on the raw inputs, Euclidean distance).
* LoGra / FactGraSS (dattri's ``BlockProjectedIFAttributor``): every ``nn.Linear`` with its bias
  as an input column of ones (dattri 0.3.0 sets its compressors up from ONE example,
  ``batch[0][0]``, which a ``[B, in]`` model rejects: the model gets a front that adds the
  batch dim back, no parameters), the loss ``(model, batch, device) -> mean CE`` (dattri rescales the
  captured batch-mean gradients by the batch size: per-example gradients). dattri's ``damping``
  ``r`` adds ``r tr(F)/d`` to each layer's Fisher; ``r = 0.1`` is our default (a tenth of the
  mean eigenvalue). LoGra: ``proj_dim = k^2`` per layer, ``k`` per side both sides; dattri
  inverts the ``k^2 x k^2`` projected Fisher, ours its EK-FAC (projected factors, corrected
  eigenvalues): the same projection size, another curvature. FactGraSS: ``proj_dim`` per layer
  and ``blowup_factor``: ``k' = sqrt(blowup d)`` coordinates kept per factor (unscaled in
  dattri, ``sqrt(width / k')`` in ours: a constant per factor, cancelled by the relative
  damping), then dattri's CPU second stage is a Gaussian projection, ours a count-sketch.
"""

from __future__ import annotations

import atexit
import copy
import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

DATTRI_VERSION = "0.3.0"
# Methods with a dattri counterpart; if-kfac has none in 0.3.0 (only EK-FAC).
COUNTERPARTS = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "if-datainf", "if-ekfac",
                "grad-dot", "grad-cos", "tracin", "trak", "rps", "if-cg-ens", "tracin-cos",
                "knn-shapley", "logra", "factgrass")
# Our side runs a configuration other than the recipe's to compute dattri's quantity.
MATCHED = {"if-explicit": "hessian", "if-cg": "hessian", "if-lissa": "hessian",
           "if-arnoldi": "hessian", "if-cg-ens": "hessian"}
# LoGra: k per side (dattri: proj_dim = k^2 per layer); FactGraSS: d per layer, blowup.
LOGRA_K = 8
FACTGRASS_DIM, FACTGRASS_BLOWUP = 64, 4
BLOCK_DAMPING = 0.1  # dattri's relative damping; ours None: 0.1 tr(F)/d


class Runner(NamedTuple):
    """``prepare() -> state`` and ``score(state) -> scores [n_train, n_test]`` (our convention)."""

    prepare: Callable[[], Any]
    score: Callable[[Any], Tensor]


# dattri 0.3.0's attributors import these at import time; ``pip install --no-deps`` skips them.
DATTRI_IMPORTS = ("dattri", "tqdm", "yaml")
DATTRI_INSTALL = f"pip install --no-deps dattri=={DATTRI_VERSION} tqdm pyyaml"


def dattri_available() -> bool:
    """Return True when dattri and what its attributors import are installed (none imported)."""
    return all(importlib.util.find_spec(m) is not None for m in DATTRI_IMPORTS)


def dattri_version() -> str | None:
    """Return the installed dattri version, or None."""
    if not dattri_available():
        return None
    from importlib.metadata import version

    return version("dattri")


# ------------------------------------------------------------------------------- model, loss
def dattri_module(model: nn.Module) -> tuple[nn.Module, str | None]:
    """Return ``(module, name of its final nn.Linear or None)``; a bare Linear is wrapped (see
    the module doc). Only RPS needs the name (an ``nn.Sequential`` ending in ``nn.Linear``)."""
    if isinstance(model, nn.Linear):
        model = nn.Sequential(nn.Identity(), model)
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        return model, str(len(model) - 1)
    return model, None


def _as_batch(x: Tensor, y: Tensor, x_shape: tuple, y_shape: tuple,
              tokens: bool) -> tuple[Tensor, Tensor]:
    # dattri hands a loss one example as [*shape] (vmap in_dims 0) or [1, *shape] (in_dims 1);
    # its LiSSA collate function casts every tensor to float: labels and tokens are cast back.
    inputs = x.reshape(-1, *x_shape)
    return (inputs.long() if tokens else inputs), y.reshape(-1, *y_shape).long()


class Losses(NamedTuple):
    """The functions dattri's AttributionTask takes, ``(params dict, data) -> Tensor[]``."""

    train: Callable  # the task's mean loss + 0.5 wd |theta|^2 (every parameter)
    test: Callable  # the task's mean loss (cross-entropy; next-token cross-entropy for text-lm)
    margin: Callable  # TRAK's output of one example: log(p / (1 - p)), or minus the loss
    prob: Callable  # p_y of one example (TRAK's Q = 1 - p), or 0 (Q = 1) without classes
    head: Callable  # RPS: CE of pre-activations against soft labels


def make_losses(module: nn.Module, x_shape: tuple, y_shape: tuple, wd: float,
                loss_fn: Callable = F.cross_entropy, tokens: bool = False) -> Losses:
    """Return dattri-facing losses of ``module``: examples of ``x_shape`` (integer ``tokens`` or
    features), targets of ``y_shape`` (``()``: class labels, TRAK's margin and ``1 - p_y``;
    else, as our recipe, TRAK's output is minus the loss with ``Q = 1``)."""

    def test(params, data):
        x, y = _as_batch(*data, x_shape, y_shape, tokens)
        return loss_fn(functional_call(module, params, (x,)), y)

    def train(params, data):
        reg = sum((p * p).sum() for p in params.values())
        return test(params, data) + 0.5 * wd * reg

    def margin(params, data):
        if y_shape:
            return -test(params, data)
        x, y = _as_batch(*data, x_shape, y_shape, tokens)
        logits = functional_call(module, params, (x,))[0]
        # gather and a comparison: logits[y] and F.one_hot call .item(), which vmap rejects
        own = logits.gather(0, y)[0]
        mask = torch.arange(logits.shape[-1], device=logits.device) == y[0]
        return own - logits.masked_fill(mask, float("-inf")).logsumexp(-1)

    def prob(params, data):
        if y_shape:
            return 0 * test(params, data)
        return torch.exp(-test(params, data))

    def head(pre, soft):
        return F.cross_entropy(pre, soft)

    return Losses(train, test, margin, prob, head)


# ------------------------------------------------------------------------------- dattri side
class _AtLeast2d(nn.Module):
    """``x`` with a batch dim of one added to a single example (see the LoGra branch)."""

    def forward(self, x: Tensor) -> Tensor:
        return x if x.ndim > 1 else x[None]


def _loader(x: Tensor, y: Tensor, batch_size: int):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Setup(NamedTuple):
    """What every dattri attributor of one run shares: module, losses, checkpoints, loaders."""

    module: nn.Module
    last: str | None  # name of the final nn.Linear (RPS), None without one
    losses: Losses
    states: list  # state dicts of the (wrapped) models
    P: int
    wd: float
    train: Any  # DataLoader, batch_size rows
    whole: Any  # DataLoader, all n_train rows in one batch
    test: Any  # DataLoader, all n_test rows in one batch

    def task(self, loss, target=None, n_models: int = 1):
        from dattri.task import AttributionTask

        states = self.states[:n_models]
        return AttributionTask(loss_func=loss, model=self.module,
                               checkpoints=states[0] if n_models == 1 else states,
                               target_func=target)


def dattri_setup(task, models: list[nn.Module], hp: dict) -> Setup:
    """Return the :class:`Setup` of ``task`` and ``models`` (``hp["batch_size"]`` rows a batch)."""
    mods = [dattri_module(m)[0] for m in models]
    # dattri loads each checkpoint INTO the module it is given: hand it a copy, or the
    # caller's first model ends up holding the last checkpoint's weights
    module, last = dattri_module(copy.deepcopy(models[0]))
    wd = float(task.hparams.get("weight_decay", 0.0))
    losses = make_losses(module, tuple(task.x_train.shape[1:]), tuple(task.y_train.shape[1:]),
                         wd, task.loss_fn, tokens=not task.x_train.is_floating_point())
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in mods]
    P = sum(p.numel() for p in module.parameters())
    return Setup(module, last, losses, states, P, wd,
                 _loader(task.x_train, task.y_train, hp["batch_size"]),
                 _loader(task.x_train, task.y_train, task.n_train),
                 _loader(task.x_test, task.y_test, task.n_test))


def dattri_runner(name: str, task, models: list[nn.Module], hp: dict) -> Runner:
    """Return dattri 0.3.0's counterpart of recipe ``name`` on the same data, models and settings.

    ``hp``: ``damping, proj_dim, max_iter, arnoldi_rank, batch_size, seed, device`` (as
    :func:`dattri_fn.app.recipes.recipe`); ``proj_dim=None`` runs TRAK without projection.

    Raises:
        ValueError: ``name`` has no dattri counterpart.
    """
    if name not in COUNTERPARTS:
        raise ValueError(f"dattri_runner(name=...): expected one of {list(COUNTERPARTS)}, got "
                         f"{name!r}. dattri {DATTRI_VERSION} has no such attributor.")
    s = dattri_setup(task, models, hp)
    import dattri.algorithm as da

    damping, device, P = hp["damping"], hp.get("device", "cpu"), s.P
    if_task = s.task(s.losses.train, s.losses.test)

    def inner_product(attributor, cache_loader):
        return Runner(lambda: attributor.cache(cache_loader),
                      lambda _: attributor.attribute(s.train, s.test))

    if name == "if-explicit":
        return inner_product(da.IFAttributorExplicit(if_task, device=device,
                                                     regularization=damping), s.whole)
    if name in ("if-cg", "if-cg-ens"):
        n_models = len(s.states) if name == "if-cg-ens" else 1
        ens_task = s.task(s.losses.train, s.losses.test, n_models=n_models)
        return inner_product(da.IFAttributorCG(ens_task, device=device, max_iter=hp["max_iter"],
                                               regularization=damping), s.whole)
    if name == "knn-shapley":
        knn = da.KNNShapleyAttributor(k_neighbors=5)
        return Runner(lambda: None, lambda _: knn.attribute(s.train, s.test).T)  # [n_test, n_train]
    if name in ("logra", "factgrass"):
        from dattri.task import AttributionTask

        def batch_loss(model, batch, dev):
            x, y = (t.to(dev) for t in batch)
            return task.loss_fn(model(x), y)

        # dattri 0.3.0 sets its compressors up from ``batch[0][0]``, ONE example: a [B, in]
        # model then sees a vector and fails; this no-parameter front restores its batch dim.
        wrapped = nn.Sequential(_AtLeast2d(), copy.deepcopy(models[0]))
        block_task = AttributionTask(loss_func=batch_loss, model=wrapped,
                                     checkpoints=wrapped.state_dict())
        # dattri writes batch_metadata.json into cache_dir (default: the working directory)
        # and reads it back on the next run: a fresh directory per attributor
        where = tempfile.mkdtemp(prefix="dattri_block_")
        atexit.register(shutil.rmtree, where, ignore_errors=True)
        if name == "logra":
            att = da.LoGraAttributor(block_task, hessian="eFIM", damping=BLOCK_DAMPING,
                                     device=device, proj_dim=LOGRA_K ** 2, offload="none",
                                     cache_dir=where)
        else:
            att = da.FactGraSSAttributor(block_task, hessian="eFIM", damping=BLOCK_DAMPING,
                                         device=device, proj_dim=FACTGRASS_DIM,
                                         blowup_factor=FACTGRASS_BLOWUP, offload="none",
                                         cache_dir=where)
        return Runner(lambda: att.cache(s.train), lambda _: att.attribute(s.train, s.test))
    if name == "if-lissa":
        scale = matched_lissa_scale(task, models, hp)
        return inner_product(da.IFAttributorLiSSA(if_task, device=device,
                                                  batch_size=min(64, task.n_train),
                                                  num_repeat=1, recursion_depth=200,
                                                  damping=damping / scale, scaling=scale),
                             s.whole)
    if name == "if-arnoldi":
        rank = min(hp["arnoldi_rank"], P)
        return inner_product(da.IFAttributorArnoldi(if_task, device=device, proj_dim=rank,
                                                    max_iter=min(2 * rank, P),
                                                    regularization=damping, seed=hp["seed"]),
                             s.train)
    if name == "if-datainf":
        return inner_product(da.IFAttributorDataInf(if_task, device=device,
                                                    regularization=s.wd + damping), s.train)
    if name == "if-ekfac":
        return inner_product(da.IFAttributorEKFAC(if_task, device=device,
                                                  damping=s.wd + damping), s.train)
    if name in ("grad-dot", "grad-cos", "tracin", "tracin-cos"):
        kw = {"proj_type": "identity", "proj_dim": P, "proj_seed": hp["seed"], "device": device}
        traced = name.startswith("tracin")
        n_ckpt = len(s.states) if traced else 1
        lr = float(task.hparams.get("lr", 1.0)) if traced else 1.0
        attributor = da.TracInAttributor(s.task(s.losses.test, n_models=n_ckpt),
                                         weight_list=torch.full((n_ckpt,), lr),
                                         normalized_grad=name in ("grad-cos", "tracin-cos"),
                                         projector_kwargs=kw, device=device)
        return Runner(lambda: None, lambda _: attributor.attribute(s.train, s.test))
    if name == "trak":
        if hp["proj_dim"] is None:
            kw = {"proj_type": "identity", "proj_dim": P}
        else:
            kw = {"proj_type": "rademacher", "proj_dim": trak_proj_dim(task, models, hp)}
        kw.update(proj_seed=hp["seed"], device=device)
        attributor = da.TRAKAttributor(s.task(s.losses.margin, n_models=len(s.states)),
                                       correct_probability_func=s.losses.prob,
                                       projector_kwargs=kw, device=device,
                                       regularization=damping / P)
        # dattri's TRAK takes (test, train): the cached training set is used
        return Runner(lambda: attributor.cache(s.train), lambda _: attributor.attribute(s.test))
    if s.last is None:
        raise ValueError(f"dattri_runner('rps'): expected an nn.Linear or an nn.Sequential "
                         f"ending in nn.Linear, got {type(s.module).__name__}. RPS needs a "
                         "linear head.")
    attributor = da.RPSAttributor(s.task(s.losses.test, s.losses.head),
                                  final_linear_layer_name=s.last, l2_strength=s.wd / 2,
                                  device=device)
    return Runner(lambda: attributor.cache(s.whole),
                  lambda _: attributor.attribute(s.train, s.test))


# --------------------------------------------------------------------------------- our side
def matched_runner(name: str, task, models: list[nn.Module], hp: dict) -> Runner:
    """Return OUR method configured to compute dattri's quantity for ``name`` in :data:`MATCHED`.

    Influence with the Hessian of ``CE + 0.5 wd |theta|^2`` and damping ``hp["damping"]`` (the
    recipe: Gauss-Newton of CE, damping ``wd + damping``), the rest of the recipe's settings.
    """
    from dattri_fn.app.recipes import recipe
    from dattri_fn.attribute import influence
    from dattri_fn.model import functional_model

    base = recipe(name, task, models, damping=hp["damping"], proj_dim=hp["proj_dim"],
                  seed=hp["seed"], batch_size=hp["batch_size"], max_iter=hp["max_iter"],
                  arnoldi_rank=hp["arnoldi_rank"])
    wd = float(task.hparams.get("weight_decay", 0.0))
    fm = functional_model(models[0].eval(), task.loss_fn)
    solver = "cg" if name == "if-cg-ens" else name[3:]
    P = sum(v.numel() for v in fm.params.values())
    opts: dict = {}
    if solver == "explicit":
        opts = dict(method="lu")
    elif solver == "cg":
        opts = dict(max_iter=hp["max_iter"], rtol=1e-4)
    elif solver == "arnoldi":
        rank = min(hp["arnoldi_rank"], P)
        opts = dict(rank=rank, max_iter=min(2 * rank, P), block_size=hp.get("arnoldi_block", 16))
    elif solver == "lissa":
        opts = dict(scale=matched_lissa_scale(task, models, hp), depth=200,
                    batch_size=min(64, task.n_train))
    method = influence(fm, l2=wd / 2, solver=solver, damping=hp["damping"],
                       curvature="hessian", **opts)
    params = fm.params
    if name == "if-cg-ens":  # every model: the mean of per-checkpoint scores, as dattri's
        params = [functional_model(m.eval(), task.loss_fn).params for m in models]
    return Runner(lambda: method.prepare(params, base.train),
                  lambda st: method.score(params, st, base.train, base.test))


def matched_lissa_scale(task, models: list[nn.Module], hp: dict) -> float:
    """Return the LiSSA scale both sides use: 2 x top Hessian eigenvalue of batch 0 + damping."""
    from dattri_fn.app.recipes import l2_loss, lissa_scale
    from dattri_fn.model import functional_model
    from dattri_fn.operators.curvature import hvp

    wd = float(task.hparams.get("weight_decay", 0.0))
    fm = functional_model(models[0].eval(), task.loss_fn)
    bs = hp["batch_size"]
    batch = (task.x_train[:bs], task.y_train[:bs])
    return lissa_scale(hvp(l2_loss(fm, wd), fm.params, batch), hp["damping"])


def trak_proj_dim(task, models: list[nn.Module], hp: dict) -> int:
    """Return the projection size our TRAK recipe uses (it caps ``proj_dim`` by ``n_train``)."""
    from dattri_fn.app.recipes import trak_dim

    return trak_dim(task.n_train, hp["proj_dim"])


# ------------------------------------------------------------------------------ referees
def exact_influence(task, models: list[nn.Module], hp: dict, *, max_params: int = 6000) -> Tensor:
    """Return g_i^T (H + damping I)^-1 g_j in float64 by a dense solve.  # -> [n_train, n_test]

    ``H`` is the Hessian of ``mean loss + 0.5 wd |theta|^2`` over the training set, ``g_i`` the
    gradient of example ``i``'s loss + L2 term and ``g_j`` of test ``j``'s loss: the quantity both
    matched influence sides approximate, built with plain ``torch.func`` (no dattri_fn, no
    dattri code). For an indefinite ``H + damping I`` it is still this literal solve.

    Raises:
        RuntimeError: more than ``max_params`` parameters (the dense Hessian is P x P).
    """
    from torch.func import grad, jacrev, vmap

    model = models[0]
    named = {k: v.detach().to("cpu", torch.float64) for k, v in model.named_parameters()}
    P = sum(v.numel() for v in named.values())
    if P > max_params:
        raise RuntimeError(f"exact_influence: {P} parameters > max_params={max_params}")
    wd = float(task.hparams.get("weight_decay", 0.0))
    shapes = [v.shape for v in named.values()]
    sizes = [v.numel() for v in named.values()]
    flat0 = torch.cat([v.reshape(-1) for v in named.values()])
    module = copy.deepcopy(model).to("cpu", torch.float64)
    mkeys = list(named)

    def logits(flat, x):
        pieces = [t.reshape(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]
        parts = dict(zip(mkeys, pieces, strict=True))
        return functional_call(module, parts, (x,))

    f64 = lambda t: t.to("cpu", torch.float64) if t.is_floating_point() else t.cpu()
    x = f64(task.x_train)
    y = task.y_train.cpu()
    objective = lambda f: task.loss_fn(logits(f, x), y) + 0.5 * wd * (f @ f)
    H = jacrev(jacrev(objective), chunk_size=128)(flat0)
    H = (H + H.T) / 2
    one = lambda f, xi, yi: task.loss_fn(logits(f, xi[None]), yi[None])
    g_train = vmap(grad(lambda f, xi, yi: one(f, xi, yi) + 0.5 * wd * (f @ f)),
                   in_dims=(None, 0, 0))(flat0, x, y)
    g_test = vmap(grad(one), in_dims=(None, 0, 0))(flat0, f64(task.x_test), task.y_test.cpu())
    A = H + hp["damping"] * torch.eye(P, dtype=H.dtype)
    return g_train @ torch.linalg.solve(A, g_test.T)


def dattri_ekfac_fixed(task, models: list[nn.Module], hp: dict) -> Tensor:
    """Return dattri's EK-FAC scores with its two defects fixed.  # -> [n_train, n_test]

    dattri 0.3.0 (``dattri/func/fisher.py``, ``IFAttributorEKFAC.transform_test_rep``) keeps
    ``torch.linalg.eigh``'s eigenvector COLUMNS but rotates with ``q_s @ dW @ q_a.T`` (rows),
    so ``Lambda`` is fitted in a basis that is not the Kronecker eigenbasis; and for a layer
    with a bias it builds the ``[out, in+1]`` block by reshaping ``cat(W.flatten(), b)``,
    which scrambles weight and bias entries. Here the eigenvectors are transposed before
    ``estimate_lambda`` and the block is assembled row by row; everything else is dattri's own
    (covariances, Lambda, gradients).
    """
    import dattri.algorithm as da
    import dattri.func.fisher as fisher

    s = dattri_setup(task, models, hp)
    damping = s.wd + hp["damping"]
    att = da.IFAttributorEKFAC(s.task(s.losses.train, s.losses.test),
                               device=hp.get("device", "cpu"), damping=damping)
    original = fisher.estimate_eigenvector
    fisher.estimate_eigenvector = lambda cov: {k: (qa.T, qs.T) for k, (qa, qs) in
                                              original(cov).items()}
    try:
        att.cache(s.train)
    finally:
        fisher.estimate_eigenvector = original
    batch = lambda x, y: (x.unsqueeze(0), y.unsqueeze(0))
    g_train = torch.cat([att.generate_train_rep(0, batch(x, y)) for x, y in s.train])
    g_test = att.generate_test_rep(0, batch(task.x_test, task.y_test))
    named = dict(s.module.named_parameters())
    pieces, start = [], 0
    for name in att.module_name:
        W = named[f"{name}.weight"]
        out, inp = W.shape
        has_bias = f"{name}.bias" in att.layer_name
        k = g_test.shape[0]
        Wv = g_test[:, start:start + out * inp].reshape(k, out, inp)
        M = torch.cat([Wv, g_test[:, start + out * inp:start + out * inp + out].reshape(
            k, out, 1)], -1) if has_bias else Wv
        qa, qs = att.cached_q[name]
        X = qs.T @ ((qs @ M @ qa.T) / (att.cached_lambdas[name] + damping)) @ qa
        pieces.append(X[..., :inp].reshape(k, -1))
        if has_bias:
            pieces.append(X[..., inp])
        start += out * inp + (out if has_bias else 0)
    return g_train @ torch.cat(pieces, 1).T


def diagnose(name: str, task, models: list[nn.Module], hp: dict, ours: Tensor) -> dict:
    """Return extra correlations that explain a difference: ``{label: value}``.

    ``if-ekfac``: ours vs :func:`dattri_ekfac_fixed`. ``trak``, ``logra``, ``factgrass``: ours vs
    ours with the next projection seed (the spread a different random projection alone causes).
    """
    def corr(a, b):
        a, b = a.detach().double().flatten(), b.detach().double().flatten()
        a, b = a - a.mean(), b - b.mean()
        return float(a @ b / (a.norm() * b.norm()))

    if name == "if-ekfac":
        return {"corr_vs_dattri_fixed": corr(ours, dattri_ekfac_fixed(task, models, hp))}
    if name in ("logra", "factgrass"):
        from dattri_fn.app.recipes import recipe
        from dattri_fn.attribute.factgrass import factgrass
        from dattri_fn.attribute.logra import logra
        from dattri_fn.model import functional_model

        fm = functional_model(models[0].eval(), task.loss_fn)
        m = logra(fm, proj_dim=LOGRA_K, seed=1) if name == "logra" else factgrass(
            fm, proj_dim=FACTGRASS_DIM, blowup=FACTGRASS_BLOWUP, seed=1)
        r = recipe("grad-dot", task, models[:1], batch_size=hp["batch_size"])
        with torch.no_grad():
            other = m.score(fm.params, m.prepare(fm.params, r.train), r.train, r.test)
        return {"corr_ours_next_seed": corr(ours, other)}
    if name == "trak":
        from dattri_fn.app.recipes import recipe

        r = recipe("trak", task, models, damping=hp["damping"], proj_dim=hp["proj_dim"],
                   seed=hp["seed"] + 1, batch_size=hp["batch_size"])
        with torch.no_grad():
            other = r.method.score(r.params, r.method.prepare(r.params, r.train), r.train,
                                   r.test)
        return {"corr_ours_next_seed": corr(ours, other)}
    return {}
