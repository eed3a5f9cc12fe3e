"""TRAK's plain-MLP margin pass (trak_mlp, no plan check) against the capture engine: A/B in ONE process.

    OMP_NUM_THREADS=1 python -m benchmarks.trak_mlp_ab --task digits-lr [--rounds 40]

The recipe g_against times (3 models, DEFAULT_SIZES, proj_dim 512): ``prepare + score`` with
``trak_mlp.pass_plan`` replaced by ``lambda plan: None`` (the capture engine's passes, its plan
check on prepare's first batch, as before) and as shipped
(:func:`dattri_fn.attribute.trak_mlp.margin_pass`: the plan decided without the check, every
pass without the engine), alternated each round (which side goes first alternates too);
main-thread CPU time, each side's median and the median of the per-round ratios (new / old).
The state (kernel, features, weights, plan decisions), scores and self-scores are compared too
(torch.equal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.run import BENCH_HP, DEFAULT_SIZES, runner_for, task_and_models  # noqa: E402
from dattri_fn.attribute import trak_mlp  # noqa: E402


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-lr", choices=tuple(DEFAULT_SIZES))
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    task, models = task_and_models(args.task, args.models)
    r = runner_for("ours", "trak", task, models, dict(BENCH_HP))
    out, cpu = {}, {False: [], True: []}
    real = trak_mlp.pass_plan

    def _off(plan):
        return None

    for side in (False, True):  # warm-up, and the values compared
        trak_mlp.pass_plan = real if side else _off
        s = r.prepare()
        out[side] = (s, r.score(s))
    for i in range(args.rounds):
        for side in (False, True) if i % 2 == 0 else (True, False):
            trak_mlp.pass_plan = real if side else _off
            c0 = time.thread_time()
            r.score(r.prepare())
            cpu[side].append(time.thread_time() - c0)
    trak_mlp.pass_plan = real
    ratios = [b / a for a, b in zip(cpu[False], cpu[True], strict=True)]
    q = statistics.quantiles(ratios, n=4)
    print(f"{args.task}: {args.rounds} rounds, load {os.getloadavg()[0]:.2f}; prepare + score "
          f"thread CPU ms: engine + check {1e3 * statistics.median(cpu[False]):.2f}, margin pass "
          f"{1e3 * statistics.median(cpu[True]):.2f}; median per-round ratio "
          f"{statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    (s0, S0), (s1, S1) = out[False], out[True]
    print(f"state torch.equal: {_equal(tuple(s0), tuple(s1))}, scores torch.equal: "
          f"{torch.equal(S0, S1)}")


if __name__ == "__main__":
    main()
