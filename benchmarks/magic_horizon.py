"""Why MAGIC trails on digits-cnn: LDS of the metagradient truncated to the last K steps.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_horizon --task digits-cnn [--dtype float64]

One reverse pass through the ``"sgd"`` run (``SGD_HPARAMS``) of init seed 0 (the ``magic`` row of
:mod:`benchmarks.magic`); the weight cotangents accumulated over the last ``K`` steps,
``tau^(K)_ij = sum_{t >= T-K} <sbar_{t+1}, d s_{t+1} / d w_i>``, are snapshotted at every epoch
boundary, so one pass gives the LDS of every horizon ``K`` (``K = T``: MAGIC). A chaotic run
shows as an LDS that peaks at a short horizon and falls as ``K`` reaches the early steps, whose
metagradient is large and of little use for retraining. ``--dtype float64`` trains and replays
a float64 copy of the same run (same init, order, hyper-parameters): float32 rounding in the
reverse pass would show as a difference between the two. ``--lrs`` rescales the learning rate of
the differentiated run (the ground truth stays the task's): does a smoother surrogate run
predict the real retraining better? Ground truths as in :mod:`benchmarks.magic` (cached).

After each run's curve, a second reverse pass through the library's
``metagradient(..., horizon="auto")`` scores the ``auto`` row: per test target the horizon ``K_j``
at which that target's params cotangent ``|d f_j / d theta_{T-K}|`` is smallest (chosen by the
run, not by the LDS; the table's ``|sbar|`` column is the whole state's, all targets), next
to the full run (``K = T``), the uniform ``K = 3T/4`` and the best single ``K`` of the curve (chosen
AFTER seeing the LDS: an upper bound for any fixed rule).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_horizon",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-cnn", choices=("digits-lr", "digits-mlp", "digits-cnn"))
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--r", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--lrs", default="1", help="learning-rate factors of the differentiated run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=".cache/dattri_fn")
    return p.parse_args(argv)


def reverse_sweep(step, traj, data, order, cot):
    """Yield ``(K, sbar, w_bar)`` after each step of one reverse pass, ``K = 1 .. T`` steps from
    the end, in :func:`dattri_fn.attribute.magic.metagradient`'s order of operations: ``sbar`` the
    state cotangent (all ``k`` targets, flattened leaves, params first), ``w_bar [k, n]`` the
    weight cotangents through the last ``K`` steps (one buffer, updated in place)."""
    from torch.utils._pytree import tree_map

    from dattri_fn.attribute.metagradient import _split, _sweep

    T = len(order)
    final_params, final_opt = traj.checkpoints[T]
    dtype = next(iter(final_params.values())).dtype
    n = 1 + max(int(r.max()) for r in order)
    weights = torch.ones(n, dtype=dtype)
    k = next(iter(cot.values())).shape[0]
    zeros = tree_map(lambda x: x.new_zeros((k, *x.shape))
                     if isinstance(x, torch.Tensor) and x.is_floating_point() else x, final_opt)
    bar0, _ = _split(({name: cot[name] for name in final_params}, zeros))
    w_bar = torch.zeros(k, n, dtype=dtype)
    for t, rows, bar, rows_bar in _sweep(step, traj, data, order, weights, bar0, 0, None, step):
        w_bar.index_add_(1, rows, rows_bar)
        yield T - t, bar, w_bar


def horizon_metagradients(step, traj, data, order, cot, *, every_steps: int):
    """Return ``({K: d <cot, theta_T> / d w`` through the last ``K`` steps only ``[k, n]}``,
    ``{K: |sbar_{T-K}|}``) for ``K`` = multiples of ``every_steps`` and ``T`` (the loop of
    ``magic.metagradient``; ``sbar`` the state cotangent, all targets together)."""
    T = len(order)
    out, norms = {}, {}
    for K, bar, w_bar in reverse_sweep(step, traj, data, order, cot):
        if K % every_steps == 0 or K == T:
            out[K] = w_bar.clone()
            # The state cotangent's size: growth backward = an unstable linearised run.
            norms[K] = float(torch.sqrt(sum((b * b).sum() for b in bar)))
    return out, norms


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from torch.func import grad, vmap

    from dattri_fn.attribute.magic import metagradient
    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.eval.metrics import lds
    from dattri_fn.eval.retrain import lds_ground_truth
    from dattri_fn.eval.tasks import SGD_HPARAMS, get_task, sgd_run
    from dattri_fn.model import functional_model
    from dattri_fn.training import make_step, train

    args = parse_args(argv)
    torch.set_num_threads(1)
    task = get_task(args.task, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                    hparams=dict(SGD_HPARAMS))
    gts = {"std r=1": lds_ground_truth(task, args.subsets, cache_dir=args.cache_dir, seed=args.seed,
                                       progress=False),
           f"std r={args.r}": lds_ground_truth(task, args.subsets, args.r, cache_dir=args.cache_dir,
                                               seed=args.seed, progress=False),
           "fixed": lds_ground_truth(task, args.subsets, cache_dir=args.cache_dir, seed=args.seed,
                                     progress=False, weighted=True)}
    hp = task.hparams
    dtype = getattr(torch, args.dtype)
    model = task.make_model(0).to(dtype)
    fm = functional_model(model, task.loss_fn)
    target = vmap(grad(functional_model(model, classification_margin_loss).loss), in_dims=(None, 0))
    data = (task.x_train.to(dtype), task.y_train)
    test = (task.x_test.to(dtype), task.y_test)
    per_epoch = math.ceil(task.n_train / hp["batch_size"])
    rows, summary = [], []
    print(f"\n### {args.task} (SGD_HPARAMS, {args.dtype}): LDS of MAGIC truncated to the last K "
          f"steps (T = {hp['epochs'] * per_epoch}), n_train={task.n_train}, n_test={task.n_test}, "
          f"m={args.subsets}\n")
    labels = list(gts)
    print("| lr factor | K steps (epochs) | " + " | ".join(f"LDS {lb}" for lb in labels)
          + " | |sbar_(T-K)| | s |")
    print("|---|---|" + "---|" * (len(labels) + 2))
    for factor in (float(f) for f in args.lrs.split(",")):
        optimizer, order = sgd_run(task.n_train, seed=0, epochs=hp["epochs"],
                                   lr=hp["lr"] * factor, weight_decay=hp["weight_decay"],
                                   batch_size=hp["batch_size"], momentum=hp["momentum"])
        step = make_step(fm, optimizer)
        t0 = time.perf_counter()
        traj = train(step, fm.params, optimizer.init(fm.params), data, order,
                     checkpoint_every=max(1, math.ceil(math.sqrt(len(order)))))
        cot = target(traj.params, test)
        curves, norms = horizon_metagradients(step, traj, data, order, cot, every_steps=per_epoch)
        secs = time.perf_counter() - t0
        for K in sorted(curves):
            scores = curves[K].T.double()
            res = {lb: float(lds(scores, gt.subsets, gt.targets.double()).mean)
                   for lb, gt in gts.items()}
            rows.append({"lr_factor": factor, "K": K, "cotangent_norm": norms[K], **res})
            epochs = K // per_epoch
            if K == len(order) or K % per_epoch == 0 and (epochs in (1, 2) or epochs % 5 == 0):
                print(f"| {factor:g} | {K} ({K / per_epoch:g}) | "
                      + " | ".join(f"{res[lb]:.3f}" for lb in labels)
                      + f" | {norms[K]:.3g} | {secs:.0f} |",
                      flush=True)
        t0 = time.perf_counter()
        auto = metagradient(step, traj, data, order, cot, horizon="auto")
        auto_secs = time.perf_counter() - t0
        res = {lb: float(lds(auto.weights.T.double(), gt.subsets, gt.targets.double()).mean)
               for lb, gt in gts.items()}
        ks = auto.horizon.double() / per_epoch
        rows.append({"lr_factor": factor, "K": "auto", "K_epochs": ks.tolist(), "seconds": auto_secs,
                     **res})
        summary.append((factor, "auto", res, f"epochs min {ks.min():g} / median {ks.median():g} / "
                        f"max {ks.max():g}; {auto_secs:.0f} s"))
        curve = [r for r in rows if r["lr_factor"] == factor and r["K"] != "auto"]
        T = len(order)
        three_quarters = max(r["K"] for r in curve if r["K"] <= 3 * T // 4)
        for name, K in (("full (K = T)", T), ("K = 3T/4", three_quarters)):
            summary.append((factor, name, next(r for r in curve if r["K"] == K), f"K = {K}"))
        best = max(curve, key=lambda r: r[labels[0]])
        summary.append((factor, "best K (after the fact)", best, f"K = {best['K']}"))
    print("\n| lr factor | horizon | " + " | ".join(f"LDS {lb}" for lb in labels) + " | K |")
    print("|---|---|" + "---|" * (len(labels) + 1))
    for factor, name, res, note in summary:
        print(f"| {factor:g} | {name} | " + " | ".join(f"{res[lb]:.3f}" for lb in labels) + f" | {note} |")
    return rows


if __name__ == "__main__":
    main()
