"""Ours against dattri 0.3.0 for a few methods, timed interleaved in ONE process (median of N).

    OMP_NUM_THREADS=1 python -m benchmarks.g_interleaved --task digits-mlp --methods logra,factgrass

``benchmarks.run`` times each side in its own process at a different moment, so a load swing on
a shared machine moves the ratio more than the code does. Here both sides' runners are built
once (the same ones ``benchmarks.run --against dattri`` builds: :func:`benchmarks.run.runner_for`),
warmed up, then ``prepare + score`` alternates ours / dattri ``--repeats`` times; the table gives
each side's median and the median of the per-pair ratios. ``--profile`` adds our time by part
(torch.profiler's self CPU time of the top operators over the repeats). ``--before TREE`` adds a
third side: the same runner from another checkout (``git worktree add /tmp/before <commit>``),
built in a worker process with that tree first on ``sys.path`` and timed there, call by call in
the same alternation (its clock is read inside the worker, so the pipe is not timed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (torch imports it)

import torch  # noqa: E402

from benchmarks.run import DEFAULT_SIZES, load_models, load_task, runner_for, train_states  # noqa: E402


def _once(runner) -> float:
    # wall clock, or with G_INTERLEAVED_CLOCK=thread (``--clock thread``, inherited by the
    # ``--before`` worker) this thread's CPU time: less moved by the others' load
    clock = time.thread_time if os.environ.get("G_INTERLEAVED_CLOCK") == "thread" else \
        time.perf_counter
    t0 = clock()
    runner.score(runner.prepare())
    return clock() - t0


def _serve(task_name: str, methods: str) -> None:
    """Worker of ``--before``: build ours for every method, then answer each stdin line
    ``<method>`` with the seconds of one ``prepare + score``."""
    import warnings

    warnings.filterwarnings("ignore")
    task, models, hp = _setup(task_name)
    runners = {m: runner_for("ours", m, task, models, hp) for m in methods.split(",")}
    for r in runners.values():
        for _ in range(3):
            _once(r)
    print("ready", flush=True)
    for line in sys.stdin:
        print(repr(_once(runners[line.strip()])), flush=True)


def _setup(task_name: str):
    n_train, n_test, _ = DEFAULT_SIZES[task_name]
    spec = {"name": task_name, "n_train": n_train, "n_test": n_test, "seed": 0, "device": "cpu"}
    task = load_task(spec)
    models = load_models(task, train_states(task, 1))
    hp = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
          "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}
    return task, models, hp


def _worker(tree: str, task_name: str, methods: str) -> subprocess.Popen:
    # dattri_fn and benchmarks.run from the other tree; this file (the worker loop) by path
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    code = ("import sys, importlib.util as u; "
            f"sys.path.insert(0, {os.path.abspath(tree)!r}); "
            f"s = u.spec_from_file_location('_g_worker', {os.path.abspath(__file__)!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); "
            f"m._serve({task_name!r}, {methods!r})")
    w = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
    if w.stdout.readline().strip() != "ready":
        raise RuntimeError(f"g_interleaved(before=...): the worker on {tree!r} did not start")
    return w


def _ask(w: subprocess.Popen, method: str) -> float:
    w.stdin.write(method + "\n")
    w.stdin.flush()
    return float(w.stdout.readline())


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--methods", default="logra,factgrass")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--before", default=None, help="another checkout: a third, 'before' side")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = p.parse_args(argv)
    os.environ["G_INTERLEAVED_CLOCK"] = args.clock
    import warnings

    warnings.filterwarnings("ignore")
    task, models, hp = _setup(args.task)
    worker = None if args.before is None else _worker(args.before, args.task, args.methods)
    rows = []
    for name in args.methods.split(","):
        ours, theirs = (runner_for(side, name, task, models, hp) for side in ("ours", "dattri"))
        for r in (ours, theirs):
            for _ in range(3):
                _once(r)
        t_o, t_d, t_b = [], [], []
        for _ in range(args.repeats):
            t_o.append(_once(ours))
            t_d.append(_once(theirs))
            if worker is not None:
                t_b.append(_ask(worker, name))
        ratios = [a / b for a, b in zip(t_o, t_d, strict=True)]
        row = {"method": name, "ours_ms": 1e3 * statistics.median(t_o),
               "dattri_ms": 1e3 * statistics.median(t_d),
               "ratio": statistics.median(ratios),
               "ratio_q": (sorted(ratios)[len(ratios) // 4], sorted(ratios)[3 * len(ratios) // 4])}
        if worker is not None:
            before = [a / b for a, b in zip(t_b, t_d, strict=True)]
            row.update(before_ms=1e3 * statistics.median(t_b), before_ratio=statistics.median(before),
                       after_before=statistics.median([a / b for a, b in zip(t_o, t_b, strict=True)]))
        rows.append(row)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.repeats):
                    _once(ours)
            print(f"\n{name}: ours, {args.repeats} calls")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"\n{args.task}, {args.repeats} interleaved repeats, threads={torch.get_num_threads()}, "
          f"{args.clock} clock, load {os.getloadavg()[0]:.2f}\n")
    if worker is not None:
        worker.stdin.close()
        worker.wait()
        print(f"before = {args.before}\n")
        print("| method | ours ms | before ms | dattri ms | ratio | ratio IQR | before ratio | ours / "
              "before |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['ours_ms']:.2f} | {r['before_ms']:.2f} | {r['dattri_ms']:.2f} "
                  f"| {r['ratio']:.3f} | {r['ratio_q'][0]:.3f}-{r['ratio_q'][1]:.3f} | "
                  f"{r['before_ratio']:.3f} | {r['after_before']:.3f} |")
        return rows
    print("| method | ours ms (median) | dattri ms (median) | ratio (median) | ratio IQR |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ours_ms']:.2f} | {r['dattri_ms']:.2f} | {r['ratio']:.3f} | "
              f"{r['ratio_q'][0]:.3f}-{r['ratio_q'][1]:.3f} |")
    return rows


if __name__ == "__main__":
    main()
