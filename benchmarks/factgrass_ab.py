"""FactGraSS ``prepare + score`` in several checkouts, interleaved in one process: CPU, exact peak, scores.

    OMP_NUM_THREADS=1 python -m benchmarks.factgrass_ab --tree base=/tmp/base --tree now=. \
        [--point n16000 | --point p10000 | --point digits-lr] [--rounds 15]

Each tree's ``dattri_fn`` is imported as its own package (:func:`benchmarks.capture_method_ab._load`)
and FactGraSS is built as :mod:`benchmarks.scaling` builds it (``d = 64`` per layer, blowup 4) on:

* ``nN``: the scaling probe's n-sweep point (``synthetic_digits(N)``, the 64-32-10 tanh MLP, its
  batch rows), as :mod:`benchmarks.e18_peak`;
* ``pP``: the P-sweep point (n = 1000) whose MLP has about ``P`` parameters (width ``(P - 10) / 75``);
* a task name (``digits-lr``, ``digits-mlp``): :mod:`benchmarks.g_against`'s sizes and batches.

Printed per tree: the median main-thread CPU ms over rotated rounds and the median per-round ratio
to the first tree; the exact tensor peak of one ``prepare + score``
(:func:`benchmarks.peak.tensor_peak`) and of ``prepare`` alone; whether its scores equal the first
tree's (``torch.equal``), else their largest difference relative to the largest score.
``--dattri`` adds dattri 0.3.0's side as :mod:`benchmarks.scaling` runs it (``nN``, ``pP`` only),
rotated with the trees, and each tree's time and peak ratio to it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


def _point(point: str):
    """``(task, models, batch rows)`` of a scaling point or a bundled task."""
    if point.startswith("n") and point[1:].isdigit():
        from benchmarks.scaling import N_MODELS, batch_rows, mlp, synthetic_digits

        models = [mlp(32, c) for c in range(N_MODELS)]
        return synthetic_digits(int(point[1:])), models, batch_rows(
            sum(p.numel() for p in models[0].parameters()))
    if point.startswith("p") and point[1:].isdigit():
        from benchmarks.scaling import N_MODELS, batch_rows, mlp, synthetic_digits

        width = max(1, round((int(point[1:]) - 10) / 75))  # 64 w + w + 10 w + 10 = P
        models = [mlp(width, c) for c in range(N_MODELS)]
        return synthetic_digits(1000), models, batch_rows(
            sum(p.numel() for p in models[0].parameters()))
    from benchmarks.run import DEFAULT_SIZES, load_models, load_task, train_states

    n_train, n_test, _ = DEFAULT_SIZES[point]
    task = load_task({"name": point, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    return task, load_models(task, train_states(task, 1)), 256


def _ours(pkg, task, models, rows: int):
    """``(prepare, score)`` of FactGraSS in the tree ``pkg`` on its own copy of the task's loss."""
    from benchmarks.against_dattri import FACTGRASS_BLOWUP, FACTGRASS_DIM

    recipes = importlib.import_module(f"{pkg.__name__}.app.recipes")
    model = importlib.import_module(f"{pkg.__name__}.model")
    tasks = importlib.import_module(f"{pkg.__name__}.eval.tasks")
    r = recipes.recipe("grad-dot", task, models[:1], batch_size=rows)
    loss = getattr(tasks, task.loss_fn.__name__, task.loss_fn)
    fm = model.functional_model(models[0].eval(), loss)
    m = importlib.import_module(f"{pkg.__name__}.attribute.factgrass").factgrass(
        fm, proj_dim=FACTGRASS_DIM, blowup=FACTGRASS_BLOWUP)
    return (lambda: m.prepare(fm.params, r.train)), (
        lambda st: m.score(fm.params, st, r.train, r.test))


def main(argv=None) -> None:
    from benchmarks.capture_method_ab import _load
    from benchmarks.peak import tensor_peak

    p = argparse.ArgumentParser(prog="python -m benchmarks.factgrass_ab",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=TREE (repeatable)")
    p.add_argument("--point", default="n16000", help="nN, pP or a task (digits-lr, digits-mlp)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dattri", action="store_true", help="also dattri 0.3.0's FactGraSSAttributor")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    task, models, rows = _point(args.point)
    runs = {}
    for spec in args.tree:
        name, tree = spec.split("=", 1)
        runs[name] = _ours(_load(name, tree), task, models, rows)
    names, first = list(runs), next(iter(runs))
    scores, peaks = {}, {}
    for n, (prep, score) in runs.items():
        score(prep())  # warm
        scores[n], whole = tensor_peak(lambda prep=prep, score=score: score(prep()))
        peaks[n] = (whole, tensor_peak(prep)[1])
    if args.dattri:  # the scaling probe's dattri side: prepare (cache) + score (attribute)
        from benchmarks.scaling import runner

        theirs = runner("factgrass", task, models, cg_iters=20, side="dattri")
        theirs()
        runs["dattri"] = (lambda: None, lambda _: theirs())
        peaks["dattri"] = (tensor_peak(theirs)[1], None)
        names.append("dattri")
    times = {n: [] for n in names}
    gc.disable()  # collect between rounds, never inside one
    try:
        for r in range(args.rounds):
            gc.collect()
            for n in names[r % len(names):] + names[:r % len(names)]:
                prep, score = runs[n]
                t0 = time.thread_time()
                score(prep())
                times[n].append(1e3 * (time.thread_time() - t0))
    finally:
        gc.enable()
    print(f"factgrass at {args.point}: median main-thread CPU ms of {args.rounds} rounds "
          f"(load {os.getloadavg()[0]:.2f})")
    ref = scores[first]
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(times[n], times[first], strict=True))
        line = (f"  {n:8s} {statistics.median(times[n]):9.2f} ms  /{first} {ratio:6.3f}  peak "
                f"{peaks[n][0] / 2**20:7.3f} MiB")
        if n == "dattri":
            print(line)
            continue
        if args.dattri:
            to_d = statistics.median(a / b for a, b in zip(times[n], times["dattri"], strict=True))
            line += f" (/dattri time {to_d:.3f}, peak {peaks[n][0] / peaks['dattri'][0]:.3f})"
        got = scores[n]
        same = ("torch.equal" if torch.equal(got, ref) else
                f"rel diff {float((got - ref).abs().max() / ref.abs().max()):.2e}")
        print(f"{line}  prepare {peaks[n][1] / 2**20:.3f} MiB  scores {same}")


if __name__ == "__main__":
    main()
