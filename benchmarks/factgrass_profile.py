"""Where FactGraSS's ``prepare + score`` spends its thread CPU time on a bundled task (one thread).

    OMP_NUM_THREADS=1 python -m benchmarks.factgrass_profile [--task digits-mlp] [--rounds 200] [--ops]
        [--count]

The method is built as :mod:`benchmarks.run` builds it for ``g_against`` (one checkpoint, the
recipe's batches of 256, ``benchmarks.against_dattri``'s ``FACTGRASS_DIM`` / ``_BLOWUP``). Printed:
the mean thread CPU microseconds of ``prepare`` and ``score`` per call, and of every step the
factgrass modules call by module-level name (each wrapped where it is read to add its thread CPU
time; steps nest: ``_Rows.flat_io`` includes ``mlp_io``, ``collect`` the test pass's
``_Rows.*``, ``_Rows.write_flat`` its ``_stage_two``). ``--ops`` adds torch.profiler's op table
(its times are wall-clock and carry the profiler's per-op cost: use its counts and shapes).
``--count`` adds the top-level aten ops of one ``prepare + score`` (those called from Python, by
op and by the dattri_fn line that called them): the per-call dispatch cost that dominates at
these sizes. This
profiles; speed claims go through interleaved A/B (:mod:`benchmarks.e18_ab`,
:mod:`benchmarks.factgrass_ab`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import os
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

# (module, name) pairs wrapped where they are read
STEPS = {
    "dattri_fn.attribute.factgrass": (
        "merged_passes", "count_rows", "_plain_row_bytes", "can_merge", "capture_row_bytes",
        "state_of", "plan_decisions", "batch_to", "_factor_rows", "_draw"),
    "dattri_fn.attribute.factgrass_score": (
        "check_state", "state_params", "_check_blocks", "collect", "_precondition",
        "check_cached_train", "feature_fn"),
    "dattri_fn.attribute.factgrass_rows": ("_plain_io", "_stage_two", "batch_size"),
    "dattri_fn.attribute.factgrass_flat": ("mlp_io",),
}
METHODS = {
    "dattri_fn.attribute.factgrass_rows._Rows": ("flat_io", "flat_sides", "write_flat"),
    "dattri_fn.transforms.kronecker.KroneckerProjector": ("project_sides",),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.factgrass_profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--ops", action="store_true", help="also torch.profiler's op table")
    p.add_argument("--count", action="store_true",
                   help="also the torch calls of one round, by calling line")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.thread_time_ns()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.thread_time_ns() - t0
                calls[name] += 1
        return wrapper

    def gen_timed(name, fn):  # a generator's own frames: each resumption timed
        @functools.wraps(fn)
        def wrapper(*a, **k):
            it = fn(*a, **k)
            while True:
                t0 = time.thread_time_ns()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    spent[name] += time.thread_time_ns() - t0
                    calls[name] += 1
                yield item
        return wrapper

    for mod_name, names in STEPS.items():
        mod = importlib.import_module(mod_name)
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, timed(f"{mod_name.rsplit('.', 1)[1]}.{name}",
                                         getattr(mod, name)))
    for path, names in METHODS.items():
        mod_name, cls_name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(mod_name), cls_name)
        for name in names:
            fn = getattr(cls, name)
            wrap = gen_timed if name == "flat_sides" else timed
            setattr(cls, name, wrap(f"{cls_name}.{name}", fn))
    for name in ("cholesky_ex",):
        setattr(torch.linalg, name, timed(f"torch.linalg.{name}", getattr(torch.linalg, name)))
    torch.cholesky_inverse = timed("torch.cholesky_inverse", torch.cholesky_inverse)

    from benchmarks.run import BENCH_HP, runner_for, task_and_models

    task, models = task_and_models(args.task, 1)
    r = runner_for("ours", "factgrass", task, models, BENCH_HP)
    for _ in range(5):
        r.score(r.prepare())
    spent.clear()
    calls.clear()
    t_prep = t_score = 0
    for _ in range(args.rounds):
        t0 = time.thread_time_ns()
        state = r.prepare()
        t1 = time.thread_time_ns()
        r.score(state)
        t_prep, t_score = t_prep + t1 - t0, t_score + time.thread_time_ns() - t1
    n = args.rounds
    print(f"{args.task} factgrass: thread CPU us a call over {n} rounds (load "
          f"{os.getloadavg()[0]:.2f}): prepare {t_prep / n / 1e3:.0f}, score {t_score / n / 1e3:.0f}")
    for name, ns in spent.most_common():
        print(f"  {name:36s} {ns / n / 1e3:8.1f} us a round  x{calls[name] / n:.0f}  "
              f"{ns / calls[name] / 1e3:8.1f} us a call")
    if args.count:
        _count_calls(lambda: r.score(r.prepare()))
    if args.ops:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            for _ in range(20):
                r.score(r.prepare())
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="count", row_limit=40))


def _count_calls(run) -> None:
    """Print the top-level aten ops ``run()`` dispatches (those called from Python, not from
    another op): the total, by op, and by the innermost dattri_fn line on their Python stack.
    (torch.profiler: a TorchFunctionMode would make ``mlp_io`` decline, as it should.)"""
    by_op: collections.Counter = collections.Counter()
    by_line: collections.Counter = collections.Counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                with_stack=True) as prof:
        run()
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        up, where, nested = ev.cpu_parent, None, False
        while up is not None:  # python frames are events too: nested under an op, or where from
            if up.name.startswith("aten::"):
                nested = True
                break
            if where is None and "dattri_fn/" in up.name:
                where = up.name.split("dattri_fn/", 1)[1]
            up = up.cpu_parent
        if nested:
            continue
        by_op[ev.name] += 1
        by_line[where or "?"] += 1
    print(f"top-level aten ops in one prepare + score: {sum(by_op.values())}")
    for name, c in by_op.most_common(25):
        print(f"  {c:5d}  {name}")
    print("by calling line:")
    for where, c in by_line.most_common(45):
        print(f"  {c:5d}  {where}")


if __name__ == "__main__":
    main()
