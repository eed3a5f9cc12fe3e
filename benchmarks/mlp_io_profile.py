"""Thread CPU of one ``mlp_io`` pass on the digits-mlp shape (500 x 64 -> 32 tanh -> 10, float32):
the whole call, its gate alone (everything before the first kernel) and the kernels alone, and
optionally the same for other trees' ``mlp_io`` interleaved (A/B, one process).

    OMP_NUM_THREADS=1 python -m benchmarks.mlp_io_profile [--tree base=/tmp/base] [--rounds 2000]
        [--ops]

Each tree's ``dattri_fn.transforms.mlp_io`` is loaded from its own directory. Per round the
trees run in a seeded random order, each ``--inner`` calls; printed: the median per-call thread
CPU microseconds per tree, and each tree's median per-round ratio to the first. ``--ops`` prints
torch.profiler's op table of this tree's call (op counts; its times are wall-clock). The gate's
cost is measured on a call that declines at its last check (labels of another dtype), which
runs every check before the kernels. Values: every tree's ``(a, g)`` must equal the first's
(``torch.equal``; printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def _load(name: str, tree: str):
    if tree == ".":
        return importlib.import_module("dattri_fn.transforms.mlp_io")
    sys.path.insert(0, tree)
    for k in [k for k in sys.modules if k == "dattri_fn" or k.startswith("dattri_fn.")]:
        sys.modules[f"_c2_saved_{k}"] = sys.modules.pop(k)
    try:
        mod = importlib.import_module("dattri_fn.transforms.mlp_io")
        for k in [k for k in sys.modules if k == "dattri_fn" or k.startswith("dattri_fn.")]:
            sys.modules[f"_c2_{name}_{k}"] = sys.modules.pop(k)
    finally:
        sys.path.remove(tree)
        for k in [k for k in sys.modules if k.startswith("_c2_saved_")]:
            sys.modules[k[len("_c2_saved_"):]] = sys.modules.pop(k)
    return mod


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mlp_io_profile")
    p.add_argument("--tree", action="append", default=[], help="NAME=DIR (repeatable)")
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--ops", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    state = {k: v.detach() for k, v in net.state_dict().items()}
    x, y = torch.randn(500, 64), torch.randint(0, 10, (500,))
    layers = ("0", "2")
    trees = [("now", ".")] + [tuple(t.split("=", 1)) for t in args.tree]
    mods = {n: _load(n, t) for n, t in trees}
    ref = mods["now"].mlp_io(net, F.cross_entropy, state, (x,), {}, y, layers)
    for n, m in mods.items():
        out = m.mlp_io(net, F.cross_entropy, state, (x,), {}, y, layers)
        same = all(torch.equal(out[k][i], ref[k][i]) for k in layers for i in (0, 1))
        print(f"{n}: values torch.equal to now's: {same}")
    y32 = y.int()
    calls = {}
    for n, m in mods.items():
        calls[(n, "call")] = lambda m=m: m.mlp_io(net, F.cross_entropy, state, (x,), {}, y, layers)
        calls[(n, "gate")] = lambda m=m: m.mlp_io(net, F.cross_entropy, state, (x,), {}, y32,
                                                  layers)
    times = {k: [] for k in calls}
    rng = random.Random(0)
    keys = list(calls)
    for _ in range(args.rounds):
        rng.shuffle(keys)
        for k in keys:
            fn = calls[k]
            t0 = time.thread_time_ns()
            for _ in range(args.inner):
                fn()
            times[k].append((time.thread_time_ns() - t0) / args.inner / 1e3)
    first = trees[0][0]
    for what in ("call", "gate"):
        for n, _ in trees:
            t = times[(n, what)]
            ratio = statistics.median(a / b for a, b in zip(t, times[(first, what)], strict=True))
            print(f"{what:5s} {n:8s} median {statistics.median(t):8.1f} us  "
                  f"per-round ratio to {first} {ratio:.3f}")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                calls[("now", "call")]()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
