"""recipe("magic-ens")'s per-task settings: where a run's time goes, which early exit and how many runs.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_config --task text-lm --record D
    OMP_NUM_THREADS=1 python -m benchmarks.magic_config --task text-lm --grid D [--gt val]
    OMP_NUM_THREADS=1 python -m benchmarks.magic_config --task text-lm --ab 2:1.2:8,2:1.2:1 \
        --rounds 2 --save D

``--record D``: ``magic_recipe(task, --runs)`` prepared on the task's runs, then each run scored
through the recipe's own pieces (its step, ``vjp_step``, target, chunk size, the scaled test
cotangents: ``magic.metagradient`` is replaced in this process by a recorder that receives them)
by ONE full reverse pass with the library's ``_sweep`` and ``_row_norms``, timed by part (thread
CPU per step: ``_split``/batch, the ``vjp`` call = the step's forward with its graph, the vmapped
pullback, the norms), and saved as ``D/<task>-run<c>.pt`` = ``(W [T, k, n], norms [T, k])``
(``W[K-1]``: the weight cotangents through the last ``K`` steps, ``norms[K-1, j] =
|thetabar^j_{T-K}|``, the library's params-cotangent norms) with ``D/<task>-parts.json``
(``--only c``: run ``c`` alone, e.g. a seed outside the recipe's runs for an out-of-sample check).

``--grid D``: for each early-exit rule ``R:W`` of ``--rules`` and each ensemble size ``1..runs``,
the share of target-steps walked (the library's cost driver, ``sum_j S_j / (k T)``, from
``benchmarks.magic_exit.stops``), the number of targets whose band changes (a norm beyond the stop
within 1.1x of the walked minimum: where none changes the scores are the full pass's), the
closest such return (the rule's margin: a band changes at <= 1.1), and with
``--gt`` the LDS of the band over the walked horizons (the ensemble of the first ``p`` runs)
against those ground truths (``val``: the VALIDATION one, 32 other half-subsets, seed 1, on
which any choice is made; ``std-r1``, ``std-r3``, ``fixed``: the evaluation ones).

``--ab p:R:W,...``: ``magic_recipe(task, p, early_exit=(R, W))`` (``R`` = ``none``: no early
exit) prepare + score, thread CPU, the configurations alternated within each of ``--rounds``
rounds (the order reversed every other round); prints each time, the medians, and whether the
scores of configurations with the same ``p`` are ``torch.equal``; ``--save D`` keeps the first
round's scores as ``D/<task>-ab-<config>.pt``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_config",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="text-lm",
                   choices=("digits-lr", "digits-mlp", "digits-cnn", "text-lm"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--record", default=None, help="folder: record each run's (W, norms) here")
    p.add_argument("--only", type=int, default=None,
                   help="--record: record run c only (init/order seed c; --runs >= c + 1)")
    p.add_argument("--grid", default=None, help="folder of --record: score the rules")
    p.add_argument("--rules", default="1.1:1,1.1:2,1.1:4,1.15:1,1.15:2,1.2:1,1.2:2,1.2:4,1.2:8,"
                                      "1.5:1,1.5:4,2:1")
    p.add_argument("--gt", default="", help="--grid: ground truths (val,std-r1,std-r3,fixed)")
    p.add_argument("--ab", default=None, help="configurations p:R:W (R = none: no early exit)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--save", default=None, help="--ab: folder for the first round's scores")
    p.add_argument("--cache-dir", default=".cache/dattri_fn")
    args = p.parse_args(argv)
    lm = args.task == "text-lm"
    args.n_train, args.n_test, args.m = (128, 16, 32) if lm else (500, 50, 64)
    args.gt = [g for g in args.gt.split(",") if g]
    return args


def load_task(args):
    from dattri_fn.eval.tasks import SGD_HPARAMS, get_task

    hparams = None if args.task == "text-lm" else dict(SGD_HPARAMS)
    return get_task(args.task, n_train=args.n_train, n_test=args.n_test, seed=0, hparams=hparams)


def load_avg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def timed_pass(step, traj, data, order, cot, chunk_size, vjp_step) -> tuple[Tensor, Tensor, dict]:
    """One full reverse pass in the library's order of operations (``metagradient._sweep``'s
    body with every state kept, timed by part); return ``W [T, k, n]``, ``norms [T, k]`` and
    the thread CPU seconds of each part summed over the steps."""
    from torch.func import vjp, vmap
    from torch.utils._pytree import tree_map

    from dattri_fn.attribute.metagradient import _join, _row_norms, _split
    from dattri_fn.training.run import take

    T = len(order)
    marks = sorted(traj.checkpoints)
    if marks != list(range(T + 1)):
        raise ValueError("timed_pass: expected every state kept (the recipes' default here)")
    final_params, final_opt = traj.checkpoints[T]
    dtype = next(iter(final_params.values())).dtype
    n = 1 + max(int(r.max()) for r in order)
    weights = torch.ones(n, dtype=dtype)
    k = next(iter(cot.values())).shape[0]
    zeros = tree_map(lambda x: x.new_zeros((k, *x.shape))
                     if isinstance(x, Tensor) and x.is_floating_point() else x, final_opt)
    bar, _ = _split(({name: cot[name] for name in final_params}, zeros))
    w_bar = torch.zeros(k, n, dtype=dtype)
    W, norms = torch.empty(T, k, n, dtype=dtype), torch.empty(T, k, dtype=dtype)
    parts = {"split_take": 0.0, "vjp_forward": 0.0, "pullback": 0.0, "accumulate_norms": 0.0}
    clock = time.thread_time
    for t in range(T - 1, -1, -1):
        c0 = clock()
        floats, how = _split(traj.checkpoints[t])
        rows = order[t]
        batch = take(data, rows)

        def one_step(floats_t, w_rows, how=how, batch=batch):
            params, opt_state = _join(floats_t, how)
            return _split(vjp_step(params, opt_state, batch, w_rows))[0]

        c1 = clock()
        _, pullback = vjp(one_step, floats, weights[rows])
        c2 = clock()
        bar, rows_bar = vmap(pullback, chunk_size=chunk_size)(bar)
        c3 = clock()
        w_bar.index_add_(1, rows, rows_bar)
        W[T - t - 1] = w_bar
        norms[T - t - 1] = _row_norms(bar[:len(final_params)], k)
        c4 = clock()
        for key, v in zip(parts, (c1 - c0, c2 - c1, c3 - c2, c4 - c3), strict=True):
            parts[key] += v
    return W, norms, parts


def record(args) -> dict:
    import importlib

    from dattri_fn.app.recipes import MAGIC_CHUNKS, magic_recipe
    from dattri_fn.attribute.magic import MagicState, MetaGradient

    # The module (dattri_fn.attribute re-exports the function magic under its name).
    mod = importlib.import_module("dattri_fn.attribute.magic")
    out = Path(args.record)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(args)
    method, params = magic_recipe(task, args.runs, chunk_size=MAGIC_CHUNKS.get(task.name))
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    c0 = time.thread_time()
    state = method.prepare(params, data)
    info = {"task": args.task, "runs": args.runs, "prepare_cpu_s": time.thread_time() - c0,
            "load_start": load_avg(), "per_run": []}
    real = mod.metagradient
    for c in range(args.runs) if args.only is None else [args.only]:
        got = {}

        def recorder(step, traj, data_, order, cot, *, chunk_size=None, vjp_step=None, **kw):
            W, norms, parts = timed_pass(step, traj, data_, order, cot, chunk_size,
                                         vjp_step or step)
            got.update(W=W, norms=norms, parts=parts, k=norms.shape[1], T=norms.shape[0])
            k = norms.shape[1]
            return MetaGradient(W[-1], {n: v[:0] for n, v in traj.params.items()},
                                torch.full((k,), len(order)), torch.full((k,), len(order)))

        mod.metagradient = recorder
        try:
            c1 = time.thread_time()
            method.score([params[c]], MagicState((state.runs[c],), (state.orders[c],)), data,
                         test)
            cpu = time.thread_time() - c1
        finally:
            mod.metagradient = real
        torch.save((got["W"], got["norms"]), out / f"{args.task}-run{c}.pt")
        row = {"run": c, "score_cpu_s": cpu, "T": got["T"], "k": got["k"],
               **{f"{key}_s": v for key, v in got["parts"].items()},
               "ms_per_step": {key: 1e3 * v / got["T"] for key, v in got["parts"].items()},
               "load": load_avg()}
        info["per_run"].append(row)
        print(json.dumps(row, default=lambda v: round(v, 3)), flush=True)
    (out / f"{args.task}-parts.json").write_text(json.dumps(info, indent=1))
    return info


def ground_truths(args, names) -> dict:
    from dattri_fn.eval.retrain import lds_ground_truth

    task = load_task(args)
    o = {"cache_dir": args.cache_dir, "progress": False}
    make = {"val": lambda: lds_ground_truth(task, 32, seed=1, **o),
            "std-r1": lambda: lds_ground_truth(task, args.m, seed=0, **o),
            "std-r3": lambda: lds_ground_truth(task, args.m, 3, seed=0, **o),
            "fixed": lambda: lds_ground_truth(task, args.m, seed=0, weighted=True, **o)}
    out = {}
    for g in names:
        c0 = time.thread_time()
        out[g] = make[g]()
        print(json.dumps({"gt": g, "cpu_s": round(time.thread_time() - c0, 1),
                          "load": load_avg()}), flush=True)
    return out


def closest_return(norms: Tensor, stop: Tensor) -> float:
    """The smallest ``norms[K-1, j] / min_{K' <= S_j} norms[K'-1, j]`` over ``K > S_j`` and all
    targets (inf when every target walks the whole run): a band changes where this is <= 1.1,
    so it is the rule's margin on these runs.  # [T, k], [k] -> float"""
    out = float("inf")
    for j in range(norms.shape[1]):
        s = int(stop[j])
        if s < norms.shape[0]:
            out = min(out, float(norms[s:, j].min() / norms[:s, j].min()))
    return out


def grid(args) -> list[dict]:
    from benchmarks.magic_exit import stops, walked_band
    from dattri_fn.eval.metrics import lds

    recs = [torch.load(Path(args.grid) / f"{args.task}-run{c}.pt") for c in range(args.runs)]
    gts = ground_truths(args, args.gt) if args.gt else {}
    T = recs[0][1].shape[0]
    rules = [(None, None)] + [(float(a), int(b)) for a, b in
                              (r.split(":") for r in args.rules.split(",") if r)]
    print(f"\n### {args.task}: early exit x runs (T = {T}); walked / T, bands changed, LDS "
          f"({', '.join(args.gt) or 'no ground truth'}) of the band over the walked horizons\n")
    print("| R, W | runs | walked / T | bands changed | closest return | " + " | ".join(args.gt)
          + " |")
    print("|---|---|---|---|---|" + "---|" * len(args.gt))
    rows = []
    for ratio, patience in rules:
        bands, shares, changed, close = [], [], [], []
        for W, norms in recs:
            s = torch.full((norms.shape[1],), T) if ratio is None else stops(norms, ratio, patience)
            b, c = walked_band(W, norms, s)
            bands.append(b)
            shares.append(float(s.double().mean()) / T)
            changed.append(c)
            close.append(closest_return(norms, s))
        for p in range(1, len(recs) + 1):
            ens = torch.stack(bands[:p]).mean(0).T  # [n, k]
            res = {g: lds(ens.double(), gt.subsets, gt.targets.double()) for g, gt in gts.items()}
            label = "full" if ratio is None else f"{ratio:g}, {patience}"
            cells = " | ".join(f"{float(r.mean):.4f} [{float(r.ci95[0]):.3f}, "
                               f"{float(r.ci95[1]):.3f}]" for r in res.values())
            share = sum(shares[:p]) / p
            near = min(close[:p])
            print(f"| {label} | {p} | {share:.3f} | {sum(changed[:p])} | {near:.3f} | {cells} |",
                  flush=True)
            rows.append({"rule": (ratio, patience), "runs": p, "share": share,
                         "changed": sum(changed[:p]), "closest": near,
                         "lds": {g: float(r.mean) for g, r in res.items()}})
    return rows


def ab(args) -> dict:
    from dattri_fn.app.recipes import MAGIC_CHUNKS, magic_recipe

    task = load_task(args)
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    configs = []
    for c in args.ab.split(","):
        p, ratio, patience = c.split(":")
        exit_ = None if ratio == "none" else (float(ratio), int(patience))
        configs.append((c, int(p), exit_))
    methods = {}
    for label, p, exit_ in configs:
        method, params = magic_recipe(task, p, chunk_size=MAGIC_CHUNKS.get(task.name),
                                      early_exit=exit_)
        few = (data[0][:32], data[1][:32])
        method.score(params, method.prepare(params, few), few, (test[0][:2], test[1][:2]))
        methods[label] = (method, params)
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    scores: dict[str, Tensor] = {}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for label, _, _ in order:
            method, params = methods[label]
            c0 = time.thread_time()
            s = method.score(params, method.prepare(params, data), data, test)
            cpu = time.thread_time() - c0
            times[label].append(cpu)
            if label not in scores and args.save:  # saved at once: a long A/B may be cut short
                Path(args.save).mkdir(parents=True, exist_ok=True)
                torch.save(s, Path(args.save) / f"{args.task}-ab-{label.replace(':', '_')}.pt")
            scores.setdefault(label, s)
            print(json.dumps({"task": args.task, "round": r, "config": label,
                              "cpu_s": round(cpu, 2), "load": load_avg()}), flush=True)
    print(f"\n### {args.task}: recipe('magic-ens') configurations, thread CPU s of prepare + "
          f"score, {args.rounds} alternated rounds, load now {load_avg()}\n")
    print("| runs:R:W | CPU s each round | median |")
    print("|---|---|---|")
    for label, v in times.items():
        print(f"| {label} | {', '.join(f'{x:.1f}' for x in v)} | {statistics.median(v):.1f} |")
    for i, (a, pa, _) in enumerate(configs):
        for b, pb, _ in configs[i + 1:]:
            if pa == pb:
                d = float((scores[a] - scores[b]).abs().max() / scores[a].abs().max())
                print(f"{a} vs {b}: torch.equal {torch.equal(scores[a], scores[b])}, "
                      f"max |diff| / max {d:.3g}")
    return {"times": times}


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.record:
        return record(args)
    if args.grid:
        return grid(args)
    if args.ab:
        return ab(args)
    return ground_truths(args, args.gt)


if __name__ == "__main__":
    main()
