"""LESS, AdamW-influence and SOURCE from a recorded AdamW run, next to MAGIC, on digits-mlp.

    OMP_NUM_THREADS=1 python -m benchmarks.training_methods [--optimizer sgd] [--task digits-cnn] [--quick]

The run: digits-mlp (``get_task("digits-mlp", n_train=500, n_test=50)``, its 64-32-10 tanh MLP
from ``make_model(0)``; ``--task`` digits-lr / digits-cnn: the same with that task's model),
trained by the functional AdamW (:mod:`dattri_fn.training`,
``adamw(cosine_schedule(1e-2, T), weight_decay=1e-3)``), mini-batches of 64, 20 epochs
(``T = 160`` steps) in the order ``batch_order(500, 64, 20, seed=0)``. The loop is written out
here with :func:`~dattri_fn.training.record_step` (a checkpoint every 20 steps: 8 checkpoints
and the final state), as a user's own loop would be.

Ground truths over ``m`` half-subsets (``draw_subsets(500, m, seed=0)``), one model each, by the
same AdamW recipe from the same init; target = the correct-class margin on the 50 test points
(higher = better). ``std``: each model trained on its subset alone, in an order over its rows
seeded 0 (the standard protocol); ``fixed``: on all 500 rows in the full run's order with the
examples outside the subset weighted 0 (MAGIC's fixed-randomness protocol). LDS (Spearman over
the subsets, mean over test points, normal 95% CI).

Rows (time = prepare + score, in this process, one thread): MAGIC (the exact metagradient of
the same AdamW run), SOURCE (Gauss-Newton, 3 segments), LESS (exact and projected to
``--proj-dim``, 512) and AdamW-influence over the 8 recorded checkpoints, TracIn-Cos over the
same checkpoints with their learning rates, and Grad-Dot at the final parameters. Every method
scores the margin (its negative as the test "loss" for the loss-convention methods).

``--optimizer sgd``: the same with plain SGD (no momentum, ``cosine_schedule(0.2, T)``, coupled
weight decay 1e-3), recorded with per-step gradient stores projected to ``--proj-dim`` (512)
in a temporary directory; LESS and AdamW-influence (Adam only) give way to DVEmb (recorded
Fisher, in the projected space), and SOURCE also runs with EK-FAC segments
(``--curvatures ekfac-pooled``: one EK-FAC pooled over each segment's checkpoints, the paper's).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dattri_fn.attribute.adamw_influence import adamw_influence
from dattri_fn.attribute.dvemb import dvemb
from dattri_fn.attribute.gradsim import grad_dot, tracin_cos
from dattri_fn.attribute.less import less
from dattri_fn.attribute.magic import magic
from dattri_fn.attribute.outputs import classification_margin_loss
from dattri_fn.attribute.source import source
from dattri_fn.eval.metrics import lds
from dattri_fn.eval.retrain import draw_subsets
from dattri_fn.eval.tasks import get_task
from dattri_fn.model import functional_model
from dattri_fn.training import (
    GradSpec,
    adamw,
    batch_order,
    cosine_schedule,
    finish_record,
    make_step,
    record_step,
    sgd,
    start_record,
    take,
    train,
)

HP = dict(lr=1e-2, weight_decay=1e-3, batch_size=64, epochs=20, every=20)
# --optimizer sgd: plain SGD (DVEmb's setting: no momentum), cosine decay from SGD_LR.
SGD_LR = 0.2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training_methods",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-mlp", choices=("digits-lr", "digits-mlp", "digits-cnn"))
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--epochs", type=int, default=HP["epochs"])
    p.add_argument("--every", type=int, default=HP["every"], help="steps between checkpoints")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="sgd: plain SGD, recorded with per-step gradient stores (adds DVEmb)")
    p.add_argument("--proj-dim", type=int, default=512, help="DVEmb's store projection")
    p.add_argument("--hidden", type=int, default=32, help="the MLP's hidden width (task default 32)")
    p.add_argument("--segments", default="3", help="SOURCE rows, one per segment count L (e.g. 1,3,8)")
    p.add_argument("--curvatures", default=None,
                   help="SOURCE's curvatures, e.g. 'gn,ekfac' (default: gn; gn,ekfac with sgd); "
                        "'ekfac-pooled': EK-FAC pooled over each segment's checkpoints")
    p.add_argument("--quick", action="store_true",
                   help="n_train 120, n_test 10, 16 subsets, 4 epochs, a checkpoint every 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.subsets, args.epochs, args.every = 120, 10, 16, 4, 2
    return args


KIND = "adamw"


def schedule(T: int):
    return cosine_schedule(HP["lr"] if KIND == "adamw" else SGD_LR, T)


def optimizer(T: int):
    if KIND == "sgd":
        return sgd(schedule(T), weight_decay=HP["weight_decay"])
    return adamw(schedule(T), weight_decay=HP["weight_decay"])


def recorded_run(fm, data, order, every, grads=None):
    """The user's loop: pure steps, recorded every ``every`` steps (and per-step gradient
    stores with ``grads``)."""
    T = len(order)
    sched = schedule(T)
    step = make_step(fm, optimizer(T))
    opt = optimizer(T)
    params, state = fm.params, opt.init(fm.params)
    rec = start_record(KIND, checkpoint_every=every, weight_decay=HP["weight_decay"], grads=grads)
    for t, rows in enumerate(order):
        batch = take(data, rows)
        rec = record_step(rec, rows, lr=sched(t), params=params, opt_state=state, batch=batch)
        params, state = step(params, state, batch, torch.ones(len(rows)))
    return finish_record(rec, params=params, opt_state=state)


def margins(module, params, x, y):
    logits = functional_call(module, params, (x,))
    correct = logits.gather(1, y[:, None]).squeeze(1)
    return correct - logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)


def ground_truth(task, fm, subsets, epochs, *, fixed: bool = False):
    """Margins of models trained on each subset: alone, in a fresh order over its rows (the
    standard protocol), or ``fixed``: on all rows in the full run's order with the others
    weighted 0 (MAGIC's fixed-randomness protocol)."""
    targets = []
    full = batch_order(task.n_train, batch_size=HP["batch_size"], epochs=epochs, seed=0)
    for keep in subsets:
        rows = keep.nonzero().squeeze(1)
        if fixed:
            data, order, weights = (task.x_train, task.y_train), full, keep.float()
        else:
            data = (task.x_train[rows], task.y_train[rows])
            order = batch_order(len(rows), batch_size=HP["batch_size"], epochs=epochs, seed=0)
            weights = None
        opt = optimizer(len(order))
        run = train(make_step(fm, opt), fm.params, opt.init(fm.params), data, order,
                    weights=weights)
        with torch.no_grad():
            targets.append(margins(fm.module, run.params, task.x_test, task.y_test))
    return torch.stack(targets)


def main(argv=None) -> list[dict]:
    global KIND
    warnings.simplefilter("ignore")
    args = parse_args(argv)
    KIND = args.optimizer
    torch.set_num_threads(1)
    hp = {"hidden": args.hidden} if args.task == "digits-mlp" and args.hidden != 32 else None
    task = get_task(args.task, n_train=args.n_train, n_test=args.n_test, hparams=hp)
    model = task.make_model(0)
    fm = functional_model(model, task.loss_fn)
    margin = functional_model(model, classification_margin_loss).loss  # higher = better
    neg_margin = lambda p, ex: -margin(p, ex)  # noqa: E731 - the loss-convention test side
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    order = batch_order(task.n_train, batch_size=HP["batch_size"], epochs=args.epochs, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        grads = GradSpec(fm.loss, tmp, args.proj_dim) if KIND == "sgd" else None
        t0 = time.perf_counter()
        record = recorded_run(fm, data, order, args.every, grads)
        t_run = time.perf_counter() - t0
        rows, t_gt, gts = evaluate(args, task, fm, margin, neg_margin, data, test, order, record)
    opt_text = "AdamW" if KIND == "adamw" else f"plain SGD (stores projected to {args.proj_dim})"
    ckpts = [c for c in record.checkpoints if c.step < record.steps]
    print(f"\n### {args.task} trained by {opt_text}, functional and recorded: "
          f"n_train={task.n_train}, n_test={task.n_test}, T={len(order)} steps, {len(ckpts)} "
          f"checkpoints; LDS over m={args.subsets} half-subsets, one model each\n")
    print("| method | LDS std [95% CI] | LDS fixed [95% CI] | prepare + score s |")
    print("|---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r[k][0]:.3f} [{r[k][1]:.3f}, {r[k][2]:.3f}]" for k in gts)
        print(f"| {r['method']} | {cells} | {r['seconds']:.1f} |")
    print(f"\n(recorded run {t_run:.1f}s; ground truths 2 x {args.subsets} retrainings "
          f"{t_gt:.1f}s)")
    return rows


def evaluate(args, task, fm, margin, neg_margin, data, test, order, record):
    subsets = draw_subsets(task.n_train, args.subsets, seed=0)
    t0 = time.perf_counter()
    gts = {"std": ground_truth(task, fm, subsets, args.epochs),
           "fixed": ground_truth(task, fm, subsets, args.epochs, fixed=True)}
    t_gt = time.perf_counter() - t0
    ckpts = [c for c in record.checkpoints if c.step < record.steps]
    lrs = [float(record.lrs[c.step]) for c in ckpts]
    methods = {
        "magic": (magic(fm, optimizer(len(order)), epochs=args.epochs,
                        batch_size=HP["batch_size"], seed=[0], target=margin), fm.params),
    }
    curvatures = (args.curvatures or ("gn,ekfac" if KIND == "sgd" else "gn")).split(",")
    for L in (int(v) for v in args.segments.split(",") if v):  # "" = no SOURCE rows
        for curv in curvatures:  # EK-FAC segments take SGD records only
            pooled = curv == "ekfac-pooled"
            methods[f"source ({curv}, L={L})"] = (source(fm, segments=L, pooled=pooled,
                                                         curvature="ekfac" if pooled else curv,
                                                         target=neg_margin), record)
    if KIND == "adamw":
        methods["less"] = (less(fm, target=neg_margin), record)
        methods[f"less (proj {args.proj_dim})"] = (less(fm, target=neg_margin,
                                                        proj_dim=args.proj_dim), record)
        methods["adamw-influence"] = (adamw_influence(fm, target=neg_margin), record)
    else:
        methods[f"dvemb (fisher, d={args.proj_dim})"] = (dvemb(fm, target=neg_margin), record)
    methods["tracin-cos"] = (tracin_cos(fm, lrs=lrs, target=neg_margin), [c.params for c in ckpts])
    methods["grad-dot (final)"] = (grad_dot(fm, target=neg_margin), record.final.params)
    rows = []
    for name, (method, params) in methods.items():
        t0 = time.perf_counter()
        state = method.prepare(params, data)
        scores = method.score(params, state, data, test)
        secs = time.perf_counter() - t0
        row = {"method": name, "seconds": secs}
        for label, targets in gts.items():
            res = lds(scores.double(), subsets, targets.double())
            row[label] = (float(res.mean), *map(float, res.ci95))
        rows.append(row)
    return rows, t_gt, gts


if __name__ == "__main__":
    main()
