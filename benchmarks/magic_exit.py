"""MAGIC's early exit (``metagradient(early_exit=(R, W))``): the rule chosen on a validation LDS.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_rules --task <t> --records <dir>   # once per task
    OMP_NUM_THREADS=1 python -m benchmarks.magic_exit --records <dir> --tasks digits-cnn,text-lm
    OMP_NUM_THREADS=1 python -m benchmarks.magic_exit --task digits-cnn --lds a.pt b.pt

Grid mode: for each task, the 3 runs recorded by :mod:`benchmarks.magic_rules` (``W [T, k, n]``,
the weight cotangents through the last ``K`` steps, and ``norms [T, k]``, each target's
params-cotangent norm) give, for each ``(R, W)`` of ``--grid``, where every target would stop
(the first ``K`` after which its norm stayed above ``R`` times its running minimum for ``W``
steps), the share of target-steps walked (``walked / T``, mean over targets and runs), how many
targets' band changed (a later norm came back within 1.1x of the walked minimum), and the band's
LDS over the walked horizons only (run 0 and the 3-run mean) against the VALIDATION ground truth
(``--val-subsets`` half-subsets of ``--val-seed``) and the evaluation ones (std r=1, std r=3,
fixed). A rule to adopt is chosen on the ``val`` column; ``None`` is the full pass.

``--lds``: the LDS [95% CI] of saved score files ``[n_train, n_test]`` (``benchmarks.magic_speed
--full --save``) against the same four ground truths, and the largest difference between them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

SIZES = {"text-lm": (128, 16, 32)}
DIGITS_SIZES = (500, 50, 64)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_exit",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits-mlp,digits-cnn,text-lm")
    p.add_argument("--task", default=None, help="--lds: the task the scores are for")
    p.add_argument("--records", default=None, help="folder of benchmarks.magic_rules --records")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--grid", default="1.2:1,1.2:2,1.2:4,1.2:8,1.5:1,1.5:2,1.5:4,1.5:8,2:1,2:2,2:4,2:8",
                   help="R:W pairs")
    p.add_argument("--lds", nargs="*", default=None, help="saved score files to score")
    p.add_argument("--val-seed", type=int, default=1)
    p.add_argument("--val-subsets", type=int, default=32)
    p.add_argument("--cache-dir", default=".cache/dattri_fn")
    return p.parse_args(argv)


def stops(norms: Tensor, ratio: float, patience: int) -> Tensor:
    """S_j: the K at which target j's norm has stayed above ratio x its running minimum for
    `patience` steps (T when never), as metagradient(early_exit=...) walks it.  # [T, k] -> [k]"""
    T, k = norms.shape
    above = norms > ratio * torch.cummin(norms, 0).values
    run = torch.zeros(k, dtype=torch.long)
    out = torch.full((k,), T)
    done = torch.zeros(k, dtype=torch.bool)
    for K in range(T - 1):  # the last step ends the pass anyway
        run = torch.where(above[K], run + 1, 0)
        hit = (run >= patience) & ~done
        out[hit] = K + 1
        done |= hit
    return out


def walked_band(W: Tensor, norms: Tensor, stop: Tensor) -> tuple[Tensor, int]:
    """The band mean over each target's walked horizons 1..S_j and the number of targets whose
    band differs from the full pass's (a norm beyond S_j within 1.1x of the walked minimum).
    # [T, k, n], [T, k], [k] -> [k, n], int"""
    T, k, n = W.shape
    out = torch.empty(k, n, dtype=W.dtype)
    changed = 0
    for j in range(k):
        s = int(stop[j])
        col = norms[:s, j]
        low = col.min()
        K = torch.arange(1, s + 1)
        band = (col <= 1.1 * low) & (2 * K >= int(col.argmin()) + 1)
        out[j] = W[:s, j][band].mean(0)
        changed += int(bool((norms[s:, j] <= 1.1 * low).any()))
    return out, changed


def ground_truths(task_name: str, args) -> dict:
    from dattri_fn.eval.retrain import lds_ground_truth
    from dattri_fn.eval.tasks import SGD_HPARAMS, get_task

    n_train, n_test, m = SIZES.get(task_name, DIGITS_SIZES)
    task = get_task(task_name, n_train=n_train, n_test=n_test, seed=0,
                    hparams=None if task_name == "text-lm" else dict(SGD_HPARAMS))
    o = {"cache_dir": args.cache_dir, "progress": False}
    return {"val": lds_ground_truth(task, args.val_subsets, seed=args.val_seed, **o),
            "std r=1": lds_ground_truth(task, m, seed=0, **o),
            "std r=3": lds_ground_truth(task, m, 3, seed=0, **o),
            "fixed": lds_ground_truth(task, m, seed=0, weighted=True, **o)}


def score_all(scores: Tensor, gts: dict) -> dict:
    """{label: (mean, lo, hi)} of scores [n_train, n_test] against each ground truth."""
    from dattri_fn.eval.metrics import lds

    out = {}
    for label, gt in gts.items():
        r = lds(scores.double(), gt.subsets, gt.targets.double())
        out[label] = (float(r.mean), float(r.ci95[0]), float(r.ci95[1]))
    return out


def grid(args) -> list[dict]:
    rules = [(None, None)] + [(float(a), int(b)) for a, b in
                              (pair.split(":") for pair in args.grid.split(",") if pair)]
    rows = []
    for task_name in args.tasks.split(","):
        gts = ground_truths(task_name, args)
        recs = [torch.load(Path(args.records) / f"{task_name}-run{s}.pt") for s in range(args.runs)]
        T = recs[0][1].shape[0]
        print(f"\n### {task_name}: early-exit rules on {args.runs} recorded runs (T = {T}); LDS of "
              "the band over the walked horizons: val, std r=1 / std r=3 / fixed\n")
        print("| R, W | walked / T | bands changed | run 0: val, std r=1 / r=3 / fixed | "
              f"ens {args.runs}: val, std r=1 / r=3 / fixed |")
        print("|---|---|---|---|---|")
        for ratio, patience in rules:
            outs, share, changed = [], 0.0, 0
            for W, norms in recs:
                s = torch.full((norms.shape[1],), T) if ratio is None else stops(norms, ratio, patience)
                band, c = walked_band(W, norms, s)
                outs.append(band)
                share += float(s.double().mean()) / T / len(recs)
                changed += c
            res0 = score_all(outs[0].T, gts)
            ens = score_all(torch.stack(outs).mean(0).T, gts)
            fmt = lambda r: (f"{r['val'][0]:.4f}, {r['std r=1'][0]:.4f} / {r['std r=3'][0]:.4f} / "
                             f"{r['fixed'][0]:.4f}")
            label = "None (full)" if ratio is None else f"{ratio:g}, {patience}"
            print(f"| {label} | {share:.3f} | {changed} | {fmt(res0)} | {fmt(ens)} |", flush=True)
            rows.append({"task": task_name, "rule": (ratio, patience), "share": share,
                         "changed": changed, "run0": res0, "ens": ens})
    return rows


def score_files(args) -> dict:
    gts = ground_truths(args.task, args)
    scores = [torch.load(f) for f in args.lds]
    out = {}
    for f, s in zip(args.lds, scores, strict=True):
        out[f] = score_all(s, gts)
        print(f"{f}: " + " | ".join(f"{lb} {m:.4f} [{lo:.3f}, {hi:.3f}]"
                                    for lb, (m, lo, hi) in out[f].items()))
    for f, s in zip(args.lds[1:], scores[1:], strict=True):
        d = float((s - scores[0]).abs().max() / scores[0].abs().max())
        print(f"{f} vs {args.lds[0]}: torch.equal {torch.equal(s, scores[0])}, "
              f"max |diff| / max |first| {d:.3g}")
    return out


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    return score_files(args) if args.lds else grid(args)


if __name__ == "__main__":
    main()
