"""Where the time of Gauss-Newton CG influence goes, part by part, against the machine's GEMM rate.

    OMP_NUM_THREADS=1 python -m benchmarks.gn_profile [--case large] [--repeats 3]

The ``MLP P=9,610`` case of :mod:`benchmarks.defaults_gn` (1,000 x 200). Timed in this process,
one thread, in process CPU seconds (steadier than wall time on a loaded machine): the whole
``influence(fm, solver="cg", ...)`` prepare + score, today's default and with block CG
(:func:`benchmarks.defaults_gn.block_default`); then its parts by hand (train and test
gradients, the factored Gauss-Newton's factors, one ``k``-row product, the Nystrom sketch,
preconditioned CG, block CG and its block algebra); a plain ``[n, q] x [q, m]`` GEMM of the same
dtype for the rate the machine reaches; and each product's FLOP count
(``4 B k P + 4 B k C D + 2 B k C^2``: the two per-layer GEMMs with the layer inputs, two with the
output Jacobians, one with the output Hessians), so the achieved GFLOP/s and the FLOP floor of
the whole solve are printed next to the time.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from benchmarks.defaults_gn import CASES, KEYS, _case, block_default
from dattri_fn import per_sample_grad
from dattri_fn.attribute import influence
from dattri_fn.operators import gauss_newton
from dattri_fn.solve import cg_solve
from dattri_fn.solve.block_cg import block_cg_solve
from dattri_fn.solve.nystrom import nystrom_preconditioner


def best(fn, repeats: int) -> tuple[float, object]:
    """``(best process CPU seconds, last output)``: steadier than wall time on a shared box."""
    t, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        t = min(t, time.process_time() - t0)
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
          f"load {os.getloadavg()[0]:.2f}; times are process CPU seconds, best of {args.repeats}")
    rows = {}
    m = influence(fm, **opts)
    m.score(fm.params, m.prepare(fm.params, train[:1]), train[:1], (test[0][:2], test[1][:2]))
    rows["influence prepare + score (today's default)"] = best(
        lambda: m.score(fm.params, m.prepare(fm.params, train), train, test), args.repeats)[0]
    with block_default():
        rows["influence prepare + score (block CG)"] = best(
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
    rows["Nystrom-preconditioned CG"] = t_cg
    t_b, res_b = best(lambda: block_cg_solve(op, V, damping=damping, rtol=1e-6, max_iter=100),
                      args.repeats)
    rows["block CG"] = t_b
    steps = int(res_b.num_iters.max())
    rows[f"block CG past its {steps} products (block algebra)"] = t_b - steps * t_mv
    flops, P, C, D = product_flops(fm, n_train, n_test)
    print("| part | CPU s |")
    print("|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {t:.3f} |")
    peak = gemm_rate(1024, 1024, 1024, dtype, args.repeats)
    shaped = gemm_rate(n_train, P // D, n_test * D, dtype, args.repeats)
    print(f"P = {P}, C = {C}, D = {D}; one product {flops / 1e9:.2f} GFLOP, "
          f"{flops / t_mv / 1e9:.1f} GFLOP/s achieved; GEMM 1024^3 {peak:.1f} GFLOP/s, "
          f"[{n_train}, {P // D}] x [{P // D}, {n_test * D}] {shaped:.1f} GFLOP/s")
    iters = float(res.num_iters.float().mean())
    print(f"Nystrom PCG: iterations mean {iters:.1f}, max {int(res.num_iters.max())}; "
          f"products {1 + int(res.num_iters.max())} (the sketch's + one per step); FLOP floor "
          f"at the 1024^3 rate {(1 + int(res.num_iters.max())) * flops / (peak * 1e9):.2f} s")
    # per block step: S, Pd R^T, the X and R updates, Q Z^T, the new block, its Gram and L^-1
    block = 8 * 2 * P * n_test * n_test
    print(f"block CG: {steps} steps = {steps} products + {block / 1e9:.2f} GFLOP of block "
          f"algebra each; FLOP floor at the 1024^3 rate "
          f"{steps * (flops + block) / (peak * 1e9):.2f} s; products alone "
          f"{steps * flops / (peak * 1e9):.2f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
