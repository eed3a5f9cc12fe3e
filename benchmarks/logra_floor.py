"""LoGra and FactGraSS against dattri 0.3.0: where the time goes, and the floor the capture passes set.

    OMP_NUM_THREADS=1 python -m benchmarks.logra_floor --task digits-lr [--rounds 15]

One process, the runners of :mod:`benchmarks.g_against` (our method at benchmarks.against_dattri's
sizes on the recipe's batches; dattri's attributor), alternated round by round with the pieces
of our run timed alone on the same data (main-thread CPU time, medians over rounds):

* ``train pass`` / ``test pass``: one capture pass (:func:`~dattri_fn.transforms.layers.batched_io`,
  every captured layer) over the merged training batches / the test batch: the engine's
  forward and backward, which LoGra and FactGraSS each run once per side;
* ``check rows`` (FactGraSS): the plan check's reference, the first 3 examples' own losses and
  their gradients (:func:`~dattri_fn.transforms.layer_grads_paths._example_rows`);
* ``rest``: the whole ``prepare + score`` less those pieces (projections, statistics,
  eigendecompositions or Cholesky, preconditioning, the products, checks and Python).

``floor ratio`` = (passes + check rows) / dattri: the CPU ratio left if everything but the
capture passes and the check cost nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.against_dattri import FACTGRASS_BLOWUP, FACTGRASS_DIM, LOGRA_K  # noqa: E402
from benchmarks.run import DEFAULT_SIZES, load_models, load_task, runner_for, train_states  # noqa: E402


def _cpu_ms(fn) -> float:
    c = time.thread_time_ns()
    fn()
    return (time.thread_time_ns() - c) / 1e6


def pieces(name: str, task, models) -> dict:
    """``{piece: zero-argument callable}``: the whole run of ours and its timed parts."""
    from dattri_fn._checks import batch_cat, batch_slice
    from dattri_fn.app.recipes import recipe
    from dattri_fn.attribute.factgrass import factgrass
    from dattri_fn.attribute.logra import logra
    from dattri_fn.model import functional_model
    from dattri_fn.transforms import capture
    from dattri_fn.transforms.layer_grads import layer_plan
    from dattri_fn.transforms.layer_grads_paths import _example_rows
    from dattri_fn.transforms.layers import batched_io

    fm = functional_model(models[0].eval(), task.loss_fn)
    method = logra(fm, proj_dim=LOGRA_K) if name == "logra" else factgrass(
        fm, proj_dim=FACTGRASS_DIM, blowup=FACTGRASS_BLOWUP)
    r = recipe("grad-dot", task, models[:1], batch_size=256)
    plan = layer_plan(fm)
    tapped = capture.tap(fm.module, tuple(plan.layers))
    state = {**fm.fixed, **fm.params}
    like = next(iter(fm.params.values()))
    merged = batch_cat(list(r.train))

    def one_pass(batch):
        x, y = batch
        return lambda: batched_io(tapped, fm.loss_fn, state, (x,), {}, y, None, like)

    out = {"ours": lambda: method.score(fm.params, method.prepare(fm.params, r.train), r.train,
                                        r.test),
           "train pass": one_pass(merged), "test pass": one_pass(r.test)}
    if name == "factgrass":
        head = batch_slice(merged, 0, 3)
        out["check rows"] = lambda: _example_rows(fm, fm.params, head, tapped.ties_any)
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-lr", choices=("digits-lr", "digits-mlp"))
    p.add_argument("--methods", default="logra,factgrass")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")  # dattri warns per batch
    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, 1))
    hp = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
          "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}
    rows = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        fns = pieces(name, task, models)
        d = runner_for("dattri", name, task, models, hp)
        fns["dattri"] = lambda d=d: d.score(d.prepare())
        for f in fns.values():  # warm-up
            f()
        t: dict = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                t[k].append(_cpu_ms(f))
        med = {k: statistics.median(v) for k, v in t.items()}
        engine = med["train pass"] + med["test pass"] + med.get("check rows", 0.0)
        ratio = statistics.median([a / b for a, b in zip(t["ours"], t["dattri"], strict=True)])
        rows.append({"method": name, **med, "rest": med["ours"] - engine, "cpu_ratio": ratio,
                     "floor_ratio": engine / med["dattri"], "load": os.getloadavg()[0]})
    print(f"\n{args.task}: n_train={n_train}, n_test={n_test}, threads={torch.get_num_threads()}, "
          f"{args.rounds} rounds\n")
    head = ["method", "ours ms", "dattri ms", "CPU ratio", "train pass", "test pass",
            "check rows", "rest", "floor ratio", "load"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['method']} | {r['ours']:.3f} | {r['dattri']:.3f} | {r['cpu_ratio']:.3f} | "
              f"{r['train pass']:.3f} | {r['test pass']:.3f} | "
              f"{r.get('check rows', float('nan')):.3f} | {r['rest']:.3f} | "
              f"{r['floor_ratio']:.3f} | {r['load']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
