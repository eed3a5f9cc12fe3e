"""SOURCE's prepare with the stop-26 finiteness check of each segment (issue 20) against the code
before it (HEAD's source.py loaded from a file given on the command line), interleaved in one
process: thread CPU time per prepare, alternating order, median of per-round ratios; the
prepared states compared with torch.equal.

    OMP_NUM_THREADS=1 python -m benchmarks.source_check_ab --old /tmp/source_old.py [--rounds 15]

(``git show <rev>:dattri_fn/attribute/source.py > /tmp/source_old.py`` gives the old file.)
A float32 ReLU MLP (``--width``), SGD run recorded with a checkpoint every 2 steps, ``L = 3``
segments, curvature ``gn`` and ``ekfac``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.source import source
from dattri_fn.model import functional_model
from dattri_fn.training import (
    batch_order,
    finish_record,
    make_step,
    record_step,
    sgd,
    start_record,
    take,
)


def _old_source(path: str):
    spec = importlib.util.spec_from_file_location("dattri_fn.attribute._source_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.source


def _problem(width: int, n: int):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
    opt = sgd(0.1)
    step = make_step(fm, opt)
    params, state = fm.params, opt.init(fm.params)
    rec = start_record("sgd", checkpoint_every=2)
    for rows in batch_order(n, batch_size=64, epochs=2, seed=0):
        batch = take((x, y), rows)
        rec = record_step(rec, rows, lr=0.1, params=params, opt_state=state, batch=batch)
        params, state = step(params, state, batch, torch.ones(len(rows)))
    rec = finish_record(rec, params=params, opt_state=state)
    return fm, rec, [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args()
    old_source = _old_source(args.old)
    fm, rec, train = _problem(args.width, args.n)
    P = sum(v.numel() for v in fm.params.values())
    for curvature in ("gn", "ekfac"):
        new = source(fm, segments=3, curvature=curvature)
        old = old_source(fm, segments=3, curvature=curvature)
        same = _equal(tuple(new.prepare(rec, train)), tuple(old.prepare(rec, train)))
        t = {"new": [], "old": []}
        for r in range(args.rounds):
            for side in (("new", "old") if r % 2 == 0 else ("old", "new")):
                m = new if side == "new" else old
                c0 = time.thread_time()
                m.prepare(rec, train)
                t[side].append(time.thread_time() - c0)
        ratio = statistics.median(a / b for a, b in zip(t["new"], t["old"], strict=True))
        print(f"{curvature}: P={P} n={args.n} checkpoints={len(rec.checkpoints)} "
              f"rounds={args.rounds} old {1e3 * statistics.median(t['old']):.1f} ms, "
              f"new {1e3 * statistics.median(t['new']):.1f} ms, new/old {ratio:.3f}, "
              f"states equal: {same}", flush=True)


if __name__ == "__main__":
    main()
