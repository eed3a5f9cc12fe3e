"""LoGra / FactGraSS ``prepare + score`` in several checkouts and in dattri 0.3.0, interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.e18_ab --tree base=/tmp/base --tree now=. \
        [--task digits-lr] [--method logra] [--rounds 40]

:mod:`benchmarks.capture_method_ab` for the two methods that have no recipe: each tree's
``dattri_fn`` is imported as its own package, and the method is built as
:mod:`benchmarks.logra_floor` builds it (one checkpoint, the recipe's batches of 256,
``benchmarks.against_dattri``'s sizes). Printed: median main-thread CPU ms over rotated rounds,
each tree's median per-round ratio to dattri and to the first tree, and whether every tree's
scores equal the first tree's (``torch.equal``; if not, the largest move relative to the first
tree's largest score). Each tree scores with its own copy of the task's
loss (``eval.tasks``): before stop 23 the trees got the main package's, whose ``per_example`` form
their capture passes did not recognise (every tree ran the generic per-example losses).

The runs of a round go in a seeded random order. Until stop 24 they were rotated, which keeps
their cyclic order: the first tree always followed dattri's 13 ms run and measured 3-7% slow in
A/A runs (identical copies; review R3 F1, engineer C2). Give two copies of the baseline to see the
noise floor (``--tree before=BASE --tree before2=BASE_COPY --tree now=.``). ``--lds M`` adds each
tree's LDS.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import random
import statistics
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


def _ours(pkg, method: str, task, models):
    from benchmarks.against_dattri import FACTGRASS_BLOWUP, FACTGRASS_DIM, LOGRA_K

    recipes = importlib.import_module(f"{pkg.__name__}.app.recipes")
    model = importlib.import_module(f"{pkg.__name__}.model")
    r = recipes.recipe("grad-dot", task, models[:1], batch_size=256)
    # the tree's own loss: a loss from the main package is not the tree's (its per_example form
    # is another function object), so the tree's capture pass would miss its summed
    # cross-entropy and take the generic per-example losses
    tasks = importlib.import_module(f"{pkg.__name__}.eval.tasks")
    loss = getattr(tasks, task.loss_fn.__name__, task.loss_fn)
    fm = model.functional_model(models[0].eval(), loss)
    if method == "logra":
        m = importlib.import_module(f"{pkg.__name__}.attribute.logra").logra(fm, proj_dim=LOGRA_K)
    else:
        m = importlib.import_module(f"{pkg.__name__}.attribute.factgrass").factgrass(
            fm, proj_dim=FACTGRASS_DIM, blowup=FACTGRASS_BLOWUP)
    return lambda: m.score(fm.params, m.prepare(fm.params, r.train), r.train, r.test)


def main(argv=None) -> None:
    from benchmarks.capture_method_ab import HP, _load

    p = argparse.ArgumentParser(prog="python -m benchmarks.e18_ab",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=TREE (repeatable)")
    p.add_argument("--task", default="digits-lr")
    p.add_argument("--method", default="logra", choices=("logra", "factgrass"))
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--lds", type=int, default=0, metavar="M",
                   help="also each tree's LDS on M retrained subsets (cached under .cache/dattri_fn)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from benchmarks.run import DEFAULT_SIZES, load_models, load_task, runner_for, train_states

    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, 1))
    theirs = runner_for("dattri", args.method, task, models, HP)
    runs = {"dattri": lambda: theirs.score(theirs.prepare())}
    for spec in args.tree:
        name, tree = spec.split("=", 1)
        runs[name] = _ours(_load(name, tree), args.method, task, models)
    names = list(runs)
    first = names[1]
    scores = {n: runs[n]() for n in names[1:]}
    if args.lds:
        from dattri_fn.eval.metrics import lds
        from dattri_fn.eval.retrain import lds_ground_truth

        gt = lds_ground_truth(task, args.lds, cache_dir=".cache/dattri_fn", seed=0, progress=False)
        per = {n: lds(scores[n].double(), gt.subsets, gt.targets.double()) for n in names[1:]}
        for n, res in per.items():
            print(f"  LDS {n}: {float(res.mean):.6f} (M = {args.lds}); per test point == {first}'s: "
                  f"{torch.equal(res.per_test, per[first].per_test)}")
    for fn in runs.values():  # warm
        fn()
    times = {n: [] for n in names}
    order, rng = list(names), random.Random(0)
    gc.disable()  # collect between rounds, never inside one
    try:
        for _ in range(args.rounds):
            gc.collect()
            # a seeded shuffle each round: a rotation keeps the cyclic order, so the first tree
            # always ran right after dattri's long run and measured 3-7% slow (review R3, F1)
            rng.shuffle(order)
            for n in order:
                t0 = time.thread_time()
                runs[n]()
                times[n].append(1e3 * (time.thread_time() - t0))
    finally:
        gc.enable()
    print(f"{args.task} {args.method}: median main-thread CPU ms of {args.rounds} rounds "
          f"(load {os.getloadavg()[0]:.2f})")
    for n in names:
        to_d = statistics.median(a / b for a, b in zip(times[n], times["dattri"], strict=True))
        to_f = statistics.median(a / b for a, b in zip(times[n], times[first], strict=True))
        same = "" if n == "dattri" else f"  scores == {first}: {torch.equal(scores[n], scores[first])}"
        if n != "dattri" and not torch.equal(scores[n], scores[first]):
            S0 = scores[first].double()
            rel = float((scores[n].double() - S0).abs().max() / S0.abs().max())
            same += f" (max |S - S_{first}| / max |S_{first}| = {rel:.2e})"
        print(f"  {n:10s} {statistics.median(times[n]):8.3f}  /dattri {to_d:6.3f}  /{first} "
              f"{to_f:6.3f}{same}")


if __name__ == "__main__":
    main()
