"""The issue-18 methods on digits-mlp: LDS, time, against the methods they extend.

    OMP_NUM_THREADS=1 python -m benchmarks.issue18_methods

digits-mlp (n_train 500, n_test 50, the task of ``benchmarks.hessian_solvers``), LDS over the
64 retrained half-subsets (cached under ``.cache/dattri_fn``), time of prepare + score. Models:
``train_model(task, seed=s)`` for s = 0, 1, 2 (three independently trained models: the
"ensemble" rows use all three, the others seed 0). Rows: influence (Gauss-Newton, CG 100) on one
model, on the list of three (mean of per-model scores) and with RelatIF's two normalisations;
Grad-Dot / Grad-Cos on one model and TracIn / TracIn-Cos over the three; the dropout ensemble
(a dropout of p = 0.2 on the hidden layer at attribution time, 8 masks) against Grad-Dot; and
KNN-Shapley (K = 5) on raw inputs and on the hidden features, whose scores are data values, not
influence (its LDS is reported for scale).

``--relatif-cost``: RelatIF's cost alone (issue 18): prepare, a first and a second ``score``
and ``self_score`` of IF (GN, CG 100) and RelatIF 'l'/'theta' on one model, the best of
``--repeats`` runs each (wall and process CPU seconds: the CPU time is robust to a loaded
machine), with the LDS of the first score (the scores do not depend on when the
normalisers are computed).

Second table: noisy-label detection on digits-mlp with 10% flipped labels (n_train 500, the 200
test points as the clean validation set of the valuation): ROC-AUC of IF self-influence (GN,
CG 100) against minus the KNN-Shapley data value ``scores.mean(1)`` (a mislabelled point's
neighbours vote against it), with the time of each.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from dattri_fn import functional_model
from dattri_fn.attribute import grad_cos, grad_dot, influence, tracin
from dattri_fn.attribute.ensemble import dropout_ensemble
from dattri_fn.attribute.gradsim import tracin_cos
from dattri_fn.attribute.knn_shapley import knn_shapley
from dattri_fn.eval.metrics import lds, noisy_label_detection
from dattri_fn.eval.retrain import lds_ground_truth
from dattri_fn.eval.tasks import get_task, train_model


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    task = get_task("digits-mlp", n_train=500, n_test=50, seed=0)
    gt = lds_ground_truth(task, 64, cache_dir=".cache/dattri_fn", seed=0, progress=False)
    fms = [functional_model(train_model(task, seed=s).eval(), task.loss_fn) for s in range(3)]
    fm, params = fms[0], [f.params for f in fms]
    wd, lr = float(task.hparams["weight_decay"]), float(task.hparams["lr"])
    train = [(task.x_train[i:i + 256], task.y_train[i:i + 256]) for i in range(0, 500, 256)]
    test = (task.x_test, task.y_test)
    base = dict(solver="cg", max_iter=100, l2=wd / 2, damping=1e-3 + wd)

    def dropout_loss(p, z):  # the MLP with dropout on its hidden layer
        x, y = z
        h = F.dropout(torch.tanh(p["0.weight"] @ x + p["0.bias"]), 0.2, training=True)
        return F.cross_entropy((p["2.weight"] @ h + p["2.bias"])[None], y[None])

    hidden = lambda p, z: torch.tanh(p["0.weight"] @ z[0] + p["0.bias"])
    rows = [
        ("IF (GN, CG 100), one model", influence(fm, **base), fm.params),
        ("IF (GN, CG 100), list of 3 models", influence(fm, **base), params),
        ("RelatIF 'l' (GN, CG 100)", influence(fm, relatif="l", **base), fm.params),
        ("RelatIF 'theta' (GN, CG 100)", influence(fm, relatif="theta", **base), fm.params),
        ("Grad-Dot, one model", grad_dot(fm), fm.params),
        ("Grad-Cos, one model", grad_cos(fm), fm.params),
        ("TracIn, 3 models", tracin(fm, lrs=[lr] * 3), params),
        ("TracIn-Cos, 3 models", tracin_cos(fm, lrs=[lr] * 3), params),
        ("dropout ensemble Grad-Dot, 8 masks", dropout_ensemble(dropout_loss, n_masks=8),
         fm.params),
        ("KNN-Shapley K=5, raw inputs", knn_shapley(k=5), fm.params),
        ("KNN-Shapley K=5, hidden features", knn_shapley(hidden, k=5), fm.params),
    ]
    out = []
    for label, method, p in rows:
        t0 = time.perf_counter()
        S = method.score(p, method.prepare(p, train), train, test)
        dt = time.perf_counter() - t0
        res = lds(S.double(), gt.subsets, gt.targets.double())
        out.append(f"| {label} | {float(res.mean):.3f} [{float(res.ci95[0]):.3f}, "
                   f"{float(res.ci95[1]):.3f}] | {dt:.2f} |")
    print("| method | LDS [95% CI] | seconds |")
    print("|---|---|---|")
    print("\n".join(out))
    noisy(hidden)


def noisy(hidden) -> None:
    task = get_task("digits-mlp", n_train=500, n_test=200, seed=0, noisy=True)
    fm = functional_model(train_model(task, seed=0).eval(), task.loss_fn)
    wd = float(task.hparams["weight_decay"])
    train = [(task.x_train[i:i + 256], task.y_train[i:i + 256]) for i in range(0, 500, 256)]
    test = (task.x_test, task.y_test)
    m = influence(fm, solver="cg", max_iter=100, l2=wd / 2, damping=1e-3 + wd)
    t0 = time.perf_counter()
    rows = [("IF self-influence (GN, CG 100)",
             m.self_score(fm.params, m.prepare(fm.params, train), train),
             time.perf_counter() - t0)]
    for label, fn in (("raw inputs", None), ("hidden features", hidden)):
        for k in (5, 10):
            km = knn_shapley(fn, k=k)
            t0 = time.perf_counter()
            value = km.score(fm.params, km.prepare(fm.params, train), None, test).mean(1)
            rows.append((f"-KNN-Shapley value, K={k}, {label}", -value,
                         time.perf_counter() - t0))
    print()
    print("| noisy-label detector | AUC | found in top 10% | seconds |")
    print("|---|---|---|---|")
    for label, score, dt in rows:
        res = noisy_label_detection(score.double(), task.flipped)
        print(f"| {label} | {float(res.auc):.3f} | {float(res.found_fraction_at[0.1]):.2f} | "
              f"{dt:.2f} |")


def relatif_cost(repeats: int) -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    task = get_task("digits-mlp", n_train=500, n_test=50, seed=0)
    gt = lds_ground_truth(task, 64, cache_dir=".cache/dattri_fn", seed=0, progress=False)
    fm = functional_model(train_model(task, seed=0).eval(), task.loss_fn)
    wd = float(task.hparams["weight_decay"])
    train = [(task.x_train[i:i + 256], task.y_train[i:i + 256]) for i in range(0, 500, 256)]
    test = (task.x_test, task.y_test)
    base = dict(solver="cg", max_iter=100, l2=wd / 2, damping=1e-3 + wd)
    print("| method | LDS | prepare s | score s | second score s | self_score s |")
    print("|---|---|---|---|---|---|")
    for label, kind in (("IF (GN, CG 100)", None), ("RelatIF 'l'", "l"),
                        ("RelatIF 'theta'", "theta")):
        best = None
        for _ in range(repeats):
            m = influence(fm, relatif=kind, **base)
            calls = [lambda: m.prepare(fm.params, train)]
            calls += [lambda: m.score(fm.params, state, train, test)] * 2
            calls += [lambda: m.self_score(fm.params, state, train)]
            times = []
            for i, call in enumerate(calls):
                t0, c0 = time.perf_counter(), time.process_time()
                out = call()
                times.append((time.perf_counter() - t0, time.process_time() - c0))
                if i == 0:
                    state = out
                elif i == 1:
                    S = out
            best = times if best is None else [(min(a[0], b[0]), min(a[1], b[1]))
                                               for a, b in zip(best, times, strict=True)]
        res = lds(S.double(), gt.subsets, gt.targets.double())
        print(f"| {label} | {float(res.mean):.3f} | "
              + " | ".join(f"{w:.2f} ({c:.2f} CPU)" for w, c in best) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relatif-cost", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.relatif_cost:
        relatif_cost(args.repeats)
    else:
        main()
