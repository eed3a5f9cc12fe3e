"""Influence CG's row scaling (stop 25, engineer F): with vs without, interleaved in ONE process.

    OMP_NUM_THREADS=1 python -m benchmarks.overflow_cg_ab [--rounds 11]

``influence_inverse.build_inverse`` wraps the CG/MINRES inverse in ``influence_cg.row_scaled``
(one ``|V|.amax`` per solve and one sync; rows beyond ``2**32`` (float32) are scaled). The
"without" side patches ``influence_inverse.row_scaled`` to the identity. Each round runs the
digits-mlp ``if-cg`` recipe's ``prepare + score`` on both sides, alternating which goes first;
thread CPU time; medians and the median of the per-round with/without ratios; scores equal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    from benchmarks.run import BENCH_HP, runner_for, task_and_models
    from dattri_fn.attribute import influence_inverse

    task, models = task_and_models("digits-mlp", n_models=1)
    runner = runner_for("ours", "if-cg", task, models, BENCH_HP)
    real = influence_inverse.row_scaled

    def run(scaled: bool):
        influence_inverse.row_scaled = real if scaled else (lambda inv: inv)
        try:
            t0 = time.thread_time()
            out = runner.score(runner.prepare())
            return time.thread_time() - t0, out
        finally:
            influence_inverse.row_scaled = real

    a, b = run(True)[1], run(False)[1]
    assert torch.equal(a, b), "scores differ"
    times = {True: [], False: []}
    for r in range(args.rounds):
        for side in ((True, False) if r % 2 == 0 else (False, True)):
            times[side].append(run(side)[0])
    ratios = [w / o for w, o in zip(times[True], times[False], strict=True)]
    print(f"load {os.getloadavg()}; digits-mlp if-cg prepare+score, thread CPU, median of "
          f"{args.rounds}: without {statistics.median(times[False]) * 1e3:.1f} ms, with "
          f"{statistics.median(times[True]) * 1e3:.1f} ms; median with/without ratio "
          f"{statistics.median(ratios):.3f}; scores torch.equal")


if __name__ == "__main__":
    main()
