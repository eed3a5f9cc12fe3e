"""Dropout ensembles of influence, TRAK and representer points (``dropout_members``) on digits-mlp.

    OMP_NUM_THREADS=1 python -m benchmarks.dropout_members [--masks 4]

digits-mlp (n_train 500, n_test 50, LDS over the 64 cached half-subsets of
``benchmarks.issue18_methods``), one trained model (seed 0). Each method is run as written on
the MLP's plain per-example functions, then as ``dropout_members`` with a dropout of p = 0.2 on
the hidden layer at attribution time (the model was trained without it), ``--masks`` members.
TRAK projects to ``n_train / 4`` as the runner's recipe does (``recipes.trak_dim``): with
``proj_dim`` near ``n_train`` its kernel interpolates and the LDS collapses (0.05 at 512).
Time is prepare + score, both in this process, so the ratio is what the members cost. The
first row puts an ``nn.Dropout`` into the trained module itself (eval() for the one model,
train() under ``mask(fm)`` for the members), so the factored Gauss-Newton path runs.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F

from dattri_fn import functional_model
from dattri_fn.attribute import influence, representer, trak
from dattri_fn.attribute.ensemble import dropout_members
from dattri_fn.attribute.outputs import classification_margin, classification_weight
from dattri_fn.eval.metrics import lds
from dattri_fn.eval.retrain import lds_ground_truth
from dattri_fn.eval.tasks import get_task, train_model

P_DROP = 0.2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--masks", type=int, default=4)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    task = get_task("digits-mlp", n_train=500, n_test=50, seed=0)
    gt = lds_ground_truth(task, 64, cache_dir=".cache/dattri_fn", seed=0, progress=False)
    fm = functional_model(train_model(task, seed=0).eval(), task.loss_fn)
    params = fm.params
    wd = float(task.hparams["weight_decay"])
    train = [(task.x_train[i:i + 256], task.y_train[i:i + 256]) for i in range(0, 500, 256)]
    test = (task.x_test, task.y_test)

    def hidden(p, z, drop=False):
        h = torch.tanh(p["0.weight"] @ z[0] + p["0.bias"])
        return F.dropout(h, P_DROP, training=True) if drop else h

    head = lambda p, h: p["2.weight"] @ h + p["2.bias"]
    forward = lambda drop: (lambda p, z: head(p, hidden(p, z, drop)))
    loss = lambda drop: (lambda p, z: F.cross_entropy(forward(drop)(p, z)[None], z[1][None]))
    ce = lambda o, y: F.cross_entropy(o[None], y[None])
    builders = {
        "IF (Hessian + 2 l2 I, CG 100)": lambda fn: influence(
            fn(loss), solver="cg", max_iter=100, l2=wd / 2, damping=1e-3 + wd),
        "IF (empirical Fisher, CG 100)": lambda fn: influence(
            fn(loss), solver="cg", max_iter=100, l2=wd / 2, damping=1e-3 + wd,
            curvature="fisher"),
        "TRAK (proj_dim 125 = n/4, margin)": lambda fn: trak(
            fn(lambda d: classification_margin(forward(d))), proj_dim=125,
            weight_fn=fn(lambda d: classification_weight(forward(d)))),
        "representer points (l2 = wd/2)": lambda fn: representer(
            fn(lambda d: (lambda p, z: hidden(p, z, d))), head, ce, l2=wd / 2),
    }
    # The module itself with a Dropout layer: eval() is the one model, train() the members
    # (mask(fm) runs its forward under the masks, so the factored Gauss-Newton path applies).
    net = train_model(task, seed=0)
    drop_net = torch.nn.Sequential(net[0], net[1], torch.nn.Dropout(P_DROP), net[2])
    fm_eval = functional_model(copy.deepcopy(drop_net).eval(), task.loss_fn)
    fm_train = functional_model(drop_net.train(), task.loss_fn)
    gn = lambda m: influence(m, solver="cg", max_iter=100, l2=wd / 2, damping=1e-3 + wd)
    modules = {"IF (Gauss-Newton, CG 100), FunctionalModel": (gn(fm_eval), lambda mask: gn(
        mask(fm_train)), fm_eval.params)}
    print(f"| method | LDS [95% CI], one model | LDS [95% CI], {args.masks} dropout members "
          "| seconds (one / members) |")
    print("|---|---|---|---|")
    rows = {label: (build(lambda make: make(False)),
                    lambda mask, build=build: build(lambda make: mask(make(True))), params)
            for label, build in builders.items()}
    for label, (one, build, p) in {**modules, **rows}.items():
        ens = dropout_members(build, n_masks=args.masks, seed=0)
        cells, times = [], []
        for method in (one, ens):
            t0 = time.perf_counter()
            S = method.score(p, method.prepare(p, train), train, test)
            times.append(time.perf_counter() - t0)
            res = lds(S.double(), gt.subsets, gt.targets.double())
            cells.append(f"{float(res.mean):.3f} [{float(res.ci95[0]):.3f}, "
                         f"{float(res.ci95[1]):.3f}]")
        print(f"| {label} | {cells[0]} | {cells[1]} | {times[0]:.2f} / {times[1]:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
