"""MAGIC's reverse pass and glibc's malloc thresholds: page faults and thread CPU, processes alternated.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_heap --step --rounds 2
    OMP_NUM_THREADS=1 python -m benchmarks.magic_heap --full OLD_TREE --rounds 2 --save D

A malloc threshold is process-wide and only rises, so the two settings cannot alternate inside one
process: every measurement here is a fresh child process, the settings alternated (order reversed
every other round).

``--step``: each child captures ``magic_recipe(task, 1)``'s reverse-pass pieces
(``benchmarks.magic_chunks.capture``), then times the vmapped pullback (the recipe's chunk size)
of 8 states spread over the run, 3 passes, printing minor page faults and thread CPU ms per
step; ``on`` first calls ``metagradient._raise_malloc_thresholds`` (what ``metagradient`` does
since stop 27), ``off`` does not (glibc's thresholds as the small run left them).

``--full OLD``: ``python -m benchmarks.magic_config --task <t> --ab <config> --rounds 1`` (prepare
+ score of ``recipe("magic-ens")``'s configuration, thread CPU) run in the tree ``OLD`` (a copy of
the code before the change) and in this tree, alternated; prints each time with the load, the
median of the per-round ratios new / old, and whether the scores are ``torch.equal``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_heap",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-cnn")
    p.add_argument("--step", action="store_true")
    p.add_argument("--full", default=None, help="the old tree's root")
    p.add_argument("--config", default="3:1.2:8", help="--full: magic_config --ab's p:R:W")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--save", default="/tmp/magic_heap", help="--full: score folders")
    p.add_argument("--child", default=None, choices=("on", "off"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> None:
    """One ``--step`` measurement in this process (``args.child``: on / off)."""
    import resource
    import time

    import torch
    from torch.func import vjp, vmap
    from torch.utils._pytree import tree_map

    from benchmarks.magic_chunks import capture
    from dattri_fn.app.recipes import MAGIC_CHUNKS
    from dattri_fn.training.run import take

    # the module (the package's ``metagradient`` is the function)
    mg = importlib.import_module("dattri_fn.attribute.metagradient")

    torch.set_num_threads(1)
    if args.child == "on":
        mg._raise_malloc_thresholds()
    g = capture(args.task)
    traj, data, order, cot, vjp_step = g["traj"], g["data"], g["order"], g["cot"], g["vjp_step"]
    T = len(order)
    final_params, final_opt = traj.checkpoints[T]
    k = next(iter(cot.values())).shape[0]
    zeros = tree_map(lambda x: x.new_zeros((k, *x.shape))
                     if isinstance(x, torch.Tensor) and x.is_floating_point() else x, final_opt)
    bar, _ = mg._split(({name: cot[name] for name in final_params}, zeros))
    weights = torch.ones(1 + max(int(r.max()) for r in order), dtype=bar[0].dtype)
    pullbacks = []
    for t in range(5, T, T // 8)[:8]:
        floats, how = mg._split(traj.checkpoints[t])
        batch = take(data, order[t])

        def one_step(floats_t, w_rows, how=how, batch=batch):
            params, opt_state = mg._join(floats_t, how)
            return mg._split(vjp_step(params, opt_state, batch, w_rows))[0]

        pullbacks.append(vjp(one_step, floats, weights[order[t]])[1])
    out = []
    for _ in range(3):
        f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
        for pb in pullbacks:
            vmap(pb, chunk_size=MAGIC_CHUNKS.get(args.task))(bar)
        out.append(((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / len(pullbacks),
                    1e3 * (time.thread_time() - c0) / len(pullbacks)))
    print(json.dumps({"faults": [round(f) for f, _ in out], "ms": [round(m, 1) for _, m in out]}))


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _run(cmd: list[str], cwd: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        return child(args)
    if not args.step and not args.full:
        raise SystemExit("magic_heap: expected --step or --full OLD_TREE")
    sides = ("off", "on") if args.step else ("old", "new")
    times: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            if args.step:
                rec = _run([sys.executable, "-m", "benchmarks.magic_heap", "--task", args.task,
                            "--child", side], HERE)[-1]
                times[side].append(statistics.median(rec["ms"]))
                print(f"round {r} {side}: faults/step {rec['faults']}, ms/step {rec['ms']}, "
                      f"load {_load()}", flush=True)
            else:
                tree = Path(args.full).resolve() if side == "old" else HERE
                rec = _run([sys.executable, "-m", "benchmarks.magic_config", "--task", args.task,
                            "--ab", args.config, "--rounds", "1", "--save",
                            str(Path(args.save) / side)], tree)[-1]
                times[side].append(rec["cpu_s"])
                print(f"round {r} {side}: {rec['cpu_s']} CPU-s, load {rec['load']}", flush=True)
    a, b = sides
    ratios = [y / x for x, y in zip(times[a], times[b], strict=True)]
    print(f"{b} / {a}: per-round ratios {[round(x, 3) for x in ratios]}, median "
          f"{statistics.median(ratios):.3f}; medians {statistics.median(times[a]):.1f} / "
          f"{statistics.median(times[b]):.1f}")
    if args.full:
        import torch

        name = f"{args.task}-ab-{args.config.replace(':', '_')}.pt"
        s_old, s_new = (torch.load(Path(args.save) / side / name) for side in sides)
        d = float((s_new - s_old).abs().max() / s_old.abs().max())
        print(f"scores: torch.equal {torch.equal(s_old, s_new)}, max |diff| / max|S| {d:.3g}")
    return times


if __name__ == "__main__":
    main()
