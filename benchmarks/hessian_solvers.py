"""Which inverse serves attribution on an indefinite Hessian: CG's stop, MINRES, the literal LU?

    OMP_NUM_THREADS=1 python -m benchmarks.hessian_solvers

digits-mlp (n_train 500, n_test 50, the benchmark runner's task and first model), influence with
``l2 = wd / 2`` and damping ``1e-3 + wd`` on the exact Hessian: CG (stops a row at the first
direction of non-positive curvature), MINRES (minimum residual on the same Krylov space: the
literal damped inverse when it converges), the explicit LU solve (the literal inverse, as
dattri's explicit attributor), and the Gauss-Newton with CG for reference. LDS over the 64
retrained half-subsets of ``benchmarks.run`` (cached under ``.cache/dattri_fn``), time of
prepare + score, and the fraction of test points whose scores are all zero.
"""

from __future__ import annotations

import time
import warnings

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.eval.metrics import lds
from dattri_fn.eval.retrain import lds_ground_truth
from dattri_fn.eval.tasks import get_task, train_model


def main() -> None:
    warnings.simplefilter("ignore")
    task = get_task("digits-mlp", n_train=500, n_test=50, seed=0)
    gt = lds_ground_truth(task, 64, cache_dir=".cache/dattri_fn", seed=0, progress=False)
    fm = functional_model(train_model(task, seed=0).eval(), task.loss_fn)
    wd = float(task.hparams["weight_decay"])
    train = [(task.x_train[i:i + 256], task.y_train[i:i + 256]) for i in range(0, 500, 256)]
    test = (task.x_test, task.y_test)
    base = dict(l2=wd / 2, damping=1e-3 + wd)
    rows = []
    for label, opts in [
        ("hessian, cg 10", dict(solver="cg", curvature="hessian", max_iter=10)),
        ("hessian, cg 100", dict(solver="cg", curvature="hessian", max_iter=100)),
        ("hessian, minres 10", dict(solver="minres", curvature="hessian", max_iter=10)),
        ("hessian, minres 100", dict(solver="minres", curvature="hessian", max_iter=100)),
        ("hessian, explicit lu", dict(solver="explicit", curvature="hessian", method="lu")),
        ("gauss-newton, cg 100", dict(solver="cg", max_iter=100)),
    ]:
        m = influence(fm, **base, **opts)
        t0 = time.perf_counter()
        S = m.score(fm.params, m.prepare(fm.params, train), train, test)
        dt = time.perf_counter() - t0
        res = lds(S.double(), gt.subsets, gt.targets.double())
        empty = float((S.abs().amax(0) == 0).float().mean())
        rows.append(f"| {label} | {float(res.mean):.3f} [{float(res.ci95[0]):.3f}, "
                    f"{float(res.ci95[1]):.3f}] | {dt:.2f} | {empty:.2f} |")
    print("| curvature, solver | LDS [95% CI] | seconds | test points with no scores |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
