"""Influence on the Gauss-Newton with CG as a user writes it, against the autodiff product it replaced.

    OMP_NUM_THREADS=1 python -m benchmarks.defaults_gn [--no-gnvp] [--scan 1,5,10,13,20,50]
        [--rows 'defaults,block CG,M=None'] [--repeats 2] [--cases small,large]

Two MLPs on sklearn digits: the digits-mlp task (hidden 32, P = 2,410; 500 x 50) and a
128-unit one (P = 9,610; 1,000 x 200). Rows, timed in this process (prepare + score, best of
``--repeats`` interleaved rounds, after a warm-up call on a slice):

* ``defaults``: ``influence(fm, solver="cg", damping=..., l2=wd / 2, max_iter=100)``; the
  curvature builder picks the factored Gauss-Newton itself, and with ``M`` unset influence
  solves each call's rows by block CG (:func:`~dattri_fn.solve.block_cg.ihvp_block_cg`, all the
  rows of a call in one Krylov space, no sketch; the default since stop 18);
* ``block CG``: the same method under :func:`block_default`, the patch that measured block CG
  before it was wired in (stop 18); now a no-op, so it times the default a second time;
* ``M=None``: plain CG (the default before the automatic sketch);
* ``M=nystrom``: the same, preconditioned by a rank-200 randomized Nystrom sketch of the
  Gauss-Newton itself (``M="nystrom"``);
* ``M=ekfac`` / ``M=ekfac exp.`` / ``M=kfac exp.``: preconditioned by EK-FAC of the empirical
  Fisher (``M="ekfac"``), or EK-FAC/K-FAC of the expected Fisher
  (``M=solvers.ekfac(fisher="expected")``), built on the training data;
* ``user gnvp``: the same with ``curvature=`` a Gauss-Newton the user builds from
  :func:`dattri_fn.gnvp` (what the README offered before the builder), no ``batch_rows``
  (skipped with ``--no-gnvp``; the differences are then against ``defaults``).

All compute the same matrix; the script prints times, the ratio to ``defaults`` and each row's
scores' max relative difference from the reference (CG stops at the same rtol, so it is small,
not zero).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from dattri_fn import functional_model, gnvp, solvers
from dattri_fn.attribute import influence
from dattri_fn.eval.tasks import get_task, train_model

CASES = {"digits-mlp P=2,410": (500, 50, 32), "MLP P=9,610": (1000, 200, 128)}
KEYS = {"small": "digits-mlp P=2,410", "large": "MLP P=9,610"}


@contextlib.contextmanager
def block_default():
    """Influence's CG with ``M`` unset on the Gauss-Newton runs block CG (the proposed default);
    ``M="nystrom"`` keeps the sketch. A no-op once influence builds block CG itself."""
    from dattri_fn.attribute import influence_inverse
    from dattri_fn.solve.block_cg import ihvp_block_cg

    module = sys.modules["dattri_fn.attribute.influence"]  # the package re-exports the function
    real = influence_inverse._sketched_cg

    def patched(name, C, damping, opts, *, always):
        if always:
            return real(name, C, damping, opts, always=always)
        opts = {k: v for k, v in opts.items() if k != "negative_curvature"}
        return ihvp_block_cg(C, damping=damping, func=name, arg="curvature", **opts)

    # the call site is in influence_inverse (or, before its split, influence itself)
    holders = [m for m in (influence_inverse, module) if getattr(m, "_sketched_cg", None) is real]
    for m in holders:
        m._sketched_cg = patched
    try:
        yield
    finally:
        for m in holders:
            m._sketched_cg = real


def _timed(method, params, train, test, repeats: int = 2,
           context=contextlib.nullcontext) -> tuple[float, torch.Tensor, float]:
    """``(best wall s, scores, best process CPU s)``: on a loaded machine the CPU time is the
    steadier of the two (a time-sliced process is not charged for the others' slices)."""
    best, cpu, S = float("inf"), float("inf"), None
    for _ in range(repeats):
        with context():
            t0, c0 = time.perf_counter(), time.process_time()
            S = method.score(params, method.prepare(params, train), train, test)
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
    return best, S, cpu


def _case(label: str):
    n_train, n_test, hidden = CASES[label]
    task = get_task("digits-mlp", n_train=n_train, n_test=n_test, seed=0,
                    hparams={"hidden": hidden, "epochs": 100})
    fm = functional_model(train_model(task, seed=0).eval(), task.loss_fn)
    train = [(task.x_train[i:i + 256], task.y_train[i:i + 256]) for i in range(0, n_train, 256)]
    return task, fm, train, dict(solver="cg", damping=1e-3, l2=float(task.hparams["weight_decay"]) / 2,
                                 max_iter=100)


def scan(cases: list[str], ks: list[int]) -> None:
    """prepare + score of the first ``k`` test rows (best of 2) for each ``k``: the automatic
    default against plain CG and an always-built sketch."""
    print("| model | n_test | defaults CPU s | block CG | M=None | M=nystrom | sketched by default |")
    print("|---|---|---|---|---|---|---|")
    for label in (KEYS[c] for c in cases):
        task, fm, train, opts = _case(label)
        rows = {"defaults": influence(fm, **opts), "block CG": influence(fm, **opts),
                "M=None": influence(fm, M=None, **opts),
                "M=nystrom": influence(fm, M="nystrom", **opts)}
        ctx = {name: block_default if name == "block CG" else contextlib.nullcontext
               for name in rows}
        warm = ([(task.x_train[:32], task.y_train[:32])], (task.x_test[:2], task.y_test[:2]))
        for m in rows.values():
            m.score(fm.params, m.prepare(fm.params, warm[0]), *warm)
        P = sum(v.numel() for v in fm.params.values())
        for k in ks:
            test = (task.x_test[:k], task.y_test[:k])
            t = [_timed(m, fm.params, train, test, context=ctx[n])[2] for n, m in rows.items()]
            print(f"| {label} | {k} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[3]:.2f} | "
                  f"{'yes' if 16 * k >= min(200, P) else 'no'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-gnvp", action="store_true")
    ap.add_argument("--cases", default="small,large")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds (best kept)")
    ap.add_argument("--rows", default="", help="comma-separated row names to time (default: all), "
                    "e.g. 'defaults,block CG,M=None'")
    ap.add_argument("--scan", default="", help="n_test values, e.g. 1,5,10,13,20,50: time "
                    "defaults, M=None and M='nystrom' at each (where the sketch starts to pay)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.scan:
        return scan(args.cases.split(","), [int(k) for k in args.scan.split(",")])
    print(f"load {os.getloadavg()[0]:.2f}")
    print("| model | n_train x n_test | row | s | / defaults | CPU s | / defaults | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for label in (KEYS[c] for c in args.cases.split(",")):
        n_train, n_test, _ = CASES[label]
        task, fm, train, opts = _case(label)
        wd = float(task.hparams["weight_decay"])
        test = (task.x_test, task.y_test)
        rows = {"defaults": influence(fm, **opts),
                "block CG": influence(fm, **opts),
                "M=None": influence(fm, M=None, **opts),
                "M=nystrom": influence(fm, M="nystrom", **opts),
                "M=ekfac": influence(fm, M="ekfac", **opts),
                "M=ekfac exp.": influence(fm, M=solvers.ekfac(fisher="expected"), **opts),
                "M=kfac exp.": influence(fm, M=solvers.kfac(fisher="expected"), **opts)}
        if args.rows:
            rows = {n: m for n, m in rows.items() if n in args.rows.split(",")}
        if not args.no_gnvp:
            out_loss = lambda out, ex: F.cross_entropy(out[None], ex[-1][None])
            user_gn = lambda p, data: gnvp(fm.forward, out_loss, p, data)
            rows["user gnvp"] = influence(fm, curvature=user_gn, **{**opts, "damping": 1e-3 + wd})
        warm = ([(task.x_train[:32], task.y_train[:32])], (task.x_test[:2], task.y_test[:2]))
        for m in rows.values():
            m.score(fm.params, m.prepare(fm.params, warm[0]), *warm)
        res: dict = {}
        for rep in range(args.repeats):  # interleaved: every row once per round, best kept
            for name, m in rows.items():
                if name == "user gnvp" and rep:
                    continue
                ctx = block_default if name == "block CG" else contextlib.nullcontext
                t, S, c = _timed(m, fm.params, train, test, repeats=1, context=ctx)
                res[name] = (min(t, res.get(name, (t,))[0]), S, min(c, res.get(name, (0, 0, c))[2]))
        ref = res[next(n for n in ("user gnvp", "M=None", "defaults") if n in res)][1]
        t0, _, c0 = res.get("defaults", next(iter(res.values())))
        for name, (t, S, c) in res.items():
            diff = float((S - ref).abs().max() / ref.abs().max())
            print(f"| {label} | {n_train} x {n_test} | {name} | {t:.2f} | {t / t0:.2f} | "
                  f"{c:.2f} | {c / c0:.2f} | {diff:.1e} |", flush=True)
        print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
