"""Influence on the Gauss-Newton with CG as a user writes it, against the autodiff product it replaced.

    OMP_NUM_THREADS=1 python -m benchmarks.defaults_gn

Two MLPs on sklearn digits: the digits-mlp task (hidden 32, P = 2,410; 500 x 50) and a
128-unit one (P = 9,610; 1,000 x 200). Rows, timed in this process (prepare + score, best of 2,
after a warm-up call on a slice):

* ``defaults``: ``influence(fm, solver="cg", damping=..., l2=wd / 2, max_iter=100)``; the
  curvature builder picks the factored Gauss-Newton itself;
* ``M=ekfac``: the same, preconditioned by EK-FAC built on the training data (``M="ekfac"``);
* ``user gnvp``: the same with ``curvature=`` a Gauss-Newton the user builds from
  :func:`dattri_fn.gnvp` (what the README offered before the builder), no ``batch_rows``.

Both compute the same matrix; the script prints the time ratio and the scores' max relative
difference (CG stops at the same rtol, so it is small, not zero).
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from dattri_fn import functional_model, gnvp
from dattri_fn.attribute import influence
from dattri_fn.eval.tasks import get_task, train_model

CASES = {"digits-mlp P=2,410": (500, 50, 32), "MLP P=9,610": (1000, 200, 128)}


def _timed(method, params, train, test, repeats: int = 2) -> tuple[float, torch.Tensor]:
    best, S = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        S = method.score(params, method.prepare(params, train), train, test)
        best = min(best, time.perf_counter() - t0)
    return best, S


def main() -> None:
    warnings.simplefilter("ignore")
    print("| model | n_train x n_test | defaults s | M=ekfac s | user gnvp s | ratio | "
          "ratio M=ekfac | max rel diff | max rel diff M=ekfac |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, (n_train, n_test, hidden) in CASES.items():
        task = get_task("digits-mlp", n_train=n_train, n_test=n_test, seed=0,
                        hparams={"hidden": hidden, "epochs": 100})
        model = train_model(task, seed=0).eval()
        fm = functional_model(model, task.loss_fn)
        wd = float(task.hparams["weight_decay"])
        train = [(task.x_train[i:i + 256], task.y_train[i:i + 256]) for i in range(0, n_train, 256)]
        test = (task.x_test, task.y_test)
        out_loss = lambda out, ex: F.cross_entropy(out[None], ex[-1][None])
        user_gn = lambda p, data: gnvp(fm.forward, out_loss, p, data)
        opts = dict(solver="cg", damping=1e-3, l2=wd / 2, max_iter=100)
        fast = influence(fm, **opts)
        pre = influence(fm, M="ekfac", **opts)
        slow = influence(fm, curvature=user_gn, **{**opts, "damping": 1e-3 + wd})
        warm = ([(task.x_train[:32], task.y_train[:32])], (task.x_test[:2], task.y_test[:2]))
        for m in (fast, pre, slow):
            m.score(fm.params, m.prepare(fm.params, warm[0]), *warm)
        t_fast, S_fast = _timed(fast, fm.params, train, test)
        t_pre, S_pre = _timed(pre, fm.params, train, test)
        t_slow, S_slow = _timed(slow, fm.params, train, test, repeats=1)
        diff = lambda S: float((S - S_slow).abs().max() / S_slow.abs().max())
        print(f"| {label} | {n_train} x {n_test} | {t_fast:.2f} | {t_pre:.2f} | {t_slow:.2f} | "
              f"{t_fast / t_slow:.3f} | {t_pre / t_slow:.3f} | {diff(S_fast):.1e} | "
              f"{diff(S_pre):.1e} |")


if __name__ == "__main__":
    main()
