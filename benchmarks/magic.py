"""MAGIC against every other method on a task trained by the functional SGD run; time and memory vs T.

    OMP_NUM_THREADS=1 python -m benchmarks.magic --task digits-mlp

The task is built with ``hparams=SGD_HPARAMS`` (mini-batch SGD with momentum, cosine decay, on
:mod:`dattri_fn.training`), so the models every method attributes are the runs MAGIC replays
and differentiates. Each method runs in its own spawned process (``benchmarks.run.measure``:
time of prepare + score, peak RSS increment). LDS against three ground truths over the same
``m`` half-subsets:

* ``std r=1``: the runner's standard protocol (``lds_ground_truth``, one model per subset,
  trained on the subset alone, init and order seed shared by all subsets);
* ``std r=R``: the same averaged over ``R`` seeds (less retraining noise);
* ``fixed``: MAGIC's own protocol (``lds_ground_truth(weighted=True)``: every model trains on
  all rows in the full run's order with the removed examples weighted 0).

``magic`` differentiates the first model's run (init seed 0), ``magic-ens`` averages the runs of
all ``--models``; ``magic@gt`` differentiates the run from the ground truth's own init and order
seed (what the fixed protocol perturbs). The scan measures MAGIC's prepare/score time and peak
memory as the number of steps ``T`` grows, with ``checkpoint_every = ceil(sqrt(T))`` and ``1``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

from benchmarks import run
from benchmarks.peak import measure_peak


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-mlp", choices=("digits-lr", "digits-mlp", "digits-cnn"))
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--r", type=int, default=3, help="seeds per subset of the averaged ground truth")
    p.add_argument("--models", type=int, default=3, help="models (magic-ens, TRAK, TracIn)")
    p.add_argument("--methods", default="if-explicit,if-cg,if-ekfac,grad-dot,grad-cos,tracin,trak,rps",
                   help="the other methods, run as benchmarks.run runs them")
    p.add_argument("--scan", default="5,10,20,40", help="epochs of the time/memory scan ('' = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=".cache/dattri_fn")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _runner_args(args) -> argparse.Namespace:
    return run.parse_args(["--task", args.task, "--sgd", "--n-train", str(args.n_train),
                           "--n-test", str(args.n_test), "--subsets", str(args.subsets),
                           "--models", str(args.models), "--seed", str(args.seed),
                           "--repeats", "1", "--methods", "magic"])


def magic_at_seed(task, init_seed: int):
    """MAGIC through the sgd run from ``task.make_model(init_seed)`` (its own order seed)."""
    from dattri_fn.attribute.magic import magic
    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.eval.tasks import order_seed, sgd_run
    from dattri_fn.model import functional_model

    hp = task.hparams
    model = task.make_model(init_seed)
    fm = functional_model(model, task.loss_fn)
    optimizer, _ = sgd_run(task.n_train, seed=init_seed, epochs=hp["epochs"], lr=hp["lr"],
                           weight_decay=hp["weight_decay"], batch_size=hp["batch_size"],
                           momentum=hp["momentum"])
    method = magic(fm, optimizer, epochs=hp["epochs"], batch_size=hp["batch_size"],
                   seed=[order_seed(init_seed)],
                   target=functional_model(model, classification_margin_loss).loss)
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    t0 = time.perf_counter()
    state = method.prepare(fm.params, data)
    scores = method.score(fm.params, state, data, test)
    return scores, time.perf_counter() - t0


def scan_setup(spec: dict):
    """Build the task and MAGIC for ``spec['epochs']`` epochs; return the timed step."""
    from dataclasses import replace

    from dattri_fn.app.recipes import magic_recipe

    task = run.load_task(spec["task"])
    task = replace(task, hparams={**task.hparams, "epochs": spec["epochs"]})
    method, params = magic_recipe(task, 1, checkpoint_every=spec["every"])
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    # A first call pages in library code, which would count as the step's memory.
    few = (data[0][:32], data[1][:32])
    method.score(params, method.prepare(params, few), few, (test[0][:2], test[1][:2]))

    def step():
        t0 = time.perf_counter()
        state = method.prepare(params, data)
        t1 = time.perf_counter()
        method.score(params, state, data, test)
        steps = len(state.orders[0])
        return {"prepare_s": t1 - t0, "score_s": time.perf_counter() - t1, "T": steps,
                "checkpoints": len(state.runs[0].checkpoints)}

    return step


def main(argv: Sequence[str] | None = None) -> dict:
    from dattri_fn.eval.metrics import lds
    from dattri_fn.eval.retrain import _model_seed, lds_ground_truth

    args = parse_args(argv)
    rargs = _runner_args(args)
    spec_task = run.task_spec(rargs)
    task = run.load_task(spec_task)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    say(f"{args.task} (sgd): n_train={args.n_train} n_test={args.n_test} m={args.subsets}")
    t0 = time.perf_counter()
    gts = {"std r=1": lds_ground_truth(task, args.subsets, cache_dir=args.cache_dir,
                                       seed=args.seed, progress=not args.quiet)}
    gts[f"std r={args.r}"] = lds_ground_truth(task, args.subsets, args.r, cache_dir=args.cache_dir,
                                              seed=args.seed, progress=not args.quiet)
    gts["fixed"] = lds_ground_truth(task, args.subsets, cache_dir=args.cache_dir, seed=args.seed,
                                    progress=not args.quiet, weighted=True)
    say(f"ground truths {time.perf_counter() - t0:.1f}s")
    states = run.train_states(task, args.models)
    names = [m.strip() for m in args.methods.split(",") if m.strip()] + ["magic", "magic-ens"]
    rows = []
    for name in names:
        spec = {"task": spec_task, "states": states, "method": name, "side": "ours",
                "hp": run.hyper_parameters(rargs), "repeats": 1}
        row = {"method": name, **run.measure(spec, args.timeout or None)}
        say(f"  {name}: wall {row['wall_s']:.1f}s" + (f" ERROR {row['error']}" if "error" in row else ""))
        rows.append(row)
    scores, secs = magic_at_seed(task, _model_seed(args.seed, 0))
    rows.append({"method": "magic@gt", "scores": scores, "prepare_s": 0.0, "score_s": secs,
                 "peak_mib": None})
    for row in rows:
        for label, gt in gts.items():
            if "scores" in row:
                res = lds(row["scores"].double(), gt.subsets, gt.targets.double())
                row[label] = (float(res.mean), float(res.ci95[0]), float(res.ci95[1]))
    print(f"\n### {args.task} trained by SGD (SGD_HPARAMS): n_train={args.n_train}, "
          f"n_test={args.n_test}, LDS over m={args.subsets} half-subsets\n")
    labels = list(gts)
    print("| method | " + " | ".join(f"LDS {lb} [95% CI]" for lb in labels)
          + " | prepare + score s | peak MiB | error |")
    print("|---|" + "---|" * (len(labels) + 3))
    for row in rows:
        cells = [f"{row[lb][0]:.3f} [{row[lb][1]:.3f}, {row[lb][2]:.3f}]" if lb in row else "—"
                 for lb in labels]
        t = row.get("prepare_s", math.nan) + row.get("score_s", math.nan)
        peak = row.get("peak_mib")
        print(f"| {row['method']} | " + " | ".join(cells) + f" | {t:.2f} | "
              + (f"{peak:.1f}" if peak is not None else "—") + f" | {row.get('error', '')} |")
    scan = []
    if args.scan:
        print("\n### MAGIC time and peak memory vs steps T (one run, all test targets at once)\n")
        print("| epochs | T | checkpoint_every | states kept | prepare s | score s | peak MiB |")
        print("|---|---|---|---|---|---|---|")
        for epochs in (int(e) for e in args.scan.split(",")):
            T = epochs * math.ceil(args.n_train / task.hparams["batch_size"])
            for every in (max(1, math.ceil(math.sqrt(T))), 1):
                out = measure_peak(scan_setup, {"task": spec_task, "epochs": epochs,
                                                "every": every}, timeout=args.timeout or None)
                if "result" not in out:
                    print(f"| {epochs} | {T} | {every} | — | — | — | {out} |")
                    continue
                res = out["result"]
                scan.append({"epochs": epochs, **res, "every": every, "peak_mib": out["peak_mib"]})
                print(f"| {epochs} | {res['T']} | {every} | {res['checkpoints']} | "
                      f"{res['prepare_s']:.2f} | {res['score_s']:.2f} | {out['peak_mib']:.1f} |")
    return {"rows": rows, "scan": scan}


if __name__ == "__main__":
    main()
