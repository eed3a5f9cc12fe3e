"""Every method, configured for a bundled :class:`~dattri_fn.eval.tasks.Task`, by name.

The demo, the benchmark runner and the notebooks share these settings, so a table row and a
picture always come from the same configuration. Conventions for a task trained on
``mean loss + 0.5 * weight_decay * |theta|^2``:

* influence: train side ``loss_i + 0.5 wd |theta|^2``, test side the plain loss; curvature the
  Gauss-Newton ``G`` of the loss (positive semi-definite: the Hessian of a non-convex model is
  indefinite and CG meets negative curvature; ``G`` equals the Hessian for logistic regression)
  with damping ``wd + damping`` (the Hessian of the weight decay plus extra damping). K-FAC and
  EK-FAC cover the ``nn.Linear`` layers only (convolutions are held fixed);
* gradient similarity and TracIn: the plain loss on both sides;
* TRAK: the correct-class margin and ``1 - p_y`` weight (classification), else minus the loss;
  bfloat16 projection and feature cache where the device multiplies bfloat16 natively
  (:func:`~dattri_fn.transforms.project.bfloat16_is_fast`; TRAK's reference implementation keeps float16
  features), else the params' dtype;
  ``proj_dim`` capped at ``n_train // 4``: with ``d`` near ``n_train`` the kernel
  ``(Phi^T Phi + damping I)^-1`` is near-singular and the scores are noise (on digits-mlp,
  n_train = 500: LDS 0.09 at d = 512 against 0.39 at d = 128);
* RPS: the last ``nn.Linear`` is the head (bias folded in as a constant feature), ``l2 = wd / 2``,
  refitted to the model's own predicted probabilities (``refit="predictions"``, as Yeh et al.):
  the trained head is not stationary for the head-only objective the theorem needs.
* MAGIC: the metagradient through the task's own training run, replayed by the functional
  trainer from ``task.make_model(c)`` for model ``c`` (``models[c]`` must be
  ``train_model(task, seed=c)``): the ``"sgd"`` trainer (same order seed) or full-batch Adam
  with cosine decay; L-BFGS is refused. Target: the correct-class margin
  ``logit_y - logsumexp_{c != y} logit_c`` (classification), else minus the loss. ``magic``
  runs the first model, ``magic-ens`` averages over all of them (text-lm: the first 2,
  ``MAGIC_RUNS``); each run with ``horizon="band"`` (chosen on a validation ground truth,
  ``benchmarks/magic_rules.py``) and the task's early exit (``MAGIC_EXIT``).
  The reverse pass differentiates a step equal to the trained one in exact arithmetic: a
  leading Conv2d as one GEMM (digits-cnn), Adam's decay in one loss path (full-batch Adam).
* ``if-cg-ens``: the ``if-cg`` recipe over every model (the mean of per-model scores, each with
  its own Gauss-Newton); ``tracin-cos``: TracIn with cosines, over every model;
  ``knn-shapley``: exact KNN-Shapley (K = 5) on the raw inputs (classification tasks).

``models`` is a list of trained modules of the task: the first is "the" model; ensemble methods
(TRAK, TracIn) use all of them as checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..attribute import Method, grad_cos, grad_dot, influence, knn_shapley, tracin, tracin_cos
from ..model import FunctionalModel, functional_model
from ..transforms.project import bfloat16_is_fast, make_projector

METHODS = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "if-datainf", "if-kfac", "if-ekfac",
           "grad-dot", "grad-cos", "tracin", "trak", "rps", "if-cg-ens", "tracin-cos",
           "knn-shapley", "magic", "magic-ens")
DEMO_METHODS = ("if-cg", "grad-dot", "tracin", "trak", "rps")


class Recipe(NamedTuple):
    """A configured method and the params it runs on: ``method.prepare(params, train)``..."""

    name: str
    method: Method
    params: Any
    train: Any
    test: Any


def _is_classification(task) -> bool:
    return task.y_train.ndim == 1


def l2_loss(fm: FunctionalModel, wd: float):
    """Return ``(p, z) -> fm.loss(p, z) + 0.5 wd |theta|^2`` over ALL parameters (fixed ones too)."""
    param_names = {k for k, _ in fm.module.named_parameters()}
    fixed_sq = sum((v * v).sum() for k, v in fm.fixed.items() if k in param_names)

    def loss(p, ex):
        reg = sum((v * v).sum() for v in p.values()) + fixed_sq
        return fm.loss(p, ex) + 0.5 * wd * reg

    return loss


def _head_split(model: nn.Module):
    if isinstance(model, nn.Linear):
        return nn.Identity(), model
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        return model[:-1], model[-1]
    raise ValueError(f"recipe('rps'): expected an nn.Linear or an nn.Sequential ending in "
                     f"nn.Linear, got {type(model).__name__}. RPS needs a linear head.")


def _rps(task, model: nn.Module, wd: float) -> tuple[Method, dict]:
    from ..attribute.representer import representer

    body, head = _head_split(model)
    W = head.weight.detach()
    if head.bias is not None:
        W = torch.cat([W, head.bias.detach()[:, None]], 1)
    params = {"W": W}

    def feature_fn(p, ex):
        with torch.no_grad():
            h = body(ex[0][None])[0].reshape(-1)
        return torch.cat([h, h.new_ones(1)]) if head.bias is not None else h

    head_fn = lambda p, h: p["W"] @ h
    loss_on_logits = lambda logits, y: F.cross_entropy(logits[None], y[None])
    return representer(feature_fn, head_fn, loss_on_logits, l2=wd / 2,
                       refit="predictions"), params


def _trak(task, fms: list[FunctionalModel], proj_dim: int, seed: int, damping: float,
          batch_rows: int | None = None):
    from ..attribute.trak import classification_margin_loss, classification_weight_loss, trak

    fm = fms[0]
    device = next(iter(fm.params.values())).device
    opts = dict(proj_dim=proj_dim, seed=seed, damping=damping, batch_rows=batch_rows,
                feature_dtype=torch.bfloat16 if bfloat16_is_fast(device) else None)
    if _is_classification(task):
        margin = functional_model(fm.module, classification_margin_loss)
        weight = functional_model(fm.module, classification_weight_loss)
        return trak(margin, weight_fn=weight, **opts)
    neg_loss = lambda p, ex: -fm.loss(p, ex)
    return trak(neg_loss, **opts)


def recipe(name: str, task, models: Sequence[nn.Module], *, damping: float = 1e-3,
           proj_dim: int = 512, seed: int = 0, batch_size: int = 256,
           max_iter: int = 100, arnoldi_rank: int = 64, arnoldi_block: int = 16) -> Recipe:
    """Return :class:`Recipe` ``name`` (one of :data:`METHODS`) for ``task`` and its ``models``.

    Args:
        damping: extra absolute damping of the influence methods (on top of the weight decay);
            TRAK's kernel damping.
        proj_dim, seed: projection size and seed of TRAK.
        batch_size: training data is streamed in batches of this many examples.
        max_iter: CG iterations; arnoldi_rank: Arnoldi eigenpairs kept (from a Krylov space of
            twice that dimension); arnoldi_block: Krylov columns per curvature call (block
            Arnoldi: 2 * rank / block calls; one call's fixed cost dominates at these sizes).
    """
    if name not in METHODS:
        raise ValueError(f"recipe(name=...): expected one of {list(METHODS)}, got {name!r}.")
    if not models:
        raise ValueError("recipe(models=...): expected at least one trained model, got none.")
    wd = float(task.hparams.get("weight_decay", 0.0))
    fms = [functional_model(m.eval(), task.loss_fn) for m in models]
    fm = fms[0]
    n = task.n_train
    train = [(task.x_train[i:i + batch_size], task.y_train[i:i + batch_size])
             for i in range(0, n, batch_size)]
    test = (task.x_test, task.y_test)
    if name == "tracin-cos":
        lr = float(task.hparams.get("lr", 1.0))
        return Recipe(name, tracin_cos(fm, lrs=[lr] * len(fms)), [f.params for f in fms],
                      train, test)
    if name == "knn-shapley":
        if not _is_classification(task):
            raise ValueError(f"recipe('knn-shapley'): expected a classification task, got "
                             f"{task.name!r} (KNN-Shapley values a label vote).")
        return Recipe(name, knn_shapley(k=5), {}, train, test)
    ensemble = name == "if-cg-ens"
    if ensemble:
        name = "if-cg"
    if name.startswith("if-"):
        solver = name[3:]
        if solver in ("kfac", "ekfac"):
            fm = _linear_only(models[0], task.loss_fn)
        P = sum(v.numel() for v in fm.params.values())
        curvature = gauss_newton(fm, task.loss_fn, curvature_rows(P, batch_size))
        opts: dict = {}
        if solver == "explicit":
            # G is PSD and wd + damping > 0, so G + (wd + damping) I is positive definite:
            # factor it once. "auto" would first prove that nothing is dropped with a shifted
            # Cholesky (a second P^3 / 3); on the digits tasks the scores are identical.
            opts = dict(method="cholesky")
        elif solver == "cg":
            opts = dict(max_iter=max_iter, rtol=1e-4)
        elif solver == "arnoldi":
            opts = dict(rank=min(arnoldi_rank, P), max_iter=min(2 * arnoldi_rank, P),
                        block_size=arnoldi_block)
        elif solver == "lissa":
            opts = dict(scale=lissa_scale(curvature(fm.params, train[0]), wd + damping),
                        depth=200, batch_size=min(64, n))
        method = influence(fm, l2=wd / 2, solver=solver, damping=damping + wd,
                           curvature=curvature, batch_rows=curvature_rows(P, batch_size), **opts)
        if ensemble:
            return Recipe("if-cg-ens", method, [f.params for f in fms], train, test)
        return Recipe(name, method, fm.params, train, test)
    if name in ("grad-dot", "grad-cos"):
        build = grad_dot if name == "grad-dot" else grad_cos
        return Recipe(name, build(fm), fm.params, train, test)
    if name == "tracin":
        lr = float(task.hparams.get("lr", 1.0))
        return Recipe(name, tracin(fm, lrs=[lr] * len(fms)), [f.params for f in fms],
                      train, test)
    if name == "trak":
        P = sum(v.numel() for v in fm.params.values())
        d = trak_dim(n, proj_dim)
        return Recipe(name, _trak(task, fms, d, seed, damping, trak_rows(P, batch_size, d)),
                      [f.params for f in fms], train, test)
    if name in ("magic", "magic-ens"):
        count = 1 if name == "magic" else min(len(models), MAGIC_RUNS.get(task.name, len(models)))
        method, params = magic_recipe(task, count, chunk_size=MAGIC_CHUNKS.get(task.name))
        data = (task.x_train, task.y_train)
        return Recipe(name, method, params, data, test)
    method, params = _rps(task, models[0], wd)
    return Recipe(name, method, params, train, test)


# Test targets per vmapped vjp in recipe("magic"/"magic-ens"), by task (absent: all at once).
# digits-cnn: chunks of 10 from stop 20 to 26 (all 50 at once was 1.01-1.26x, blamed on the
# cache); stop 27 found the cause in glibc's malloc thresholds: at the few MiB a small run leaves
# them, a reverse step's freed temporaries go back to the kernel and are faulted in again (~10k
# minor faults a step). With metagradient's _raise_malloc_thresholds (~0 faults) one step's
# pullback, interleaved (benchmarks.magic_chunks, 30-40 rounds, median per-round ratio to chunks
# of 10, A/A 0.99): all 50 at once 0.848 / 0.855, 25 0.873 / 0.878; without it, all at once 1.244.
# The 3-run recipe, prepare + score (benchmarks.magic_heap --full, processes alternated): 79-97
# CPU-s against 111-129 for the stop-26 code, scores torch.equal. 50 caps the peak on a task built
# with more test points (~1.75 MiB a target: 547 MiB at 50 against 482 at 10, review RA).
# On digits-lr/mlp chunks of 4-25 were slower (per-call overhead); on text-lm no chunking beat
# noise (stop 20).
MAGIC_CHUNKS: dict[str, int] = {"digits-cnn": 50}

# recipe("magic-ens")'s runs by task (absent: every model given) and every MAGIC recipe's early
# exit by task (absent: EARLY_EXIT), stop 26, benchmarks/magic_config.py: the cheapest setting
# whose VALIDATION LDS (32 other half-subsets, other retraining seeds) stays above the CG
# influence ensemble's there (the only other method measured on validation). text-lm: 2 runs
# score 0.421 on validation against if-cg-ens's 0.397 (3 runs: 0.433; stop 25,
# benchmarks/magic_ens_size.py); (1.1, 2) is the rule walking the fewest
# target-steps (0.566 of the full pass's, (1.2, 8) 0.686) that changes no band on the 3 recorded
# runs (so the scores are (1.2, 8)'s) nor on a 4th seed; its margin there: the closest norm past
# a stop comes back to 1.133x the walked minimum (a band changes at 1.1x). (1.1, 1) changed one.
MAGIC_RUNS = {"text-lm": 2}
MAGIC_EXIT = {"text-lm": (1.1, 2)}


def magic_recipe(task, count: int = 1, *, checkpoint_every: int | None = None,
                 chunk_size: int | None = None, horizon: int | str | None = "band",
                 early_exit: tuple[float, int] | None | str = "default") -> tuple[Method, list]:
    """Return ``(magic method, initial params of models 0..count-1)`` replaying ``task.train``,
    each run truncated by ``horizon`` (:func:`~dattri_fn.attribute.magic.magic`).

    ``"band"`` by default, chosen by the LDS against a VALIDATION ground truth (32 other
    half-subsets, other retraining seeds; ``benchmarks/magic_rules.py``), not the evaluation
    subsets: its mean over the four bundled tasks led ``"auto"``'s by 0.010 for the 3-run
    ensemble (0.598 / 0.588) and by 0.011 for one run (0.558 / 0.547).

    ``early_exit`` (``"default"``: the task's :data:`MAGIC_EXIT`, else
    :data:`~dattri_fn.attribute.metagradient.EARLY_EXIT`, with an adaptive horizon; else None):
    each target leaves the reverse pass once its params cotangent has stayed above 1.2x its
    running minimum for 8 steps (text-lm: 1.1x for 2 steps; :func:`~dattri_fn.attribute.magic.
    metagradient`); chosen as the rule walking the fewest steps among those that kept the
    validation LDS of the recorded runs (``benchmarks/magic_exit.py``,
    ``benchmarks/magic_config.py``).

    Raises:
        ValueError: a task trained by L-BFGS (its line search is no fixed sequence of steps).
    """
    from ..attribute.magic import magic
    from ..attribute.metagradient import EARLY_EXIT, _check_early_exit
    from ..attribute.trak import classification_margin_loss
    from ..eval.tasks import adam_run, order_seed, sgd_run, task_step

    hp = task.hparams
    wd = float(hp.get("weight_decay", 0.0))
    device = task.x_train.device
    models = [task.make_model(c).to(device) for c in range(count)]
    fm = functional_model(models[0], task.loss_fn)
    if isinstance(early_exit, str):
        if early_exit != "default":
            raise ValueError(f"magic_recipe(early_exit=...): expected 'default', None or a pair "
                             f"(ratio >= 1.1, steps >= 1), got {early_exit!r}.")
        early_exit = MAGIC_EXIT.get(task.name, EARLY_EXIT) if horizon in ("auto", "band") \
            else None
    early_exit = _check_early_exit("magic_recipe", early_exit, horizon)
    opts = dict(checkpoint_every=checkpoint_every, chunk_size=chunk_size, horizon=horizon,
                early_exit=early_exit)
    if _is_classification(task):
        opts["target"] = functional_model(models[0], classification_margin_loss).loss
    if hp.get("optimizer") == "sgd":
        optimizer, _ = sgd_run(task.n_train, seed=0, epochs=hp["epochs"], lr=hp["lr"],
                               weight_decay=wd, batch_size=hp["batch_size"],
                               momentum=hp["momentum"])
        method = magic(fm, optimizer, epochs=hp["epochs"], batch_size=hp["batch_size"],
                       seed=[order_seed(c) for c in range(count)],
                       vjp_step=_gemm_vjp_step(models[0], task.loss_fn, optimizer), **opts)
    elif hp.get("optimizer") == "adam":
        # The task's own trainer: bit-identical to torch.optim.Adam + CosineAnnealingLR. It
        # computes the loss twice (the batch mean and the weighted per-example correction) to
        # reproduce .backward()'s rounding; the reverse pass differentiates the same step in one
        # loss path with Adam's coupled decay (equal in exact arithmetic; ~0.7x the time on
        # text-lm, scores within float32 round-off).
        from ..training import adam, cosine_schedule, make_step

        optimizer, _ = adam_run(task.n_train, epochs=hp["epochs"], lr=hp["lr"])
        same = adam(cosine_schedule(hp["lr"], hp["epochs"], recursive=True), weight_decay=wd)
        vjp_step = _gemm_vjp_step(models[0], task.loss_fn, same) or make_step(fm, same)
        method = magic(fm, optimizer, epochs=hp["epochs"], step=task_step(fm, optimizer, wd),
                       vjp_step=vjp_step, **opts)
    else:
        raise ValueError(f"recipe('magic'): expected a task trained by 'sgd' or 'adam' steps, "
                         f"got optimizer {hp.get('optimizer')!r}. Build the task with "
                         f"get_task(name, hparams=SGD_HPARAMS).")
    return method, [functional_model(m, task.loss_fn).params for m in models]


def _gemm_vjp_step(model: nn.Module, loss_fn, optimizer):
    """Return ``make_step`` of ``model`` with its first layer as a GEMM conv and its ReLUs as
    products with their masks (for MAGIC's ``vjp_step``), or None when that layer is no
    stride-1 ``Conv2d`` (the step as it is).

    The first layer of a Sequential reads the data, so vmap's second-order terms against it
    become one matrix product (:mod:`dattri_fn.training.gemm_conv`; digits-cnn: ~0.9x the
    reverse step); a ReLU's second derivative then costs no zero tensor
    (:mod:`dattri_fn.training.mask_relu`; digits-cnn: a further ~0.9x, weights torch.equal on
    the measured steps; ``benchmarks/magic_speed.py``). Equal to the trained step up to rounding.
    """
    from ..training import make_step
    from ..training.gemm_conv import supported, with_gemm_convs
    from ..training.mask_relu import with_mask_relus

    if not isinstance(model, nn.Sequential) or not len(model) or not supported(model[0]):
        return None
    twin = with_mask_relus(with_gemm_convs(model, ["0"]))
    return make_step(functional_model(twin, loss_fn), optimizer)


def gauss_newton(fm: FunctionalModel, loss_fn, batch_rows: int | None = None):
    """Return ``(params, data) -> LinOp`` of the Gauss-Newton of ``loss_fn`` through the model.

    :func:`dattri_fn.operators.gauss_newton` with the task's loss: the builder picks the fast
    path (factored for Linear-only models, the closed-form output Hessian of
    :func:`~dattri_fn.eval.tasks.classification_loss`; :func:`~dattri_fn.eval.tasks.lm_loss` measured no
    faster with it on text-lm, so the language model keeps autodiff).
    """
    from ..model import default_unpack
    from ..operators import gauss_newton as build

    if fm.loss_fn is not loss_fn:
        # a bridge of its own (issue 14): _replace(loss_fn=...) left fm.loss on the old loss_fn
        fm = functional_model(fm.module, loss_fn, params=list(fm.params),
                              unpack=fm.unpack or default_unpack)
    return build(fm, batch_rows=batch_rows)


def curvature_rows(num_params: int, batch_size: int) -> int:
    """Examples per curvature call in the recipes (:func:`dattri_fn.operators.curvature_rows`)."""
    from ..operators import curvature_rows as rows

    return rows(num_params, batch_size)


def trak_dim(n_train: int, proj_dim: int) -> int:
    """The TRAK recipe's projection size: ``min(proj_dim, max(16, n_train // 4))``.

    A kernel over ``d`` features needs ``n_train`` well above ``d`` to be estimated; this keeps
    four training examples per feature.
    """
    return min(proj_dim, max(16, n_train // 4))


def trak_rows(num_params: int, batch_size: int, proj_dim: int | None = None) -> int:
    """Examples per TRAK feature call in the recipes: ``max(batch_size, min(2048, 2**20 // P))``,
    at least 256 when the ``[P, proj_dim]`` projection is too big to keep in any form (not
    ``Projector.cacheable``: a rademacher one's packed signs over 16 MiB, another kind's ``R``
    over 2**22 entries).

    On the digits MLP (P = 2,410, n_train = 16k, one CPU thread) merging 256-row batches into
    435-row calls took TRAK from 0.94 to 0.81 s; 870-row calls were no faster and held 16 MiB
    more (a checkpoint's ``[rows, P]`` gradients are densified whole up to ``2**21`` entries).
    A projection that is not kept is drawn again on every call, so there fewer, larger calls
    win: at P = 1M, d = 512, n_train = 1k and 3 checkpoints, 33-row calls took 68.7 s, 256-row
    calls 16.1 s (263 MiB peak); 512 and 1024 rows were no faster and held 380 / 640 MiB.
    """
    rows = max(batch_size, min(2048, 2**20 // max(1, num_params)))
    if proj_dim is not None and not make_projector(num_params, proj_dim=proj_dim).cacheable:
        rows = max(rows, 256)
    return rows


def _linear_only(model: nn.Module, loss_fn) -> FunctionalModel:
    """The model's ``nn.Linear`` parameters only (K-FAC's domain); a bare Linear is wrapped."""
    from ..transforms.layers import linear_layers

    if isinstance(model, nn.Linear):
        model = nn.Sequential(model)
    return functional_model(model, loss_fn, params=linear_layers(model))


def lissa_scale(op, damping: float) -> float:
    """A safe LiSSA scale: 2x the top eigenvalue (20 power iterations on one batch) + damping."""
    v = torch.ones(op.dim, dtype=op.dtype, device=op.device)
    for _ in range(20):
        v = op(v)
        v = v / v.norm()
    return float(2.0 * (v @ op(v)).abs() + damping)
