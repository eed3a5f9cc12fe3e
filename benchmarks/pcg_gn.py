"""CG on the Gauss-Newton preconditioned by K-FAC/EK-FAC of the empirical or the true Fisher.

    OMP_NUM_THREADS=1 python -m benchmarks.pcg_gn

Digits MLPs (hidden 32 / 128, 500 / 1,000 training points, 50 test rows as right-hand sides),
damping ``weight_decay + 1e-3``, rtol 1e-4: iterations (mean and max over rows) and seconds of
``cg_solve`` with no preconditioner and with each of the four damped K-FAC/EK-FAC inverses.
"""

from __future__ import annotations

import time
import warnings

import torch

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.eval.tasks import get_task, train_model
from dattri_fn.operators import gauss_newton
from dattri_fn.operators.kfac import ekfac_factors, ihvp_ekfac, ihvp_kfac, kfac_factors
from dattri_fn.solve import cg_solve


def main() -> None:
    warnings.simplefilter("ignore")
    print("| P | preconditioner | iterations mean | max | converged | s |")
    print("|---|---|---|---|---|---|")
    for hidden, n_train in ((32, 500), (128, 1000)):
        task = get_task("digits-mlp", n_train=n_train, n_test=50, seed=0,
                        hparams={"hidden": hidden, "epochs": 100})
        model = train_model(task, seed=0).eval()
        fm = functional_model(model, task.loss_fn)
        train = [(task.x_train[i:i + 256], task.y_train[i:i + 256])
                 for i in range(0, n_train, 256)]
        damping = task.hparams["weight_decay"] + 1e-3
        op = gauss_newton(fm)(fm.params, train)
        B = per_sample_grad(fm.loss, fm.params, (task.x_test, task.y_test))
        Ms = {"none": None}
        for fisher in ("empirical", "true"):
            for kind, fit, inv in (("kfac", kfac_factors, ihvp_kfac),
                                   ("ekfac", ekfac_factors, ihvp_ekfac)):
                f = fit(model, task.loss_fn, fm.params, train, fisher=fisher, seed=0)
                Ms[f"{kind} {fisher}"] = inv(f, damping=damping)
        for name, M in Ms.items():
            t0 = time.perf_counter()
            r = cg_solve(op, B, damping=damping, rtol=1e-4, max_iter=300, M=M)
            dt = time.perf_counter() - t0
            print(f"| {B.shape[1]:,} | {name} | {float(r.num_iters.float().mean()):.1f} | "
                  f"{int(r.num_iters.max())} | {bool(r.converged.all())} | {dt:.2f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
