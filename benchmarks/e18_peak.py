"""Exact tensor peak and CPU time of LoGra / FactGraSS at a scaling point, ours and dattri's.

    OMP_NUM_THREADS=1 python -m benchmarks.e18_peak --methods logra,factgrass --n 16000 [--dattri]
    OMP_NUM_THREADS=1 python -m benchmarks.e18_peak --methods logra --n 1000 --width 1333 --dattri --floor
    PYTHONPATH=/tmp/base python /work/main/benchmarks/e18_peak.py ...   # another tree (before)

The point is :mod:`benchmarks.scaling`'s (``synthetic_digits(n)``, the 64-32-10 tanh MLP, its
batch rows, LoGra ``k = 8``, FactGraSS ``d = 64``, blowup 4; ``--width`` widens the hidden
layer as its P sweep does), warmed on 64 rows. ``--floor`` adds :func:`benchmarks.scaling.floor_point`
(one plain forward and backward per batch). Each side's
``prepare + score`` runs under :func:`benchmarks.peak.tensor_peak` (the most bytes its CPU
tensors hold at once), then ``--repeats`` times for main-thread CPU time (median). ``--save``
writes our scores (``{method: Tensor}``) for a ``torch.equal`` check between trees.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")


def _run(name: str, n: int, side: str, width: int = 32):
    import dataclasses
    import warnings

    from benchmarks.scaling import N_MODELS, mlp, runner, synthetic_digits

    warnings.filterwarnings("ignore")
    task = synthetic_digits(n)
    models = [mlp(width, c) for c in range(N_MODELS)]
    warm = dataclasses.replace(task, x_train=task.x_train[:64], y_train=task.y_train[:64],
                               x_test=task.x_test[:2], y_test=task.y_test[:2])
    runner(name, warm, models, cg_iters=2, side=side)()
    if side in ("dattri", "floor"):
        return runner(name, task, models, cg_iters=20, side=side), None
    from benchmarks.scaling import our_recipe

    r = our_recipe(name, task, models, cg_iters=20)

    def step():
        state = r.method.prepare(r.params, r.train)
        return r.method.score(r.params, state, r.train, r.test)

    return step, r


def main() -> None:
    import torch

    from benchmarks.peak import tensor_peak

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="logra,factgrass")
    ap.add_argument("--n", type=int, default=16000)
    ap.add_argument("--width", type=int, default=32, help="hidden width (P = 75 w + 10)")
    ap.add_argument("--floor", action="store_true", help="also the plain forward/backward floor")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dattri", action="store_true", help="also dattri 0.3.0's side")
    ap.add_argument("--save", default="", help="torch.save our scores here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    saved = {}
    for name in args.methods.split(","):
        sides = ("ours",) + ("dattri",) * args.dattri + ("floor",) * args.floor
        for side in sides:
            step, _ = _run(name, args.n, side, args.width)
            out, peak = tensor_peak(step)
            if side == "ours":
                saved[name] = out
            cpu = []
            for _ in range(args.repeats):
                c = time.thread_time()
                step()
                cpu.append(time.thread_time() - c)
            load = open("/proc/loadavg").read().split()[0]
            print(f"{name:10s} {side:6s} n={args.n} w={args.width} peak {peak / 2**20:8.3f} MiB  "
                  f"cpu {statistics.median(cpu) * 1e3:8.1f} ms  load {load}", flush=True)
    if args.save:
        torch.save(saved, args.save)


if __name__ == "__main__":
    main()
