"""Horizon rules for MAGIC, one run and a seed ensemble, from one recorded reverse pass per run.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_rules --task digits-cnn
    OMP_NUM_THREADS=1 python -m benchmarks.magic_rules --task text-lm

For each of ``--runs`` training runs (init seeds ``0..R-1``: the ``magic`` / ``magic-ens`` runs of
:mod:`benchmarks.magic`, the digits tasks under ``SGD_HPARAMS``, text-lm under its own full-batch
Adam) one reverse pass records, after every step ``t``, the weight cotangents accumulated through
the last ``K = T - t`` steps, ``W[K] = sum_{s >= T-K} <sbar_{s+1}, d s_{s+1} / d w>`` ``[k, n]``,
and every target's params cotangent norm ``|thetabar^j_{T-K}|``. Every rule below is a function
of those two records, so all rules are scored on the same runs:

* ``exact``: ``W[T]`` (``magic(horizon=None)``);
* ``auto``: ``W[K_j]`` with ``K_j = argmin_K |thetabar^j_{T-K}|`` (``magic``'s default);
* ``auto-band``: the mean of ``W[K]`` over every ``K >= K_j / 2`` whose norm is within 10% of
  the minimum (the near-minimal horizons, instead of the one argmin of a noisy curve);
* ``ramp``: the mean of ``W[K]`` over ``K = 1..T`` (step ``t``'s contribution weighted
  ``(t + 1) / T``: the expected truncated metagradient under a uniform prior on the horizon, a
  soft truncation with no chosen horizon);
* ``auto-ramp``: the mean of ``W[K]`` over ``K = 1..K_j`` (a uniform prior on the horizon up to
  ``auto``'s: step ``t >= T - K_j`` weighted ``(t - T + K_j + 1) / K_j``, earlier steps 0);
* ``shared``: ``W[K*]`` with one ``K* = argmin_K`` median over targets of the norm.

Each rule is scored for run 0 alone and for the mean over the ``R`` runs (``ens``; for ``auto``
that is ``magic(horizon="auto")`` on the list of ``R`` initial params, each member with its own
``K_j``). LDS against the evaluation ground truths of :mod:`benchmarks.magic` (std r=1, std r=R,
fixed; subsets of ``--seed``) and a VALIDATION ground truth: ``--val-subsets`` fresh half-subsets
drawn with seed ``--val-seed`` (other subsets, other retraining seeds). A rule to adopt is chosen
on the validation column only; the evaluation columns are then reported for every rule as they
come. Ground truths are cached as in :mod:`benchmarks.magic`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

SIZES = {"text-lm": (128, 16, 32)}
DIGITS_SIZES = (500, 50, 64)
RULES = ("exact", "auto", "auto-band", "ramp", "auto-ramp", "shared")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_rules",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-cnn",
                   choices=("digits-lr", "digits-mlp", "digits-cnn", "text-lm"))
    p.add_argument("--runs", type=int, default=3, help="training seeds of the ensemble")
    p.add_argument("--r", type=int, default=3, help="seeds per subset of the averaged ground truth")
    p.add_argument("--val-seed", type=int, default=1)
    p.add_argument("--val-subsets", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=".cache/dattri_fn")
    p.add_argument("--records", default=None,
                   help="folder: save each run's (W, norms) there, or load them if present")
    args = p.parse_args(argv)
    args.n_train, args.n_test, args.subsets = SIZES.get(args.task, DIGITS_SIZES)
    return args


def record_pass(step, traj, data, order, cot) -> tuple[Tensor, Tensor]:
    """Return ``W [T, k, n]`` (``W[K-1]``: weight cotangents through the last ``K`` steps) and
    ``norms [T, k]`` (``|thetabar^j_{T-K}|``, the params part of the state cotangent), from one
    reverse pass in :func:`dattri_fn.attribute.magic.metagradient`'s order of operations."""
    from benchmarks.magic_horizon import reverse_sweep
    from dattri_fn.attribute.magic import _row_norms

    T = len(order)
    final_params = traj.checkpoints[T][0]
    k = next(iter(cot.values())).shape[0]
    W = norms = None
    for K, bar, w_bar in reverse_sweep(step, traj, data, order, cot):
        if W is None:
            W = torch.empty(T, *w_bar.shape, dtype=w_bar.dtype)
            norms = torch.empty(T, k, dtype=w_bar.dtype)
        W[K - 1] = w_bar
        norms[K - 1] = _row_norms(bar[:len(final_params)], k)
    return W, norms


def apply_rules(W: Tensor, norms: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Return ``{rule: [k, n]}`` for :data:`RULES` and the ``auto`` horizons ``K_j [k]``."""
    T, k, _ = W.shape
    cols = torch.arange(k)
    best = norms.argmin(0)  # [k], K_j - 1 (first minimum: ties to the shorter horizon)
    K = torch.arange(1, T + 1)[:, None]  # [T, 1]
    band = (norms <= 1.1 * norms.min(0).values) & (K >= (best + 1)[None] / 2)  # [T, k]
    banded = (W * band[..., None]).sum(0) / band.sum(0)[:, None]
    shared = int(norms.median(1).values.argmin())
    upto = (K <= (best + 1)[None]).to(W.dtype)  # [T, k]
    out = {"exact": W[-1], "auto": W[best, cols], "auto-band": banded, "ramp": W.mean(0),
           "auto-ramp": (W * upto[..., None]).sum(0) / upto.sum(0)[:, None], "shared": W[shared]}
    return out, best + 1


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from torch.func import grad, vmap

    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.eval.metrics import lds
    from dattri_fn.eval.retrain import lds_ground_truth
    from dattri_fn.eval.tasks import SGD_HPARAMS, adam_run, get_task, sgd_run, task_step
    from dattri_fn.model import functional_model
    from dattri_fn.training import make_step, train

    args = parse_args(argv)
    torch.set_num_threads(1)
    hparams = None if args.task == "text-lm" else dict(SGD_HPARAMS)
    task = get_task(args.task, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                    hparams=hparams)
    gt_opts = {"cache_dir": args.cache_dir, "progress": False}
    t0 = time.perf_counter()
    gts = {"std r=1": lds_ground_truth(task, args.subsets, seed=args.seed, **gt_opts),
           f"std r={args.r}": lds_ground_truth(task, args.subsets, args.r, seed=args.seed, **gt_opts),
           "fixed": lds_ground_truth(task, args.subsets, seed=args.seed, weighted=True, **gt_opts),
           "val": lds_ground_truth(task, args.val_subsets, seed=args.val_seed, **gt_opts)}
    print(f"ground truths {time.perf_counter() - t0:.0f} s", flush=True)
    hp = task.hparams
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    per_rule: dict[str, list[Tensor]] = {r: [] for r in RULES}
    horizons = []
    for s in range(args.runs):
        fm = functional_model(task.make_model(s), task.loss_fn)
        if hp["optimizer"] == "sgd":
            optimizer, order = sgd_run(task.n_train, seed=s, epochs=hp["epochs"], lr=hp["lr"],
                                       weight_decay=hp["weight_decay"],
                                       batch_size=hp["batch_size"], momentum=hp["momentum"])
            step = make_step(fm, optimizer)
            target = functional_model(task.make_model(s), classification_margin_loss).loss
        else:
            optimizer, order = adam_run(task.n_train, epochs=hp["epochs"], lr=hp["lr"])
            step = task_step(fm, optimizer, hp["weight_decay"])
            target = lambda p, ex, fm=fm: -fm.loss(p, ex)
        t1 = time.perf_counter()
        saved = Path(args.records or ".") / f"{args.task}-run{s}.pt"
        if args.records and saved.exists():
            W, norms = torch.load(saved)
        else:
            traj = train(step, fm.params, optimizer.init(fm.params), data, order,
                         checkpoint_every=max(1, math.ceil(math.sqrt(len(order)))))
            cot = vmap(grad(target), in_dims=(None, 0))(traj.params, test)
            W, norms = record_pass(step, traj, data, order, cot)
            if args.records:
                saved.parent.mkdir(parents=True, exist_ok=True)
                torch.save((W, norms), saved)
        rules, K = apply_rules(W, norms)
        for name, v in rules.items():
            per_rule[name].append(v)
        horizons.append(K)
        print(f"run {s}: T = {len(order)}, K_j min {int(K.min())} / median "
              f"{float(K.double().median()):g} / max {int(K.max())}, "
              f"{time.perf_counter() - t1:.0f} s", flush=True)
        del W
    labels = list(gts)
    rows = []
    print(f"\n### {args.task}: MAGIC horizon rules, run 0 and the {args.runs}-run ensemble; "
          f"n_train={task.n_train}, n_test={task.n_test}, m={args.subsets} (val: m="
          f"{args.val_subsets}, seed {args.val_seed})\n")
    print("| rule | runs | " + " | ".join(f"LDS {lb} [95% CI]" for lb in labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for name in RULES:
        for runs, scores in (("run 0", per_rule[name][0]),
                             (f"ens {args.runs}", torch.stack(per_rule[name]).mean(0))):
            res = {lb: lds(scores.T.double(), gt.subsets, gt.targets.double()) for lb, gt in gts.items()}
            rows.append({"rule": name, "runs": runs,
                         **{lb: (float(r.mean), *map(float, r.ci95)) for lb, r in res.items()}})
            print(f"| {name} | {runs} | " + " | ".join(
                f"{float(r.mean):.3f} [{float(r.ci95[0]):.3f}, {float(r.ci95[1]):.3f}]"
                for r in res.values()) + " |", flush=True)
    return rows


if __name__ == "__main__":
    main()
