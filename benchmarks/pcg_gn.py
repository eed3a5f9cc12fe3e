"""CG on the Gauss-Newton preconditioned by K-FAC/EK-FAC of the empirical, true or expected Fisher.

    OMP_NUM_THREADS=1 python -m benchmarks.pcg_gn [--fishers empirical,true,expected]
        [--dampings 2e-3,1e-2,0.1] [--rtol 1e-6]

Digits MLPs (hidden 32 / 128, 500 / 1,000 training points, 50 test rows as right-hand sides):
iterations (mean and max over rows) and seconds of ``cg_solve`` with no preconditioner and with
each damped K-FAC/EK-FAC inverse (``fisher="expected"``: the exact expectation over the model's
outputs, whose layer blocks are the Gauss-Newton's) and the rank-200 randomized Nystrom sketch of
the Gauss-Newton itself, and the seconds to build the factors (or the sketch).
``damping`` is the total added to the Gauss-Newton (what ``influence`` passes for ``l2 = wd / 2``
and its own ``damping``: ``wd + damping``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.eval.tasks import get_task, train_model
from dattri_fn.operators import gauss_newton
from dattri_fn.operators.kfac import ekfac_factors, ihvp_ekfac, ihvp_kfac, kfac_factors
from dattri_fn.solve import cg_solve
from dattri_fn.solve.nystrom import nystrom_preconditioner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fishers", default="empirical,true,expected")
    ap.add_argument("--dampings", default="2e-3,1e-2,0.1")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--sizes", default="32:500,128:1000")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print("| P | damping | preconditioner | iterations mean | max | converged | factors s | "
          "CG s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        hidden, n_train = map(int, size.split(":"))
        task = get_task("digits-mlp", n_train=n_train, n_test=50, seed=0,
                        hparams={"hidden": hidden, "epochs": 100})
        model = train_model(task, seed=0).eval()
        fm = functional_model(model, task.loss_fn)
        train = [(task.x_train[i:i + 256], task.y_train[i:i + 256])
                 for i in range(0, n_train, 256)]
        op = gauss_newton(fm)(fm.params, train)
        B = per_sample_grad(fm.loss, fm.params, (task.x_test, task.y_test))
        factors = {}
        for fisher in args.fishers.split(","):
            for kind, fit in (("kfac", kfac_factors), ("ekfac", ekfac_factors)):
                t0 = time.perf_counter()
                factors[f"{kind} {fisher}"] = fit(model, task.loss_fn, fm.params, train,
                                                  fisher=fisher, seed=0)
                factors[f"{kind} {fisher}"] = (factors[f"{kind} {fisher}"],
                                               time.perf_counter() - t0)
        for damping in map(float, args.dampings.split(",")):
            t0 = time.perf_counter()
            Ms = {"none": (None, 0.0),
                  "nystrom 200": (nystrom_preconditioner(op, damping=damping), 0.0)}
            Ms["nystrom 200"] = (Ms["nystrom 200"][0], time.perf_counter() - t0)
            for name, (f, t_f) in factors.items():
                inv = ihvp_kfac if name.startswith("kfac") else ihvp_ekfac
                Ms[name] = (inv(f, damping=damping), t_f)
            for name, (M, t_f) in Ms.items():
                t0 = time.perf_counter()
                r = cg_solve(op, B, damping=damping, rtol=args.rtol, max_iter=500, M=M)
                dt = time.perf_counter() - t0
                print(f"| {B.shape[1]:,} | {damping:g} | {name} | "
                      f"{float(r.num_iters.float().mean()):.1f} | {int(r.num_iters.max())} | "
                      f"{bool(r.converged.all())} | {t_f:.2f} | {dt:.2f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
