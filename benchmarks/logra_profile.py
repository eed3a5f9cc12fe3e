"""Where LoGra's ``prepare + score`` spends its thread CPU time on a bundled task (one thread).

    OMP_NUM_THREADS=1 python -m benchmarks.logra_profile [--task digits-mlp] [--rounds 200] [--ops]

The method is built as :mod:`benchmarks.e18_ab` builds it (one checkpoint, the recipe's batches
of 256, ``benchmarks.against_dattri``'s ``LOGRA_K``). Printed: the mean thread CPU
microseconds of ``prepare`` and ``score`` per call, and of every step ``logra.py`` calls by
module-level name, and of ``logra_rows._outer_rows`` (the cached train rows, formed and rotated
block by block by ``_cached_spans``' row function during ``score``) (each wrapped to add its
thread CPU time; steps nest: ``collect`` includes the test pass's ``_raw``, ``_projected`` and
``_features``). ``--ops`` adds torch.profiler's op table:
its times are wall-clock, so under load they mislead (a 0-d ``aten::ones`` showed 209 us); use
the op counts and shapes from it, the times from the phases. This profiles; speed claims go
through :mod:`benchmarks.e18_ab` (interleaved A/B).
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

STEPS = ("_raw", "_projected", "_features", "_outer_rows", "_eigvecs", "_factored_sums",
         "_add_lambda", "_eigvals", "_precondition", "_cached_spans", "collect",
         "check_cached_train", "capture_row_bytes", "count_rows", "can_merge", "batch_to",
         "_eigen_rows", "state_of", "check_params")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.logra_profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--ops", action="store_true", help="also torch.profiler's op table")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logra_mod = importlib.import_module("dattri_fn.attribute.logra")
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

    for name in STEPS:  # before the method is built: logra() binds _raw in a partial
        if hasattr(logra_mod, name):
            setattr(logra_mod, name, timed(name, getattr(logra_mod, name)))
    # the cached train factors' rows are formed (and rotated) block by block inside
    # _cached_spans' row function, through logra_rows' own _outer_rows (review R6 F3)
    rows_mod = importlib.import_module("dattri_fn.attribute.logra_rows")
    rows_mod._outer_rows = timed("logra_rows._outer_rows", rows_mod._outer_rows)
    from benchmarks.against_dattri import LOGRA_K
    from benchmarks.run import DEFAULT_SIZES, load_models, load_task, train_states
    from dattri_fn.app.recipes import recipe
    from dattri_fn.model import functional_model

    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, 1))
    r = recipe("grad-dot", task, models[:1], batch_size=256)
    fm = functional_model(models[0].eval(), task.loss_fn)
    m = logra_mod.logra(fm, proj_dim=LOGRA_K)
    for _ in range(3):
        m.score(fm.params, m.prepare(fm.params, r.train), r.train, r.test)
    spent.clear()
    calls.clear()
    t_prep = t_score = 0
    for _ in range(args.rounds):
        t0 = time.thread_time_ns()
        state = m.prepare(fm.params, r.train)
        t1 = time.thread_time_ns()
        m.score(fm.params, state, r.train, r.test)
        t_prep, t_score = t_prep + t1 - t0, t_score + time.thread_time_ns() - t1
    n = args.rounds
    print(f"{args.task} logra: thread CPU us a call over {n} rounds (load "
          f"{os.getloadavg()[0]:.2f}): prepare {t_prep / n / 1e3:.0f}, score {t_score / n / 1e3:.0f}")
    for name, ns in spent.most_common():
        print(f"  {name:20s} {ns / n / 1e3:8.1f} us a round  x{calls[name] / n:.0f}  "
              f"{ns / calls[name] / 1e3:8.1f} us a call")
    if args.ops:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            for _ in range(20):
                m.score(fm.params, m.prepare(fm.params, r.train), r.train, r.test)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="count", row_limit=40))


if __name__ == "__main__":
    main()
