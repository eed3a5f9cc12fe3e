"""Grad-Dot / Grad-Cos ``prepare + score`` against dattri 0.3.0, one tree per process, for A/B.

    cd /tmp && OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old:/work/main python -m benchmarks.gradsim_ab
    cd /tmp && OMP_NUM_THREADS=1 PYTHONPATH=/tmp/new:/work/main python -m benchmarks.gradsim_ab

(run from a directory without ``dattri_fn``: ``-m`` puts the working directory first on the path;
the first line printed names the ``dattri_fn`` imported.)

Two library trees cannot share one process, so an old/new comparison alternates processes
(old, new, old, new), each pointing ``PYTHONPATH`` at a copy of one tree's ``dattri_fn`` (copies:
other edits in the checkout do not leak into one side). Within a process the runners are
g_against's (:func:`benchmarks.run.runner_for`, ``ours`` and ``dattri``), alternated round by
round; printed: each side's median thread CPU ms and the median (and quartiles) of the per-round
ratio ours / dattri, which is what to compare between processes (dattri is the yardstick that
moves with the load).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before torch (and so tqdm) is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-lr")
    p.add_argument("--methods", default="grad-dot,grad-cos")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--certified", action="store_true",
                   help="A/B the certified plan against the autodiff check in this process")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import dattri_fn
    from benchmarks.run import BENCH_HP, runner_for, task_and_models

    task, models = task_and_models(args.task, 3)
    hp = dict(BENCH_HP)
    print(f"{dattri_fn.__file__}  load {os.getloadavg()[0]:.2f}")
    if args.certified:
        _certified_ab(args, task, models, hp, runner_for)
        return
    for name in args.methods.split(","):
        ours, theirs = (runner_for(side, name, task, models, hp) for side in ("ours", "dattri"))
        for r in (ours, theirs):
            r.score(r.prepare())
        o, t, ratio = [], [], []
        for _ in range(args.rounds):
            c0 = time.thread_time()
            ours.score(ours.prepare())
            a = time.thread_time() - c0
            c0 = time.thread_time()
            theirs.score(theirs.prepare())
            b = time.thread_time() - c0
            o.append(a)
            t.append(b)
            ratio.append(a / b)
        q = statistics.quantiles(ratio, n=4)
        print(f"  {name}: ours {1e3 * statistics.median(o):.3f} ms, dattri "
              f"{1e3 * statistics.median(t):.3f} ms, ratio median {statistics.median(ratio):.4f} "
              f"(quartiles {q[0]:.3f}-{q[2]:.3f})")


def _certified_ab(args, task, models, hp, runner_for) -> None:
    """Rounds of (certified, checked, dattri), the order rotated each round."""
    from dattri_fn.transforms import layer_grads_certified as layer_grads  # _certified's home

    real = layer_grads._certified

    def declined(*a):
        return None, {}

    def timed(r, patched: bool) -> float:
        layer_grads._certified = declined if patched else real
        try:
            c0 = time.thread_time()
            r.score(r.prepare())
            return time.thread_time() - c0
        finally:
            layer_grads._certified = real

    for name in args.methods.split(","):
        ours, theirs = (runner_for(side, name, task, models, hp) for side in ("ours", "dattri"))
        sides = [(ours, False), (ours, True), (theirs, False)]
        for r, patched in sides:
            timed(r, patched)
        times = [[], [], []]
        for i in range(args.rounds):
            for j in (list(range(3))[i % 3:] + list(range(3))[:i % 3]):
                times[j].append(timed(*sides[j]))
        med = [1e3 * statistics.median(t) for t in times]
        new_old = statistics.median(a / b for a, b in zip(times[0], times[1], strict=True))
        new_d = statistics.median(a / b for a, b in zip(times[0], times[2], strict=True))
        old_d = statistics.median(a / b for a, b in zip(times[1], times[2], strict=True))
        print(f"  {name}: certified {med[0]:.3f} ms, checked {med[1]:.3f} ms, dattri "
              f"{med[2]:.3f} ms; ratio certified/checked {new_old:.4f}, certified/dattri "
              f"{new_d:.4f}, checked/dattri {old_d:.4f}")


if __name__ == "__main__":
    main()
