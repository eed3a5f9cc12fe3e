"""Ours against dattri 0.3.0 for a few methods, timed interleaved in ONE process (median of N).

    OMP_NUM_THREADS=1 python -m benchmarks.g_interleaved --task digits-mlp --methods logra,factgrass

``benchmarks.run`` times each side in its own process at a different moment, so a load swing on
a shared machine moves the ratio more than the code does. Here both sides' runners are built
once (the same ones ``benchmarks.run --against dattri`` builds: :func:`benchmarks.run.runner_for`),
warmed up, then ``prepare + score`` alternates ours / dattri ``--repeats`` times; the table gives
each side's median and the median of the per-pair ratios. ``--profile`` adds our time by part
(torch.profiler's self CPU time of the top operators over the repeats).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (torch imports it)

import torch  # noqa: E402

from benchmarks.run import DEFAULT_SIZES, load_models, load_task, runner_for, train_states  # noqa: E402


def _once(runner) -> float:
    t0 = time.perf_counter()
    runner.score(runner.prepare())
    return time.perf_counter() - t0


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--methods", default="logra,factgrass")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    spec = {"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0, "device": "cpu"}
    task = load_task(spec)
    models = load_models(task, train_states(task, 1))
    hp = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
          "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}
    rows = []
    for name in args.methods.split(","):
        ours, theirs = (runner_for(side, name, task, models, hp) for side in ("ours", "dattri"))
        for r in (ours, theirs):
            for _ in range(3):
                _once(r)
        t_o, t_d = [], []
        for _ in range(args.repeats):
            t_o.append(_once(ours))
            t_d.append(_once(theirs))
        ratios = [a / b for a, b in zip(t_o, t_d, strict=True)]
        rows.append({"method": name, "ours_ms": 1e3 * statistics.median(t_o),
                     "dattri_ms": 1e3 * statistics.median(t_d),
                     "ratio": statistics.median(ratios),
                     "ratio_q": (sorted(ratios)[len(ratios) // 4], sorted(ratios)[3 * len(ratios) // 4])})
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.repeats):
                    _once(ours)
            print(f"\n{name}: ours, {args.repeats} calls")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"\n{args.task}, {args.repeats} interleaved repeats, threads={torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| method | ours ms (median) | dattri ms (median) | ratio (median) | ratio IQR |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ours_ms']:.2f} | {r['dattri_ms']:.2f} | {r['ratio']:.3f} | "
              f"{r['ratio_q'][0]:.3f}-{r['ratio_q'][1]:.3f} |")
    return rows


if __name__ == "__main__":
    main()
