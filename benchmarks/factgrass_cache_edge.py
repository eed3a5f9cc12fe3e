"""FactGraSS's cache form by the size of the features: each edge, interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.factgrass_cache_edge --point n4000 --point p10000 \
        [--edge 262144 --edge 2097152] [--rounds 7] [--scores 5] [--dattri]

``factgrass._keep_bytes`` (the most bytes of train features cached as they are; above it each
block's stage-1 factors, re-formed into features at every score) is patched to each ``--edge``
in turn, in rotated order each round, on the points of :mod:`benchmarks.factgrass_ab` (``nN``,
``pP``, ``digits-lr``/``digits-mlp``) and on ``rN:D`` (review R2's cache-edge points: the
scaling probe's 64-32-10 MLP on ``synthetic_digits(N)``, 256-row batches, ``proj_dim=D``,
blowup 4). Printed per edge: the cache form, median main-thread CPU ms of ``prepare`` and of one
``score`` (the mean of ``--scores`` calls on the same state), the median per-round ratios to the
first edge, the exact tensor peak of one ``prepare + score`` (:func:`benchmarks.peak.tensor_peak`),
and the scores' largest difference relative to the first edge's largest score. ``--dattri`` adds
dattri 0.3.0's ``prepare + score`` (``nN``/``pP``), rotated with the edges: its time and peak.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


def _setup(point: str):
    """``(task, models, prepare, score)`` of FactGraSS (this tree) at ``point``."""
    import torch.nn.functional as F

    from benchmarks.against_dattri import FACTGRASS_BLOWUP, FACTGRASS_DIM
    from benchmarks.factgrass_ab import _ours, _point
    from dattri_fn.attribute.factgrass import factgrass
    from dattri_fn.model import functional_model

    if point.startswith("r"):
        from benchmarks.scaling import mlp, synthetic_digits

        n, d = (int(v) for v in point[1:].split(":"))
        task = synthetic_digits(n)
        fm = functional_model(mlp(32, 0).eval(), F.cross_entropy)
        train = [(task.x_train[i:i + 256], task.y_train[i:i + 256]) for i in range(0, n, 256)]
        test = (task.x_test[:32], task.y_test[:32])
        m = factgrass(fm, proj_dim=d, blowup=FACTGRASS_BLOWUP)
        return None, None, (lambda: m.prepare(fm.params, train)), (
            lambda st: m.score(fm.params, st, train, test))
    assert FACTGRASS_DIM
    task, models, rows = _point(point)
    import dattri_fn

    prep, score = _ours(dattri_fn, task, models, rows)
    return task, models, prep, score


def main(argv=None) -> None:
    from benchmarks.peak import tensor_peak

    p = argparse.ArgumentParser(prog="python -m benchmarks.factgrass_cache_edge",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--point", action="append", required=True)
    p.add_argument("--edge", action="append", help="BYTES or BYTES/SHARE (repeatable; SHARE: "
                   "factgrass._PASS_SHARE for that variant); default 262144 (70a9683) and "
                   "2097152 (before it)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--scores", type=int, default=5)
    p.add_argument("--dattri", action="store_true")
    args = p.parse_args(argv)
    edges = args.edge or [str(2**18), str(2**21)]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    fg = sys.modules.get("dattri_fn.attribute.factgrass") or __import__(
        "dattri_fn.attribute.factgrass", fromlist=["_keep_bytes"])
    real = fg._keep_bytes, fg._PASS_SHARE
    try:
        for point in args.point:
            _run(point, edges, args, fg, tensor_peak)
    finally:
        fg._keep_bytes, fg._PASS_SHARE = real


def _use(fg, edge: str, share: int) -> None:
    """Patch factgrass to the variant ``edge`` (``BYTES`` or ``BYTES/SHARE``)."""
    b, _, s = edge.partition("/")
    fg._keep_bytes = lambda b=int(b): b
    fg._PASS_SHARE = int(s) if s else share


def _run(point, edges, args, fg, tensor_peak) -> None:
    task, models, prep, score = _setup(point)
    names = list(edges)
    share = fg._PASS_SHARE
    res = {n: {"prep": [], "score": [], "whole": []} for n in names}
    for n, e in zip(names, edges, strict=True):
        _use(fg, e, share)
        st = prep()
        score(st)  # warm
        res[n]["form"] = "factors" if st.train_factors is not None else "features"
        res[n]["S"], res[n]["peak"] = tensor_peak(lambda: score(prep()))
    order = list(names)
    if args.dattri and task is not None:
        from benchmarks.scaling import runner

        theirs = runner("factgrass", task, models, cg_iters=20, side="dattri")
        theirs()
        res["dattri"] = {"whole": [], "peak": tensor_peak(theirs)[1]}
        order.append("dattri")
    gc.disable()
    try:
        for r in range(args.rounds):
            gc.collect()
            for n in order[r % len(order):] + order[:r % len(order)]:
                if n == "dattri":
                    t0 = time.thread_time()
                    theirs()
                    res[n]["whole"].append(1e3 * (time.thread_time() - t0))
                    continue
                _use(fg, n, share)
                t0 = time.thread_time()
                st = prep()
                t1 = time.thread_time()
                score(st)
                t2 = time.thread_time()
                for _ in range(args.scores - 1):
                    score(st)
                t3 = time.thread_time()
                res[n]["prep"].append(1e3 * (t1 - t0))
                res[n]["whole"].append(1e3 * (t2 - t0))
                res[n]["score"].append(1e3 * (t3 - t1) / args.scores)
    finally:
        gc.enable()
    print(f"factgrass cache edge at {point}: median main-thread CPU ms of {args.rounds} rounds "
          f"(load {os.getloadavg()[0]:.2f})")
    first = res[names[0]]
    med = statistics.median

    def ratio(n, k, ref):
        return med(a / b for a, b in zip(res[n][k], ref[k], strict=True))

    for n in names:
        v = res[n]
        rel = float((v["S"] - first["S"]).abs().max() / first["S"].abs().max())
        line = (f"  edge {n:>12s} {v['form']:8s} prepare {med(v['prep']):8.2f} "
                f"({ratio(n, 'prep', first):.2f})  score {med(v['score']):8.2f} "
                f"({ratio(n, 'score', first):.2f})  prepare+score {med(v['whole']):8.2f} "
                f"({ratio(n, 'whole', first):.2f})  peak {v['peak'] / 2**20:7.3f} MiB")
        if "dattri" in res:
            d = res["dattri"]
            line += (f" (/dattri time {ratio(n, 'whole', d):.3f}, peak "
                     f"{v['peak'] / d['peak']:.3f})")
        print(line + f"  scores rel {rel:.1e}")
    if "dattri" in res:
        print(f"  dattri   prepare+score {med(res['dattri']['whole']):8.2f} ms  peak "
              f"{res['dattri']['peak'] / 2**20:7.3f} MiB")


if __name__ == "__main__":
    main()
