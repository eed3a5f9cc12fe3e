"""TRAK's prepare + score on a bundled task, profiled: where its thread CPU time goes.

    OMP_NUM_THREADS=1 python -m benchmarks.trak_profile --task digits-lr [--rounds 30]

The recipe g_against times (3 models, n_train/n_test of DEFAULT_SIZES, proj_dim 512), warmed up,
then ``--rounds`` runs under torch.profiler (CPU): the top operators by self CPU time, and the
median thread CPU time of prepare and of score over as many unprofiled runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.run import BENCH_HP, DEFAULT_SIZES, runner_for, task_and_models  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-lr", choices=tuple(DEFAULT_SIZES))
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    task, models = task_and_models(args.task, args.models)
    hp = dict(BENCH_HP)
    r = runner_for("ours", "trak", task, models, hp)
    r.score(r.prepare())
    prep, score = [], []
    for _ in range(args.rounds):
        c0 = time.thread_time()
        s = r.prepare()
        c1 = time.thread_time()
        r.score(s)
        prep.append(c1 - c0)
        score.append(time.thread_time() - c1)
    print(f"{args.task}: prepare {1e3 * statistics.median(prep):.2f} ms, score "
          f"{1e3 * statistics.median(score):.2f} ms (thread CPU, median of {args.rounds}), "
          f"load {os.getloadavg()[0]:.2f}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                with_stack=False) as prof:
        for _ in range(args.rounds):
            r.score(r.prepare())
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
