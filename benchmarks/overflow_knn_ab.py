"""KNN-Shapley's finiteness scans (stop 25, engineer F): old vs new, interleaved in ONE process.

    OMP_NUM_THREADS=1 python -m benchmarks.overflow_knn_ab [--rev ffb89d9] [--rounds 15]

The old module is ``git show <rev>:dattri_fn/attribute/knn_shapley.py`` loaded beside the
current one (same package, so the same helpers). Each round runs ``prepare + score`` (and
``self_score``) of both, alternating which goes first; the main thread's CPU time is timed. Cases:
the digits-mlp recipe (``knn_shapley(k=5)`` on the raw inputs of the bundled task, as
``benchmarks.g_against --methods knn-shapley`` runs it), and a larger synthetic one (5,000 train
x 1,000 test, F = 64, euclidean and cosine) where the scans' share is the largest. Prints each
side's median and the median of the per-round new/old ratios; also checks the scores are equal.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _old_module(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:dattri_fn/attribute/knn_shapley.py"],
                         check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "knn_shapley_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("dattri_fn.attribute.knn_shapley_old", path,
                                                  submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _cpu(fn):
    t0 = time.thread_time()
    out = fn()
    return time.thread_time() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="ffb89d9")  # main before the scans
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    new = importlib.import_module("dattri_fn.attribute.knn_shapley")
    old = _old_module(args.rev)
    from benchmarks.run import task_and_models

    task, _ = task_and_models("digits-mlp", n_models=1)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(5000, 64, generator=g), torch.randint(0, 10, (5000,), generator=g)
    xt, yt = torch.randn(1000, 64, generator=g), torch.randint(0, 10, (1000,), generator=g)
    cases = [
        ("digits-mlp recipe, euclidean", dict(k=5), (task.x_train, task.y_train),
         (task.x_test, task.y_test)),
        ("5000 x 1000, F=64, euclidean", dict(k=5), (xs, ys), (xt, yt)),
        ("5000 x 1000, F=64, cosine", dict(k=5, metric="cosine"), (xs, ys), (xt, yt)),
    ]
    print(f"load: {os.getloadavg()}, threads {torch.get_num_threads()}, rev {args.rev}")
    for label, kw, train, test in cases:
        runs = {}
        for side, mod in (("old", old), ("new", new)):
            m = mod.knn_shapley(**kw)

            def run(m=m):
                st = m.prepare({}, train)
                return m.score({}, st, None, test), m.self_score({}, st, train)
            runs[side] = run
        a, b = runs["old"](), runs["new"]()  # warm-up, and the same values
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)), label
        times = {"old": [], "new": []}
        for r in range(args.rounds):
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                times[side].append(_cpu(runs[side])[0])
        ratios = [n / o for n, o in zip(times["new"], times["old"], strict=True)]
        print(f"{label}: old {statistics.median(times['old']) * 1e3:.1f} ms, new "
              f"{statistics.median(times['new']) * 1e3:.1f} ms (thread CPU, median of "
              f"{args.rounds}); median new/old ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
