"""MAGIC against every other method on the same trained models; time and memory vs T.

    OMP_NUM_THREADS=1 python -m benchmarks.magic --task digits-mlp
    OMP_NUM_THREADS=1 python -m benchmarks.magic --task text-lm --optimizer adam --scan 5,10,20

``--optimizer sgd`` (default) builds the task with ``hparams=SGD_HPARAMS`` (mini-batch SGD with
momentum, cosine decay, on :mod:`dattri_fn.training`); ``--optimizer adam`` keeps the task's own
full-batch Adam trainer (digits-mlp, digits-cnn, text-lm), a functional run bit-identical to
``torch.optim.Adam`` (:func:`dattri_fn.eval.tasks.task_step`). Either way the models every method
attributes are the runs MAGIC replays and differentiates (each MAGIC row reports whether its
runs' final parameters equal the trained models', ``torch.equal``). Each method runs in its own
spawned process (``benchmarks.run.measure``, and :func:`magic_setup` for the MAGIC rows: time of
prepare + score, peak RSS increment). LDS against three ground truths over the same ``m``
half-subsets:

* ``std r=1``: the runner's standard protocol (``lds_ground_truth``, one model per subset,
  trained on the subset alone, init and order seed shared by all subsets);
* ``std r=R``: the same averaged over ``R`` seeds (less retraining noise);
* ``fixed``: MAGIC's own protocol (``lds_ground_truth(weighted=True)``: every model trains on
  all rows in the full run's order with the removed examples weighted 0).

``magic`` differentiates the first model's run (init seed 0), ``magic-ens`` averages the runs of
all ``--models``; ``magic@gt`` differentiates the run from the ground truth's own init and order
seed (what the fixed protocol perturbs). ``--horizons auto,60`` adds one row per horizon,
``magic K=<h>``: ``magic(horizon=h)`` on the first model's run (``auto``, the library's default:
per test target the step where its params cotangent is smallest); the three rows above are the
exact metagradient (``horizon=None``); ``--magic-rows`` picks which of them run.
``--ens-horizons auto`` adds ``magic-ens K=<h>``: the seed ensemble of ``magic-ens`` with
``horizon=h`` in every member (for ``auto``, each run's own ``K_j``). The scan
measures MAGIC's (exact) prepare/score time and peak memory as the number of steps ``T`` grows,
with ``checkpoint_every = ceil(sqrt(T))`` and ``1``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

from benchmarks import run
from benchmarks.peak import measure_peak

# n_train, n_test, m when not given: text-lm's are the runner's (benchmarks.run), a 15,872-
# parameter transformer whose full-batch reverse pass costs ~1.2 s a step for 16 targets.
SIZES = {"text-lm": (128, 16, 32)}
DIGITS_SIZES = (500, 50, 64)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-mlp",
                   choices=("digits-lr", "digits-mlp", "digits-cnn", "text-lm"))
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                   help="sgd: SGD_HPARAMS; adam: the task's own full-batch Adam trainer")
    p.add_argument("--n-train", type=int, default=None, help="default 500 (text-lm 128)")
    p.add_argument("--n-test", type=int, default=None, help="default 50 (text-lm 16)")
    p.add_argument("--subsets", type=int, default=None, help="default 64 (text-lm 32)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the trainer's epochs (default: SGD_HPARAMS' 40 or the task's)")
    p.add_argument("--r", type=int, default=3, help="seeds per subset of the averaged ground truth")
    p.add_argument("--models", type=int, default=3, help="models (magic-ens, TRAK, TracIn)")
    p.add_argument("--methods", default="if-explicit,if-cg,if-ekfac,grad-dot,grad-cos,tracin,trak,rps",
                   help="the other methods, run as benchmarks.run runs them")
    p.add_argument("--magic-rows", default="magic,magic-ens,magic@gt",
                   help="which of magic, magic-ens, magic@gt to run ('' = none)")
    p.add_argument("--horizons", default="",
                   help="extra magic rows on the first model: K steps, 'auto' or 'band', comma-separated")
    p.add_argument("--ens-horizons", default="",
                   help="extra magic-ens rows (all --models runs): horizon K steps, 'auto' or 'band'")
    p.add_argument("--scan", default="5,10,20,40", help="epochs of the time/memory scan ('' = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=".cache/dattri_fn")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from dattri_fn.eval.tasks import _HPARAMS

    args.magic_rows = [r.strip() for r in args.magic_rows.split(",") if r.strip()]
    if set(args.magic_rows) - {"magic", "magic-ens", "magic@gt"}:
        p.error(f"--magic-rows: expected magic, magic-ens, magic@gt, got {args.magic_rows}")
    for flag in ("horizons", "ens_horizons"):
        raw = getattr(args, flag)
        try:
            setattr(args, flag, [h if h in ("auto", "band") else int(h) for h in
                                 (h.strip() for h in raw.split(",")) if h])
        except ValueError:
            p.error(f"--{flag.replace('_', '-')}: expected ints, 'auto' or 'band', got {raw!r}")

    if args.optimizer == "adam" and _HPARAMS[args.task]["optimizer"] != "adam":
        p.error(f"--optimizer adam: {args.task} is not trained by Adam (use sgd)")
    n_train, n_test, m = SIZES.get(args.task, DIGITS_SIZES)
    args.n_train, args.n_test = args.n_train or n_train, args.n_test or n_test
    args.subsets = args.subsets or m
    return args


def _runner_args(args) -> argparse.Namespace:
    sgd = ["--sgd"] if args.optimizer == "sgd" else []
    return run.parse_args(["--task", args.task, *sgd, "--n-train", str(args.n_train),
                           "--n-test", str(args.n_test), "--subsets", str(args.subsets),
                           "--models", str(args.models), "--seed", str(args.seed),
                           "--repeats", "1", "--methods", "magic"])


def build_magic(task, init_seeds: Sequence[int], *, checkpoint_every: int | None = None,
                horizon: int | str | None = None):
    """Return ``(MAGIC method, initial params per run)`` replaying ``task.train`` from
    ``task.make_model(s)`` for each ``s`` in ``init_seeds`` (an ``"sgd"`` task: its order seed
    :func:`~dattri_fn.eval.tasks.order_seed`; an ``"adam"`` task: :func:`~dattri_fn.eval.tasks.
    task_step`, full batch). Classification targets are the correct-class margin (the task's);
    ``horizon`` as in :func:`~dattri_fn.attribute.magic`."""
    from dattri_fn.attribute.magic import magic
    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.eval.tasks import adam_run, order_seed, sgd_run, task_step
    from dattri_fn.model import functional_model

    hp = task.hparams
    models = [task.make_model(s) for s in init_seeds]
    fm = functional_model(models[0], task.loss_fn)
    opts = {"checkpoint_every": checkpoint_every, "horizon": horizon}
    if task.name != "text-lm":
        opts["target"] = functional_model(models[0], classification_margin_loss).loss
    if hp["optimizer"] == "sgd":
        optimizer, _ = sgd_run(task.n_train, seed=0, epochs=hp["epochs"], lr=hp["lr"],
                               weight_decay=hp["weight_decay"], batch_size=hp["batch_size"],
                               momentum=hp["momentum"])
        method = magic(fm, optimizer, epochs=hp["epochs"], batch_size=hp["batch_size"],
                       seed=[order_seed(s) for s in init_seeds], **opts)
    else:
        optimizer, _ = adam_run(task.n_train, epochs=hp["epochs"], lr=hp["lr"])
        method = magic(fm, optimizer, epochs=hp["epochs"],
                       step=task_step(fm, optimizer, hp["weight_decay"]), **opts)
    return method, [functional_model(m, task.loss_fn).params for m in models]


def magic_setup(spec: dict):
    """Build MAGIC over ``spec['seeds']`` (warmed up on a slice); return the timed step.

    The step returns times, ``scores`` (numpy) and ``replays_models``: whether every run's
    final parameters equal ``spec['states']`` (the trained models of the same seeds; None
    when not given).
    """
    import torch

    task = run.load_task(spec["task"])
    if spec.get("epochs"):
        from dataclasses import replace

        task = replace(task, hparams={**task.hparams, "epochs": spec["epochs"]})
    method, params = build_magic(task, spec["seeds"], checkpoint_every=spec.get("every"),
                                 horizon=spec.get("horizon"))
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    # A first call pages in library code, which would count as the step's memory.
    few = (data[0][:32], data[1][:32])
    method.score(params, method.prepare(params, few), few, (test[0][:2], test[1][:2]))

    def step():
        t0 = time.perf_counter()
        state = method.prepare(params, data)
        t1 = time.perf_counter()
        scores = method.score(params, state, data, test)
        t2 = time.perf_counter()
        same = None
        if spec.get("states") is not None:
            same = all(torch.equal(traj.params[k], torch.from_numpy(ref[k]))
                       for traj, ref in zip(state.runs, spec["states"], strict=True)
                       for k in traj.params)
        return {"prepare_s": t1 - t0, "score_s": t2 - t1, "T": len(state.orders[0]),
                "checkpoints": len(state.runs[0].checkpoints), "replays_models": same,
                "scores": scores.detach().double().numpy()}

    return step


def measure_magic(spec: dict, timeout: float | None) -> dict:
    """:func:`magic_setup` in a spawned process: the row's times, peak and scores, or an error."""
    import torch

    out = measure_peak(magic_setup, spec, timeout=timeout)
    if "result" not in out:
        return {"error": "TimeoutError" if out.get("timeout") else out.get("error", "?")}
    res = dict(out["result"])
    res["scores"] = torch.from_numpy(res["scores"])
    return {**res, "peak_mib": out["peak_mib"]}


def scan_setup(spec: dict):
    """Build MAGIC (one run, init seed 0) for ``spec['epochs']`` epochs; return the timed step."""
    step = magic_setup({"task": spec["task"], "seeds": [0], "epochs": spec["epochs"],
                        "every": spec["every"]})

    def timed():
        res = step()
        return {k: res[k] for k in ("prepare_s", "score_s", "T", "checkpoints")}

    return timed


def main(argv: Sequence[str] | None = None) -> dict:
    from dattri_fn.eval.metrics import lds
    from dattri_fn.eval.retrain import _model_seed, lds_ground_truth

    args = parse_args(argv)
    rargs = _runner_args(args)
    spec_task = run.task_spec(rargs)
    if args.epochs:
        spec_task["hparams"] = {**(spec_task["hparams"] or {}), "epochs": args.epochs}
    task = run.load_task(spec_task)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    say(f"{args.task} ({args.optimizer}): n_train={args.n_train} n_test={args.n_test} "
        f"m={args.subsets}")
    t0 = time.perf_counter()
    gts = {"std r=1": lds_ground_truth(task, args.subsets, cache_dir=args.cache_dir,
                                       seed=args.seed, progress=not args.quiet)}
    gts[f"std r={args.r}"] = lds_ground_truth(task, args.subsets, args.r, cache_dir=args.cache_dir,
                                              seed=args.seed, progress=not args.quiet)
    gts["fixed"] = lds_ground_truth(task, args.subsets, cache_dir=args.cache_dir, seed=args.seed,
                                    progress=not args.quiet, weighted=True)
    say(f"ground truths {time.perf_counter() - t0:.1f}s")
    states = run.train_states(task, args.models)
    rows = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        spec = {"task": spec_task, "states": states, "method": name, "side": "ours",
                "hp": run.hyper_parameters(rargs), "repeats": 1}
        row = {"method": name, **run.measure(spec, args.timeout or None)}
        say(f"  {name}: wall {row['wall_s']:.1f}s" + (f" ERROR {row['error']}" if "error" in row else ""))
        rows.append(row)
    gt_seed = _model_seed(args.seed, 0)
    magic_rows = [(name, seeds, refs, None) for name, seeds, refs in (
        ("magic", [0], states[:1]), ("magic-ens", list(range(args.models)), states),
        ("magic@gt", [gt_seed], None)) if name in args.magic_rows]
    magic_rows += [(f"magic K={h}", [0], states[:1], h) for h in args.horizons]
    magic_rows += [(f"magic-ens K={h}", list(range(args.models)), states, h)
                   for h in args.ens_horizons]
    for name, seeds, refs, horizon in magic_rows:
        t1 = time.perf_counter()
        row = {"method": name, **measure_magic({"task": spec_task, "seeds": seeds, "states": refs,
                                                "horizon": horizon}, args.timeout or None)}
        say(f"  {name}: wall {time.perf_counter() - t1:.1f}s, replays the trained models: "
            f"{row.get('replays_models')}" + (f" ERROR {row['error']}" if "error" in row else ""))
        rows.append(row)
    for row in rows:
        for label, gt in gts.items():
            if "scores" in row:
                res = lds(row["scores"].double(), gt.subsets, gt.targets.double())
                row[label] = (float(res.mean), float(res.ci95[0]), float(res.ci95[1]))
    trainer = ("SGD (SGD_HPARAMS)" if args.optimizer == "sgd" else
               f"full-batch Adam (the task's own trainer, {task.hparams['epochs']} epochs)")
    print(f"\n### {args.task} trained by {trainer}: n_train={args.n_train}, "
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
        per_epoch = (math.ceil(args.n_train / task.hparams["batch_size"])
                     if args.optimizer == "sgd" else 1)
        for epochs in (int(e) for e in args.scan.split(",")):
            T = epochs * per_epoch
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
