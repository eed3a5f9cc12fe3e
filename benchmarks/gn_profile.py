"""Where the time of Gauss-Newton CG influence goes, part by part, against the machine's GEMM rate.

    OMP_NUM_THREADS=1 python -m benchmarks.gn_profile [--case large] [--repeats 3]

The ``MLP P=9,610`` case of :mod:`benchmarks.defaults_gn` (1,000 x 200). Timed in this process,
one thread: the whole ``influence(fm, solver="cg", ...)`` prepare + score; then its parts by hand
(train and test gradients, the factored Gauss-Newton's factors, one ``k``-row product, the Nystrom
sketch, preconditioned CG); a plain ``[n, q] x [q, m]`` GEMM of the same dtype for the rate the
machine reaches; and each product's FLOP count (``4 B k P + 4 B k C D + 2 B k C^2``: the two
per-layer GEMMs with the layer inputs, two with the output Jacobians, one with the output
Hessians), so the achieved GFLOP/s and the FLOP floor of the whole solve are printed next to the
time.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from benchmarks.defaults_gn import CASES, KEYS, _case
from dattri_fn import per_sample_grad
from dattri_fn.attribute import influence
from dattri_fn.operators import gauss_newton
from dattri_fn.solve import cg_solve
from dattri_fn.solve.nystrom import nystrom_preconditioner


def best(fn, repeats: int) -> tuple[float, object]:
    t, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def gemm_rate(n: int, q: int, m: int, dtype, repeats: int) -> float:
    """GFLOP/s of one ``[n, q] x [q, m]`` product (best of ``repeats``)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, q, generator=g, dtype=dtype), torch.randn(q, m, generator=g, dtype=dtype)
    t, _ = best(lambda: a @ b, repeats)
    return 2 * n * q * m / t / 1e9


def product_flops(fm, B: int, k: int) -> tuple[float, int, int, int]:
    """``(flops, P, C, D)`` of one ``k``-row factored Gauss-Newton product over ``B`` examples."""
    P = sum(v.numel() for v in fm.params.values())
    outs = [v.shape[0] for name, v in fm.params.items() if name.endswith("weight")]
    C, D = outs[-1], sum(outs)
    return 4 * B * k * P + 4 * B * k * C * D + 2 * B * k * C * C, P, C, D


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="large")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    label = KEYS[args.case]
    n_train, n_test, _ = CASES[label]
    task, fm, train, opts = _case(label)
    test = (task.x_test, task.y_test)
    dtype = task.x_train.dtype
    print(f"{label}, {n_train} x {n_test}, {dtype}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}")
    rows = {}
    m = influence(fm, **opts)
    m.score(fm.params, m.prepare(fm.params, train[:1]), train[:1], (test[0][:2], test[1][:2]))
    rows["influence prepare + score"] = best(
        lambda: m.score(fm.params, m.prepare(fm.params, train), train, test), args.repeats)[0]
    rows["train grads [N, P]"] = best(lambda: per_sample_grad(fm.loss, fm.params, train[0]),
                                      args.repeats)[0] * len(train)
    t_g, G_test = best(lambda: per_sample_grad(fm.loss, fm.params, test), args.repeats)
    rows["test grads [k, P]"] = t_g
    build = gauss_newton(fm)
    t_op, op = best(lambda: build(fm.params, train), args.repeats)
    rows["Gauss-Newton factors"] = t_op
    V = G_test.contiguous()
    t_mv, _ = best(lambda: op.matmat(V), args.repeats)
    rows[f"one product, {n_test} rows"] = t_mv
    damping = opts["damping"] + 2 * opts["l2"]
    t_sk, M = best(lambda: nystrom_preconditioner(op, damping=damping), args.repeats)
    rows["Nystrom sketch (r = 200)"] = t_sk
    t_cg, res = best(lambda: cg_solve(op, V, damping=damping, rtol=1e-6, max_iter=100, M=M),
                     args.repeats)
    rows["preconditioned CG"] = t_cg
    iters = float(res.num_iters.float().mean())
    flops, P, C, D = product_flops(fm, n_train, n_test)
    print("| part | s |")
    print("|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {t:.3f} |")
    peak = gemm_rate(1024, 1024, 1024, dtype, args.repeats)
    shaped = gemm_rate(n_train, P // D, n_test * D, dtype, args.repeats)
    print(f"P = {P}, C = {C}, D = {D}; one product {flops / 1e9:.2f} GFLOP, "
          f"{flops / t_mv / 1e9:.1f} GFLOP/s achieved; GEMM 1024^3 {peak:.1f} GFLOP/s, "
          f"[{n_train}, {P // D}] x [{P // D}, {n_test * D}] {shaped:.1f} GFLOP/s")
    n_products = 1 + iters  # the sketch's product with r = 200 rows, then one per CG step
    floor = n_products * flops / (peak * 1e9)
    print(f"CG iterations (mean) {iters:.1f}; products ~{n_products:.0f}; their FLOP floor at "
          f"the 1024^3 rate {floor:.2f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
