"""MAGIC's chunk size per task: one reverse step's vmapped pullback, settings interleaved.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_chunks --task digits-cnn \
        --chunks 4,5,7,8,10,10,13,17,25,all --layouts contig,perm,view --rounds 30

``magic_recipe(task, 1)`` is prepared on run 0 and its score's own pieces (step, ``vjp_step``,
target, the scaled test cotangents) are captured by a recorder in place of
``magic.metagradient``. Each round takes the state before step ``t`` (``t`` cycles over the run,
so every setting sees the same states), forms the step's ``vjp`` once and times, in thread CPU,
``vmap(pullback, chunk_size=c)(bar)`` for every setting, the order rotated each round; ``bar`` is
the test cotangents (params) with zero optimizer cotangents, as at the pass's first step. A
repeated chunk size is an A/A pair (its ratio is the noise). Layouts: ``contig`` = targets in
their order; ``perm`` = targets reordered so chunk ``i`` holds ``i, i + k/c, ...`` (strided
targets, contiguous memory); ``view`` = the same values as a strided view (targets innermost in
memory). Prints per-setting median ms and the median of per-round ratios to the first setting.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Sequence

import torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_chunks",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-cnn")
    p.add_argument("--chunks", default="10,10,4,5,7,8,13,17,25,all")
    p.add_argument("--layouts", default="contig")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--targets", type=int, default=None, help="keep the first k targets")
    p.add_argument("--full", default=None, help="chunk sizes a,b: magic_recipe(task, --runs) "
                                                "prepare + score A/B instead")
    p.add_argument("--runs", type=int, default=3)
    return p.parse_args(argv)


def capture(task_name: str):
    """Return ``(one_step builder, T, cotangent list)`` of ``magic_recipe(task, 1)``'s score."""
    from benchmarks.magic_config import load_task
    from benchmarks.magic_config import parse_args as cfg_args
    from dattri_fn.app.recipes import MAGIC_CHUNKS, magic_recipe
    from dattri_fn.attribute.magic import MagicState, MetaGradient

    mod = importlib.import_module("dattri_fn.attribute.magic")
    task = load_task(cfg_args(["--task", task_name]))
    method, params = magic_recipe(task, 1, chunk_size=MAGIC_CHUNKS.get(task.name))
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    state = method.prepare(params, data)
    got = {}

    def recorder(step, traj, data_, order, cot, *, chunk_size=None, vjp_step=None, **kw):
        got.update(traj=traj, data=data_, order=order, cot=cot, vjp_step=vjp_step or step)
        k = next(iter(cot.values())).shape[0]
        return MetaGradient(torch.zeros(k, len(task.x_train)),
                            {n: v[:0] for n, v in traj.params.items()},
                            torch.full((k,), len(order)), torch.full((k,), len(order)))

    real, mod.metagradient = mod.metagradient, recorder
    try:
        method.score([params[0]], MagicState((state.runs[0],), (state.orders[0],)), data, test)
    finally:
        mod.metagradient = real
    return got


def full(args) -> dict:
    """``magic_recipe(task, runs, chunk_size=c)`` (= recipe("magic-ens") on digits-cnn at the
    recipe's chunk size) prepare + score in thread CPU, the chunk sizes alternated (order reversed
    every other round); scores compared to the first size's."""
    from benchmarks.magic_config import load_avg, load_task
    from benchmarks.magic_config import parse_args as cfg_args
    from dattri_fn.app.recipes import magic_recipe

    task = load_task(cfg_args(["--task", args.task]))
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    sizes = [None if c == "all" else int(c) for c in args.full.split(",")]
    times, scores = {c: [] for c in sizes}, {}
    for r in range(args.rounds):
        for c in sizes if r % 2 == 0 else sizes[::-1]:
            method, params = magic_recipe(task, args.runs, chunk_size=c)
            c0 = time.thread_time()
            s = method.score(params, method.prepare(params, data), data, test)
            times[c].append(time.thread_time() - c0)
            scores.setdefault(c, s)
            print(f"round {r} chunk {c}: {times[c][-1]:.2f} CPU-s, load {load_avg()}", flush=True)
    a = scores[sizes[0]]
    for c in sizes[1:]:
        d = float((scores[c] - a).abs().max() / a.abs().max())
        print(f"chunk {c} vs {sizes[0]}: torch.equal {torch.equal(scores[c], a)}, "
              f"max |diff| / max|score| {d:.3g}")
    return times


def main(argv: Sequence[str] | None = None) -> dict:
    from torch.func import vjp, vmap
    from torch.utils._pytree import tree_map

    from dattri_fn.attribute.metagradient import _join, _split
    from dattri_fn.training.run import take

    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.full:
        return full(args)
    g = capture(args.task)
    traj, data, order, cot, vjp_step = g["traj"], g["data"], g["order"], g["cot"], g["vjp_step"]
    T = len(order)
    final_params, final_opt = traj.checkpoints[T]
    k = next(iter(cot.values())).shape[0]
    if args.targets:
        cot, k = {n: v[:args.targets] for n, v in cot.items()}, args.targets
    zeros = tree_map(lambda x: x.new_zeros((k, *x.shape))
                     if isinstance(x, torch.Tensor) and x.is_floating_point() else x, final_opt)
    bar, _ = _split(({name: cot[name] for name in final_params}, zeros))
    n = 1 + max(int(r.max()) for r in order)
    weights = torch.ones(n, dtype=bar[0].dtype)
    chunks = [None if c == "all" else int(c) for c in args.chunks.split(",")]
    settings = []
    for lay in args.layouts.split(","):
        for i, c in enumerate(chunks):
            cc = c or k
            if lay == "contig":
                b = bar
            else:
                groups = -(-k // cc)  # chunk i holds targets i, i + groups, ...
                perm = torch.arange(groups * cc).view(cc, groups).T.reshape(-1)
                perm = perm[perm < k]
                b = [x[perm].contiguous() for x in bar]
                if lay == "view":
                    b = [x.movedim(0, -1).contiguous().movedim(-1, 0) for x in b]
            settings.append((f"{lay}:{c or 'all'}" + ("'" if chunks[:i].count(c) else ""), c, b))
    times = {s[0]: [] for s in settings}
    clock = time.thread_time
    for r in range(args.rounds):
        t = (r * 37) % T
        floats, how = _split(traj.checkpoints[t])
        rows = order[t]
        batch = take(data, rows)

        def one_step(floats_t, w_rows, how=how, batch=batch):
            params, opt_state = _join(floats_t, how)
            return _split(vjp_step(params, opt_state, batch, w_rows))[0]

        _, pullback = vjp(one_step, floats, weights[rows])
        rot = r % len(settings)
        for name, c, b in settings[rot:] + settings[:rot]:
            c0 = clock()
            vmap(pullback, chunk_size=c)(b)
            times[name].append(clock() - c0)
    base = settings[0][0]
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{args.task}: k = {k}, T = {T}, {args.rounds} rounds, load at end {load}")
    print("| setting | median ms | median ratio to " + base + " | quartiles |")
    print("|---|---|---|---|")
    out = {}
    for name, _, _ in settings:
        ratios = sorted(a / b for a, b in zip(times[name], times[base], strict=True))
        q = statistics.quantiles(ratios, n=4)
        out[name] = (1e3 * statistics.median(times[name]), statistics.median(ratios))
        print(f"| {name} | {out[name][0]:.1f} | {out[name][1]:.3f} | {q[0]:.3f}-{q[2]:.3f} |")
    return out


if __name__ == "__main__":
    main()
