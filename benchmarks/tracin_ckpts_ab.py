"""TracIn / TracIn-Cos over C checkpoints with the certified plan (stop 26) against the plan check
(the code before: certification and mlp_io for one checkpoint only), interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.tracin_ckpts_ab [--task digits-mlp] [--rounds 41]
    OMP_NUM_THREADS=1 python -m benchmarks.tracin_ckpts_ab --one /tmp/old_certified.py \
        --methods grad-dot,grad-cos

``--one PATH``: one checkpoint (Grad-Dot/Grad-Cos), the certified path of this tree against the
one of ``PATH`` (``git show <rev>:dattri_fn/transforms/layer_grads_certified.py``), whose
functions are patched in where layer_grads reads them; the question there is only whether the
C-generic code costs anything at C = 1.

The recipe runners of :mod:`benchmarks.g_against` (``ours`` with the task's 3 models, and dattri
0.3.0's) time ``prepare + score`` in rounds of (certified, checked, dattri), the order rotated
each round; "checked" restores the old behaviour by patching the certified core to decline at
C > 1 and ``layer_grads._plain_mlp`` to return None at C > 1 (what both did before). Printed:
each side's median thread CPU ms, the medians of the per-round ratios, and whether the scores
(and ``self_score``, timed too: certified vs checked) are torch.equal.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before torch (and so tqdm) is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402


def _old_paths():
    """(enter, leave): patch in / out the one-checkpoint-only behaviour of before stop 26."""
    from dattri_fn.transforms import layer_grads
    from dattri_fn.transforms import layer_grads_certified as lgc

    real_c, real_p = lgc._certified, layer_grads._plain_mlp

    def certified(plan, stacked, batch):
        if any(v.ndim and v.shape[0] != 1 for v in stacked.values()):
            return None, {}
        return real_c(plan, stacked, batch)

    def plain(plan, stacked, batch):
        if next(iter(stacked.values())).shape[0] != 1:
            return None
        return real_p(plan, stacked, batch)

    def enter():
        lgc._certified, layer_grads._plain_mlp = certified, plain

    def leave():
        lgc._certified, layer_grads._plain_mlp = real_c, real_p

    return enter, leave


def _one_paths(path: str):
    """(enter, leave): layer_grads' certified functions from the module file ``path``."""
    import importlib.util

    from dattri_fn.transforms import layer_grads

    spec = importlib.util.spec_from_file_location("dattri_fn.transforms._lgc_before", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    names = ("certified_plan", "_certified_grads", "_mlp_factors", "_mlp_grads")
    real = {n: getattr(layer_grads, n) for n in names}

    def enter():
        for n in names:
            setattr(layer_grads, n, getattr(old, n))

    def leave():
        for n in names:
            setattr(layer_grads, n, real[n])

    return enter, leave


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--methods", default="tracin,tracin-cos")
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--one", default=None, help="old layer_grads_certified.py: C = 1 A/B")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from benchmarks.run import BENCH_HP, runner_for, task_and_models
    from dattri_fn.app.recipes import recipe

    task, models = task_and_models(args.task, 3)
    enter, leave = _old_paths() if args.one is None else _one_paths(args.one)
    print(f"task {args.task}, {len(models)} checkpoints, load {os.getloadavg()[0]:.2f}")

    def timed(fn, old: bool) -> tuple[float, object]:
        if old:
            enter()
        try:
            c0 = time.thread_time()
            out = fn()
            return time.thread_time() - c0, out
        finally:
            leave()

    for name in args.methods.split(","):
        ours, theirs = (runner_for(side, name, task, models, hp) for side, hp in
                        (("ours", dict(BENCH_HP)), ("dattri", dict(BENCH_HP))))
        run = {0: (lambda: ours.score(ours.prepare()), False),
               1: (lambda: ours.score(ours.prepare()), True),
               2: (lambda: theirs.score(theirs.prepare()), False)}
        outs = {j: timed(*run[j])[1] for j in run}  # warm-up
        same = torch.equal(outs[0], outs[1])
        times: list[list[float]] = [[], [], []]
        for i in range(args.rounds):
            for j in (list(range(3))[i % 3:] + list(range(3))[:i % 3]):
                times[j].append(timed(*run[j])[0])
        med = [1e3 * statistics.median(t) for t in times]
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b],  # noqa: E731
                                                                      strict=True))
        print(f"  {name}: certified {med[0]:.2f} ms, checked {med[1]:.2f} ms, dattri "
              f"{med[2]:.2f} ms; certified/checked {ratio(0, 1):.3f}, certified/dattri "
              f"{ratio(0, 2):.3f}, checked/dattri {ratio(1, 2):.3f}; scores equal: {same}",
              flush=True)
        hp = dict(BENCH_HP)
        rec = recipe(name, task, models, damping=hp["damping"], batch_size=hp["batch_size"])
        m, params, train = rec.method, rec.params, rec.train
        st = m.prepare(params, train)
        selfs = [timed(lambda: m.self_score(params, st, train), old) for old in (False, True)]
        st_t: list[list[float]] = [[], []]
        for i in range(max(5, args.rounds // 2)):
            for old in ((False, True) if i % 2 == 0 else (True, False)):
                st_t[old].append(timed(lambda: m.self_score(params, st, train), old)[0])
        r = statistics.median(a / b for a, b in zip(st_t[0], st_t[1], strict=True))
        print(f"  {name} self_score: certified {1e3 * statistics.median(st_t[0]):.2f} ms, "
              f"checked {1e3 * statistics.median(st_t[1]):.2f} ms, ratio {r:.3f}; equal: "
              f"{torch.equal(selfs[0][1], selfs[1][1])}  (load {os.getloadavg()[0]:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
