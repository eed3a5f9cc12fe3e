"""Where Grad-Dot / Grad-Cos spend a ``prepare + score`` on a bundled task (cProfile, one thread).

    OMP_NUM_THREADS=1 python -m benchmarks.gradsim_profile [--task digits-lr] [--method grad-dot]

The runner is the one :mod:`benchmarks.g_against` times (:func:`benchmarks.run.runner_for`);
prints the top functions by own time and by cumulative time over ``--calls`` warm calls.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-lr")
    p.add_argument("--method", default="grad-dot")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from benchmarks.run import BENCH_HP, runner_for, task_and_models

    task, models = task_and_models(args.task, 3)
    hp = dict(BENCH_HP)
    ours = runner_for("ours", args.method, task, models, hp)
    for _ in range(5):
        ours.score(ours.prepare())
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        ours.score(ours.prepare())
    prof.disable()
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(args.top)
    st.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
