"""Where TRAK's prepare + score spends its thread CPU time, by function (wrapped timers).

    OMP_NUM_THREADS=1 python -m benchmarks.trak_split --task digits-lr [--rounds 40]

The recipe g_against times (3 models, DEFAULT_SIZES, proj_dim 512), warmed up; then each
listed function is wrapped with a thread-CPU timer (nested ones overlap: ``primal_kernel``
includes the train pass, ``_check`` its ``_factored``) and ``--rounds`` runs are timed. Cheaper
than a profiler (no per-op events), so the Python-level split is close to the real one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.run import BENCH_HP, DEFAULT_SIZES, runner_for, task_and_models  # noqa: E402

_WRAPPED = [
    ("dattri_fn.attribute.trak", ("feature_calls", "check_example_fn", "primal_kernel",
                                  "gram_of", "one_block_scores", "test_rows")),
    ("dattri_fn.attribute.trak_features", ("stack_checkpoints", "all_finite")),
    ("dattri_fn.transforms.layer_grads", ("_check", "_factored", "_example_rows", "_narrowed",
                                          "_gap")),
]
_METHODS = [("dattri_fn.transforms.factored_grads", "LayerGrads", "to_dense"),
            ("dattri_fn.transforms.projector", "Projector", "apply_columns")]


def _timed(acc: dict, name: str, f):
    def g(*a, **k):
        t0 = time.thread_time()
        try:
            return f(*a, **k)
        finally:
            acc.setdefault(name, []).append(time.thread_time() - t0)
    return g


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-lr", choices=tuple(DEFAULT_SIZES))
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    task, models = task_and_models(args.task, args.models)
    hp = dict(BENCH_HP)
    r = runner_for("ours", "trak", task, models, hp)
    r.score(r.prepare())
    acc: dict = {}
    for mod_name, names in _WRAPPED:
        mod = importlib.import_module(mod_name)
        for n in names:
            setattr(mod, n, _timed(acc, n, getattr(mod, n)))
    for mod_name, cls, meth in _METHODS:
        klass = getattr(importlib.import_module(mod_name), cls)
        setattr(klass, meth, _timed(acc, f"{cls}.{meth}", getattr(klass, meth)))
    total = []
    for _ in range(args.rounds):
        t0 = time.thread_time()
        r.score(r.prepare())
        total.append(time.thread_time() - t0)
    print(f"{args.task}: prepare + score {1e3 * statistics.median(total):.2f} ms thread CPU "
          f"(median of {args.rounds}, timers on), load {os.getloadavg()[0]:.2f}")
    for k, v in sorted(acc.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {k:24s} {1e3 * sum(v) / args.rounds:7.2f} ms/round  {len(v) / args.rounds:5.1f} calls")


if __name__ == "__main__":
    main()
