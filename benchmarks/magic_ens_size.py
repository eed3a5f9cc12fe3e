"""MAGIC's seed-ensemble size: per-run scores of recipe("magic-ens"), the LDS of each prefix.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_ens_size --task text-lm --runs-dir <dir>
    OMP_NUM_THREADS=1 python -m benchmarks.magic_ens_size --task text-lm --gt val,std-r1,fixed
    OMP_NUM_THREADS=1 python -m benchmarks.magic_ens_size --task text-lm --lds <dir> \
        --gt val,std-r1,std-r3,fixed

``--runs-dir``: the method of ``recipe("magic-ens")`` (``magic_recipe(task, --runs)`` with the
recipe's chunk size) is prepared on the task's ``--runs`` runs in one call (thread CPU timed as a
whole: ``prepare_cpu_s``), then each run ``c`` is scored alone (its own trajectory and data order,
params of model ``c``; thread CPU ``score_cpu_s[c]``) and saved as ``<dir>/run<c>.pt``
``[n_train, n_test]``, with ``<dir>/times.json``. The mean of runs ``0..p-1`` (summed in run
order, then divided: the library's order of operations) is ``recipe("magic-ens")`` on models
``0..p-1`` exactly (tests/test_bench_magic_ens_size.py); its time is ``prepare_cpu_s * p / runs``
(the runs train the same number of steps) plus the sum of its runs' score times.

``--gt``: compute (and cache) the listed ground truths only: ``val`` (32 other half-subsets, seed
1: the VALIDATION ground truth every MAGIC choice was made on), ``std-r1`` / ``std-r3`` (the
evaluation subsets, 1 or 3 retraining seeds), ``fixed`` (weighted, the full run's randomness).

``--method if-cg-ens --save f.pt``: ``recipe(<method>)`` on the task's ``--runs`` trained models
(prepare + score, thread CPU), its scores saved for ``--compare``.

``--lds <dir>``: LDS [95% CI] of each prefix {0}, {0,1}, ... of ``<dir>/run<c>.pt`` against the
``--gt`` ground truths (computed if absent), with each prefix's CPU seconds from ``times.json``;
``--compare f.pt ...`` adds saved score files (another method's, or ``magic_speed --full
--save``) as rows.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

GTS = ("val", "std-r1", "std-r3", "fixed")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_ens_size",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="text-lm",
                   choices=("digits-lr", "digits-mlp", "digits-cnn", "text-lm"))
    p.add_argument("--runs", type=int, default=3, help="runs of magic-ens (models 0..runs-1)")
    p.add_argument("--runs-dir", default=None, help="score each run alone, save here")
    p.add_argument("--lds", default=None, help="folder of run<c>.pt: LDS of each prefix")
    p.add_argument("--compare", nargs="*", default=(), help="--lds: other score files as rows")
    p.add_argument("--method", default=None,
                   help="score recipe(<method>) on the task's --runs models, save to --save")
    p.add_argument("--save", default=None, help="--method: the score file")
    p.add_argument("--gt", default="val,std-r1,std-r3,fixed",
                   help="ground truths (comma-separated of " + ", ".join(GTS) + ")")
    p.add_argument("--n-train", type=int, default=None, help="default 500 (text-lm 128)")
    p.add_argument("--n-test", type=int, default=None, help="default 50 (text-lm 16)")
    p.add_argument("--m", type=int, default=None, help="evaluation subsets (default 64; text-lm 32)")
    p.add_argument("--val-subsets", type=int, default=32)
    p.add_argument("--cache-dir", default=None, help="default $DATTRI_FN_CACHE or ./.cache/dattri_fn")
    args = p.parse_args(argv)
    lm = args.task == "text-lm"
    args.n_train = args.n_train or (128 if lm else 500)
    args.n_test = args.n_test or (16 if lm else 50)
    args.m = args.m or (32 if lm else 64)
    args.gt = [g for g in args.gt.split(",") if g]
    bad = [g for g in args.gt if g not in GTS]
    if bad:
        p.error(f"--gt: unknown {bad}; expected some of {GTS}")
    return args


def load_task(args):
    from dattri_fn.eval.tasks import SGD_HPARAMS, get_task

    hparams = None if args.task == "text-lm" else dict(SGD_HPARAMS)
    return get_task(args.task, n_train=args.n_train, n_test=args.n_test, seed=0, hparams=hparams)


def load_avg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def prefix_mean(runs: Sequence[Tensor], p: int) -> Tensor:
    """Mean of the first ``p`` per-run scores, in the library's order (sum in run order, /p)."""
    total = None
    for s in runs[:p]:
        total = s if total is None else total + s
    return total / p


def score_runs(args) -> dict:
    """Prepare magic-ens's runs together, score each run alone; save run<c>.pt and times.json."""
    from dattri_fn.app.recipes import MAGIC_CHUNKS, magic_recipe
    from dattri_fn.attribute.magic import MagicState

    out = Path(args.runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(args)
    method, params = magic_recipe(task, args.runs, chunk_size=MAGIC_CHUNKS.get(task.name))
    data = (task.x_train, task.y_train)
    test = (task.x_test, task.y_test)
    few = (data[0][:32], data[1][:32])
    method.score(params, method.prepare(params, few), few, (test[0][:2], test[1][:2]))
    times = {"task": args.task, "runs": args.runs, "load_start": load_avg()}
    c0 = time.thread_time()
    state = method.prepare(params, data)
    times["prepare_cpu_s"] = time.thread_time() - c0
    times["score_cpu_s"], times["load_after_run"] = [], []
    for c in range(args.runs):
        one = MagicState((state.runs[c],), (state.orders[c],))
        c0, w0 = time.thread_time(), time.perf_counter()
        s = method.score([params[c]], one, data, test)
        cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
        torch.save(s, out / f"run{c}.pt")
        times["score_cpu_s"].append(cpu)
        times["load_after_run"].append(load_avg())
        print(json.dumps({"task": args.task, "run": c, "score_cpu_s": round(cpu, 2),
                          "wall_s": round(wall, 1), "load": load_avg()}), flush=True)
    (out / "times.json").write_text(json.dumps(times, indent=1))
    print(json.dumps({"task": args.task, "prepare_cpu_s": round(times["prepare_cpu_s"], 2),
                      "runs": args.runs}), flush=True)
    return times


def method_scores(args) -> dict:
    """recipe(args.method) on models 0..runs-1: prepare + score thread CPU; save the scores."""
    from dattri_fn.app.recipes import recipe
    from dattri_fn.eval.tasks import train_model

    task = load_task(args)
    models = [train_model(task, seed=c) for c in range(args.runs)]
    rec = recipe(args.method, task, models)
    c0, w0 = time.thread_time(), time.perf_counter()
    state = rec.method.prepare(rec.params, rec.train)
    scores = rec.method.score(rec.params, state, rec.train, rec.test)
    row = {"task": args.task, "method": args.method, "cpu_s": round(time.thread_time() - c0, 2),
           "wall_s": round(time.perf_counter() - w0, 1), "load": load_avg()}
    torch.save(scores, args.save)
    print(json.dumps(row), flush=True)
    return row


def ground_truths(args, task=None) -> dict:
    from dattri_fn.eval.retrain import lds_ground_truth

    task = task or load_task(args)
    o = {"cache_dir": args.cache_dir, "progress": False}
    make = {"val": lambda: lds_ground_truth(task, args.val_subsets, seed=1, **o),
            "std-r1": lambda: lds_ground_truth(task, args.m, seed=0, **o),
            "std-r3": lambda: lds_ground_truth(task, args.m, 3, seed=0, **o),
            "fixed": lambda: lds_ground_truth(task, args.m, seed=0, weighted=True, **o)}
    out = {}
    for g in args.gt:
        c0 = time.thread_time()
        out[g] = make[g]()
        print(json.dumps({"task": args.task, "gt": g, "cpu_s": round(time.thread_time() - c0, 1),
                          "load": load_avg()}), flush=True)
    return out


def lds_rows(args) -> list[dict]:
    from dattri_fn.eval.metrics import lds

    gts = ground_truths(args)
    folder = Path(args.lds)
    times = json.loads((folder / "times.json").read_text())
    runs = [torch.load(folder / f"run{c}.pt") for c in range(times["runs"])]
    rows = [(f"magic-ens {{{','.join(map(str, range(p)))}}}", prefix_mean(runs, p),
             times["prepare_cpu_s"] * p / times["runs"] + sum(times["score_cpu_s"][:p]))
            for p in range(1, len(runs) + 1)]
    rows += [(f, torch.load(f), None) for f in args.compare]
    print(f"\n### {args.task}: LDS [95% CI] of magic-ens prefixes ({', '.join(args.gt)})\n")
    print("| scores | " + " | ".join(args.gt) + " | CPU s |")
    print("|---" * (len(args.gt) + 2) + "|")
    out = []
    for label, scores, cpu in rows:
        res = {}
        for g, gt in gts.items():
            r = lds(scores.double(), gt.subsets, gt.targets.double())
            res[g] = (float(r.mean), float(r.ci95[0]), float(r.ci95[1]))
        cells = " | ".join(f"{m:.4f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in res.values())
        print(f"| {label} | {cells} | {'' if cpu is None else f'{cpu:.1f}'} |", flush=True)
        out.append({"label": label, "lds": res, "cpu_s": cpu})
    return out


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.runs_dir:
        return score_runs(args)
    if args.method:
        return method_scores(args)
    if args.lds:
        return lds_rows(args)
    return ground_truths(args)


if __name__ == "__main__":
    main()
