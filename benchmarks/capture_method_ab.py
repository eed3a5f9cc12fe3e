"""A method's ``prepare + score`` in several checkouts and in dattri 0.3.0, interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.capture_method_ab --tree base=/tmp/base \
        --tree now=. [--task digits-lr] [--method grad-dot] [--rounds 60]

Each ``--tree NAME=TREE`` imports ``TREE/dattri_fn`` as ``dattri_fn_NAME`` (a copy in a temporary
folder), so every tree runs the same task, models (``benchmarks.run``'s three checkpoints) and
recipe (``benchmarks.g_against``'s sizes and settings). Every round runs dattri once and every
tree once, in a rotated order, with a garbage collection before each round (none inside);
printed: median main-thread CPU milliseconds, each tree's median
per-round ratio to dattri (g_against's CPU ratio) and to the first tree. One process: the
trees' differences are not drowned by the differences between processes (g_against runs one
tree per process, whose ratios move by more than a capture pass costs).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
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
    root = tempfile.mkdtemp(prefix="capture_method_ab_")
    shutil.copytree(os.path.join(tree, "dattri_fn"), os.path.join(root, f"dattri_fn_{name}"))
    sys.path.insert(0, root)
    return importlib.import_module(f"dattri_fn_{name}")


def _ours(pkg, method: str, task, models):
    recipes = importlib.import_module(f"{pkg.__name__}.app.recipes")
    r = recipes.recipe(method, task, models, damping=HP["damping"], proj_dim=HP["proj_dim"],
                       seed=HP["seed"], batch_size=HP["batch_size"], max_iter=HP["max_iter"],
                       arnoldi_rank=HP["arnoldi_rank"], arnoldi_block=HP["arnoldi_block"])
    return lambda: r.method.score(r.params, r.method.prepare(r.params, r.train), r.train, r.test)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capture_method_ab",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=TREE (repeatable)")
    p.add_argument("--task", default="digits-lr")
    p.add_argument("--method", default="grad-dot")
    p.add_argument("--rounds", type=int, default=60)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from benchmarks.run import DEFAULT_SIZES, load_models, load_task, runner_for, train_states

    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, 3))
    theirs = runner_for("dattri", args.method, task, models, HP)
    runs = {"dattri": lambda: theirs.score(theirs.prepare())}
    for spec in args.tree:
        name, tree = spec.split("=", 1)
        runs[name] = _ours(_load(name, tree), args.method, task, models)
    names = list(runs)
    for fn in runs.values():  # warm: first calls import and build
        fn()
        fn()
    times = {n: [] for n in names}
    gc.disable()  # a collection lands in whichever run crosses the threshold: collect between rounds
    try:
        for r in range(args.rounds):
            gc.collect()
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.thread_time()
                runs[n]()
                times[n].append(1e3 * (time.thread_time() - t0))
    finally:
        gc.enable()
    first = names[1]
    print(f"{args.task} {args.method}: median main-thread CPU ms of {args.rounds} rounds "
          f"(load {os.getloadavg()[0]:.2f})")
    for n in names:
        to_d = statistics.median(a / b for a, b in zip(times[n], times["dattri"], strict=True))
        to_f = statistics.median(a / b for a, b in zip(times[n], times[first], strict=True))
        print(f"  {n:10s} {statistics.median(times[n]):8.3f}  /dattri {to_d:6.3f}  /{first} {to_f:6.3f}")


if __name__ == "__main__":
    main()
