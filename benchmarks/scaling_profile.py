"""Where one scaling point of ours spends its time: prepare / score split and the top functions.

    OMP_NUM_THREADS=1 python -m benchmarks.scaling_profile --method logra --n 1000 --width 32

Builds the point as :mod:`benchmarks.scaling` does (same data, models, our side's
configuration, 64-row warm-up), then times ``--repeats`` rounds of ``prepare + score`` (process
CPU time, median) and runs one more under :mod:`cProfile`: the functions with the most
cumulative time inside ``prepare`` and ``score``, dattri_fn's own first (``--top`` of them), and
the torch operators by self CPU time (``torch.profiler``, ``--ops`` of them). ``--sites``:
each side's exact tensor peak and what is alive at it, by allocation site.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import statistics
import time
from collections.abc import Sequence

from benchmarks import scaling


def build(name: str, n: int, width: int, cg_iters: int):
    """Return our side's Recipe of the point, warmed up on 64 rows."""
    task = scaling.synthetic_digits(n)
    models = [scaling.mlp(width, c) for c in range(scaling.N_MODELS)]
    k = min(64, n)
    warm = dataclasses.replace(task, x_train=task.x_train[:k], y_train=task.y_train[:k],
                               x_test=task.x_test[:2], y_test=task.y_test[:2])
    scaling.runner(name, warm, models, cg_iters=min(cg_iters, 2))()
    return scaling.our_recipe(name, task, models, cg_iters=cg_iters)


def timed(r, repeats: int) -> tuple[float, float]:
    """Return the median process CPU s of prepare and of score over ``repeats`` rounds."""
    prep, score = [], []
    for _ in range(repeats):
        c0 = time.process_time()
        state = r.method.prepare(r.params, r.train)
        c1 = time.process_time()
        r.method.score(r.params, state, r.train, r.test)
        prep.append(c1 - c0)
        score.append(time.process_time() - c1)
    return statistics.median(prep), statistics.median(score)


def profile_text(r, top: int, ops: int) -> str:
    """cProfile's cumulative listing and torch's operator table of one prepare + score."""
    prof = cProfile.Profile()
    prof.enable()
    r.method.score(r.params, r.method.prepare(r.params, r.train), r.train, r.test)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    stats.print_stats("dattri_fn", top)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as tp:
        r.method.score(r.params, r.method.prepare(r.params, r.train), r.train, r.test)
    return out.getvalue() + "\n" + tp.key_averages().table(sort_by="self_cpu_time_total",
                                                          row_limit=ops)


def sites(name: str, n: int, width: int, cg_iters: int, rows: int = 12) -> None:
    """Print each side's exact tensor peak and the tensors alive at it (largest first)."""
    from benchmarks.peak import tensor_peak
    from benchmarks.peak_sites import live_at_peak

    for side in ("ours", "dattri"):
        run = scaling.point_setup(name, n, width, cg_iters, side)  # warmed up
        print(f"{side}: tensor peak {tensor_peak(run)[1] / 2**20:.2f} MiB")
        try:
            peak, live = live_at_peak(run)
        except Exception as err:  # Python stacks under the profiler can upset the capture
            print(f"  (no sites: {type(err).__name__}: {str(err)[:120]})")
            continue
        print(f"  with stacks: {peak / 2**20:.2f} MiB, {len(live)} tensors alive")
        for size, site in live[:rows]:
            print(f"  {size / 2**20:8.3f} MiB  {site[:150]}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling_profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=scaling.ALL_METHODS)
    p.add_argument("--n", type=int, default=1000, help="n_train (default 1000)")
    p.add_argument("--width", type=int, default=scaling.BASE_WIDTH,
                   help=f"hidden width, P = 75 w + 10 (default {scaling.BASE_WIDTH})")
    p.add_argument("--cg-iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=25, help="dattri_fn functions listed")
    p.add_argument("--ops", type=int, default=15, help="torch operators listed")
    p.add_argument("--sites", action="store_true",
                   help="instead: the tensors alive at the exact tensor peak of ours and of "
                        "dattri's side (benchmarks.peak_sites), largest first")
    args = p.parse_args(argv)
    import os
    import warnings

    warnings.filterwarnings("ignore")
    if args.sites:
        sites(args.method, args.n, args.width, args.cg_iters)
        return
    r = build(args.method, args.n, args.width, args.cg_iters)
    prep, score = timed(r, args.repeats)
    print(f"{args.method} n={args.n} P={scaling.num_params(args.width):,}: prepare "
          f"{prep:.4f} CPU-s, score {score:.4f} CPU-s (median of {args.repeats}; load "
          f"{os.getloadavg()[0]:.1f})")
    print(profile_text(r, args.top, args.ops))


if __name__ == "__main__":
    main()
