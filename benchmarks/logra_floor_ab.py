"""LoGra's prepare + score against the model-bound floor, interleaved in one process.

``python -m benchmarks.logra_floor_ab --n 1000 --width 1333 --rounds 11`` builds the scaling
probe's point (:mod:`benchmarks.scaling`: ``synthetic_digits(n)``, ``mlp(width)``, P = 75 w + 10)
and times, round after round in a rotated order, each step's thread CPU:

* ``ours``: LoGra as the probe runs it (a list of ``batch_rows(P)``-row batches);
* ``ours one batch``: the same training set given as one ``(x, y)`` batch (capped passes, sliced);
* ``ours one batch whole``: that batch in one pass (slicing switched off, as before it was sliced);
* ``ours share64``: the list with passes capped at ``memory_budget() / 64`` instead of ``/ 256``;
* ``floor``: one plain forward and backward per training batch and over the test batch
  (:func:`benchmarks.scaling.floor_point`).

It prints each step's median (ms) and, for each LoGra step, the median, minimum and maximum of
its per-round ratio to the floor of the same round: the machine is shared, so single rounds
swing by tens of percent and only same-round ratios compare. ``--peak`` first prints each
step's exact tensor peak (:func:`benchmarks.peak.tensor_peak`).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
import warnings


def steps(n: int, width: int) -> dict:
    """``{name: () -> None}``: the steps of the module docstring at the point (n, width)."""
    from benchmarks.scaling import N_MODELS, floor_point, mlp, our_recipe, synthetic_digits

    logra_mod = importlib.import_module("dattri_fn.attribute.logra")
    warnings.filterwarnings("ignore")
    task = synthetic_digits(n)
    models = [mlp(width, c) for c in range(N_MODELS)]
    r = our_recipe("logra", task, models, cg_iters=20)
    one = (task.x_train, task.y_train)
    floor = floor_point(task, models)

    def ours(train=r.train):
        r.method.score(r.params, r.method.prepare(r.params, train), train, r.test)

    def patched(name: str, value, train):
        def run():
            old = getattr(logra_mod, name)
            setattr(logra_mod, name, value)
            try:
                ours(train)
            finally:
                setattr(logra_mod, name, old)
        return run

    return {"ours": ours, "ours one batch": lambda: ours(one),
            "ours one batch whole": patched("_sliceable", lambda module: False, one),
            "ours share64": patched("_PASS_SHARE", 64, r.train), "floor": lambda: floor()}


def measure(n: int, width: int, rounds: int) -> dict:
    """``{step: [thread CPU ms per round]}`` (one warm-up call each, then rotated rounds)."""
    run = steps(n, width)
    names = list(run)
    for f in run.values():
        f()
    out: dict = {k: [] for k in names}
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t = time.thread_time()
            run[k]()
            out[k].append(1e3 * (time.thread_time() - t))
    return out


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser(prog="python -m benchmarks.logra_floor_ab",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--width", type=int, default=1333, help="hidden width (P = 75 w + 10)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--peak", action="store_true",
                    help="also each step's exact tensor peak (benchmarks.peak.tensor_peak, MiB)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.peak:
        from benchmarks.peak import tensor_peak

        for k, f in steps(args.n, args.width).items():
            print(f"  {k:22s} exact tensor peak {tensor_peak(f)[1] / 2**20:8.3f} MiB")
    load = open("/proc/loadavg").read().split()[0]
    ts = measure(args.n, args.width, args.rounds)
    print(f"n = {args.n}, width = {args.width} (P = {75 * args.width + 10}), {args.rounds} rounds, "
          f"thread CPU ms, load {load} -> {open('/proc/loadavg').read().split()[0]}")
    for k, v in ts.items():
        line = f"  {k:22s} median {statistics.median(v):8.1f}"
        if k != "floor":
            ratios = [a / b for a, b in zip(v, ts["floor"], strict=True)]
            line += (f"   / floor: median {statistics.median(ratios):.2f}, "
                     f"rounds {min(ratios):.2f}-{max(ratios):.2f}")
        print(line)


if __name__ == "__main__":
    main()
