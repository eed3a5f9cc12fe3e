"""A recipe's ``prepare + score`` in several checkouts and in dattri 0.3.0, interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.rps_ab --tree base=/tmp/base --tree now=. \
        [--task digits-lr] [--method rps] [--rounds 41] [--profile now]

:mod:`benchmarks.capture_method_ab` with :mod:`benchmarks.e18_ab`'s fixes, for a recipe
(``rps``, ``if-ekfac``, ...): each ``--tree NAME=TREE`` imports ``TREE/dattri_fn`` as its own
package and builds the recipe with the tree's own copy of the task's loss, on ``benchmarks.run``'s
task, one checkpoint (as :mod:`benchmarks.g_against`) and sizes. Rounds run every side once in a
seeded random order, a garbage collection between rounds (none inside). Printed: median
main-thread CPU ms, each tree's median per-round ratio to dattri and to the first tree, and
whether its scores equal the first tree's (``torch.equal``). ``--profile NAME`` prints that
tree's cProfile of ``--profile-runs`` runs instead.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import importlib
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (dattri imports it)

import torch  # noqa: E402

HP = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64, "arnoldi_block": 16,
      "batch_size": 256, "seed": 0, "device": "cpu"}


def _load(name: str, tree: str):
    root = tempfile.mkdtemp(prefix="rps_ab_")
    shutil.copytree(os.path.join(tree, "dattri_fn"), os.path.join(root, f"dattri_fn_{name}"))
    sys.path.insert(0, root)
    return importlib.import_module(f"dattri_fn_{name}")


def _ours(pkg, method: str, task, models):
    recipes = importlib.import_module(f"{pkg.__name__}.app.recipes")
    tasks = importlib.import_module(f"{pkg.__name__}.eval.tasks")
    # the tree's own loss: another package's function object is not recognised by its passes
    task = dataclasses.replace(task, loss_fn=getattr(tasks, task.loss_fn.__name__, task.loss_fn))
    r = recipes.recipe(method, task, models, damping=HP["damping"], proj_dim=HP["proj_dim"],
                       seed=HP["seed"], batch_size=HP["batch_size"], max_iter=HP["max_iter"],
                       arnoldi_rank=HP["arnoldi_rank"], arnoldi_block=HP["arnoldi_block"])
    return lambda: r.method.score(r.params, r.method.prepare(r.params, r.train), r.train, r.test)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rps_ab",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=TREE (repeatable)")
    p.add_argument("--task", default="digits-lr")
    p.add_argument("--method", default="rps")
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--no-dattri", action="store_true", help="trees only (ratios between trees)")
    p.add_argument("--profile", default=None, metavar="NAME")
    p.add_argument("--profile-runs", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from benchmarks.run import DEFAULT_SIZES, load_models, load_task, runner_for, train_states

    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, 1))
    runs = {}
    if not args.no_dattri and args.profile is None:
        theirs = runner_for("dattri", args.method, task, models, HP)
        runs["dattri"] = lambda: theirs.score(theirs.prepare())
    for spec in args.tree:
        name, tree = spec.split("=", 1)
        runs[name] = _ours(_load(name, tree), args.method, task, models)
    trees = [n for n in runs if n != "dattri"]
    first = trees[0]
    scores = {n: runs[n]() for n in trees}
    for fn in runs.values():  # warm: first calls import and build
        fn()
    if args.profile is not None:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.profile_runs):
            runs[args.profile]()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
        pstats.Stats(prof).sort_stats("cumtime").print_stats(os.environ.get("PROF_FILTER", ""), 45)
        return
    names = list(runs)
    times = {n: [] for n in names}
    order, rng = list(names), random.Random(0)
    gc.disable()  # collect between rounds, never inside one
    try:
        for _ in range(args.rounds):
            gc.collect()
            rng.shuffle(order)  # a rotation keeps the cyclic order (review R3 F1)
            for n in order:
                t0 = time.thread_time()
                runs[n]()
                times[n].append(1e3 * (time.thread_time() - t0))
    finally:
        gc.enable()
    print(f"{args.task} {args.method}: median main-thread CPU ms of {args.rounds} rounds "
          f"(load {os.getloadavg()[0]:.2f})")
    for n in names:
        line = f"  {n:10s} {statistics.median(times[n]):8.3f}"
        if "dattri" in times:
            to_d = statistics.median(a / b for a, b in zip(times[n], times["dattri"], strict=True))
            line += f"  /dattri {to_d:6.3f}"
        to_f = statistics.median(a / b for a, b in zip(times[n], times[first], strict=True))
        line += f"  /{first} {to_f:6.3f}"
        if n != "dattri":
            line += f"  scores == {first}: {torch.equal(scores[n], scores[first])}"
        print(line)


if __name__ == "__main__":
    main()
