"""Influence prepare + score, a baseline tree against this one, interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.influence_ab --baseline /tmp/g_base [--task digits-lr]
        [--rounds 5] [--rows 'matched if-cg,matched if-lissa,matched if-cg-ens,recipe if-lissa']

``--baseline`` is a checkout of an earlier commit, imported as ``dattri_fn_base`` (as in
:mod:`benchmarks.gn_ab`), so both versions score the same task, models and data. Rows:

* ``matched if-cg`` / ``matched if-lissa`` / ``matched if-cg-ens``: influence with the Hessian of
  ``CE + 0.5 wd |theta|^2`` as :func:`benchmarks.against_dattri.matched_runner` builds it for the
  comparison with dattri (CG ``max_iter=100, rtol=1e-4``; LiSSA ``depth=200``, 64-row
  mini-batches, the shared scale; the ensemble over every model);
* ``recipe <name>``: the library's recipe (:func:`dattri_fn.app.recipes.recipe`).

Each round times one ``prepare + score`` per row and tree, baseline then this tree, in thread CPU
seconds; the printout has min and median per row, the ratio of medians and the scores' max
relative difference between the trees, with the load before and after.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
import warnings

import torch

from benchmarks.gn_ab import _load_baseline

ROWS = ("matched if-cg", "matched if-lissa", "matched if-cg-ens", "recipe if-lissa",
        "recipe if-cg")
HP = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
      "arnoldi_block": 16, "batch_size": 256, "seed": 0}


def _thunk(pkg, row: str, task, models, scale: float):
    """``() -> scores`` of one row in package ``pkg`` (this tree's dattri_fn or the baseline)."""
    recipes = importlib.import_module(f"{pkg.__name__}.app.recipes")
    kind, name = row.split(" ")
    r = recipes.recipe(name, task, models, damping=HP["damping"], proj_dim=HP["proj_dim"],
                       seed=HP["seed"], batch_size=HP["batch_size"], max_iter=HP["max_iter"],
                       arnoldi_rank=HP["arnoldi_rank"])
    if kind == "recipe":
        return lambda: r.method.score(r.params, r.method.prepare(r.params, r.train), r.train,
                                      r.test)
    influence = importlib.import_module(f"{pkg.__name__}.attribute").influence
    fms = [pkg.functional_model(m.eval(), task.loss_fn) for m in models]
    wd = float(task.hparams.get("weight_decay", 0.0))
    opts = (dict(max_iter=HP["max_iter"], rtol=1e-4) if name != "if-lissa" else
            dict(scale=scale, depth=200, batch_size=min(64, task.n_train)))
    method = influence(fms[0], l2=wd / 2, solver="lissa" if name == "if-lissa" else "cg",
                       damping=HP["damping"], curvature="hessian", **opts)
    params = [f.params for f in fms] if name == "if-cg-ens" else fms[0].params
    return lambda: method.score(params, method.prepare(params, r.train), r.train, r.test)


def main() -> None:
    from benchmarks.against_dattri import matched_lissa_scale
    from benchmarks.run import DEFAULT_SIZES, load_models, load_task, train_states

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="a checkout of the commit to compare with")
    ap.add_argument("--task", default="digits-lr", choices=tuple(DEFAULT_SIZES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import dattri_fn

    base = _load_baseline(args.baseline)
    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, 3))
    scale = matched_lissa_scale(task, models, {**HP, "device": "cpu"})
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    fns = {(row, tag): _thunk(pkg, row, task, models, scale)
           for row in rows for tag, pkg in (("baseline", base), ("this tree", dattri_fn))}
    out = {key: fn() for key, fn in fns.items()}  # warm-up, and the scores compared below
    times: dict = {key: [] for key in fns}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for key, fn in fns.items():
            t0 = time.thread_time()
            fn()
            times[key].append(time.thread_time() - t0)
        loads.append(os.getloadavg()[0])
    print(f"{args.task}: n_train={n_train}, n_test={n_test}, {args.rounds} rounds, thread CPU s")
    print("| row | baseline min / median | this tree min / median | median ratio | "
          "scores max rel diff |")
    print("|---|---|---|---|---|")
    for row in rows:
        b, t = times[(row, "baseline")], times[(row, "this tree")]
        S0, S1 = out[(row, "baseline")], out[(row, "this tree")]
        diff = float((S1 - S0).abs().max() / S0.abs().max())
        print(f"| {row} | {min(b):.3f} / {statistics.median(b):.3f} | {min(t):.3f} / "
              f"{statistics.median(t):.3f} | {statistics.median(t) / statistics.median(b):.2f} "
              f"| {diff:.1e}{' (equal)' if torch.equal(S0, S1) else ''} |")
    print("load per round: " + " ".join(f"{x:.2f}" for x in loads))


if __name__ == "__main__":
    main()
