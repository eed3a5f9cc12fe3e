"""Where a FactGraSS ``prepare + score`` round goes, by ablation: each part replaced by a no-op (or
its cached result), interleaved in one process with the unchanged round (one thread).

    OMP_NUM_THREADS=1 python -m benchmarks.factgrass_floor [--task digits-mlp] [--rounds 60]
        [--bytes 13,16,20]

The method is built as :mod:`benchmarks.run` builds it for ``g_against``. Variants (each a fresh
method; the patches are applied around its own round only):

* ``A/A``: a second unchanged method (how far an unchanged round reads from ``base``);
* ``bytes=2**e``: ``factgrass._SKETCH_BYTES`` (the stage-1 row block) at ``2**e`` (scores are
  compared with the default's, max difference relative to max|S|);
* ``-stage2``: ``_stage_two`` copies S's first ``d`` columns instead of the count-sketch
  product;
* ``-mlp_io``: ``mlp_io`` returns the factors of its batch computed once before (the capture pass);
* ``-checks``: ``all_finite`` is ``True`` without a tensor op (the finite checks of params,
  batches, test rows and the Fisher);
* ``-inverse``: ``_inverses`` returns the inverses computed once before (Cholesky + inverse);
* ``-all``: the four together (what is left: Python, plan decisions, the stage-1 muls, the
  masks, grams, the score product and the small ops).

Printed: the median thread CPU us of each variant and the median of its per-round ratios to the
unchanged round. Ablated rounds compute wrong scores: the times are the point.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.factgrass_floor",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--bytes", default="13,20", help="log2 _SKETCH_BYTES variants besides 16")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    # the modules themselves (dattri_fn.attribute's factgrass names the function)
    checks, fg, ff, fl, fr, pl = (importlib.import_module(f"dattri_fn.{m}") for m in (
        "_checks", "attribute.factgrass", "attribute.factgrass_fisher", "attribute.factgrass_flat",
        "attribute.factgrass_rows", "attribute.pipeline"))
    from benchmarks.run import BENCH_HP, runner_for, task_and_models

    task, models = task_and_models(args.task, 1)
    default = fg._SKETCH_BYTES

    def build(sketch_bytes=default):
        fg._SKETCH_BYTES = sketch_bytes  # read when factgrass is called
        try:
            return runner_for("ours", "factgrass", task, models, BENCH_HP)
        finally:
            fg._SKETCH_BYTES = default

    base = build()
    ref = base.score(base.prepare())
    io_memo, inv_memo = {}, {}
    mlp_io, inverses = fl.mlp_io, fg._inverses

    def memo_io(module, loss_fn, state, args, kwargs, target, layers):
        key = (args[0].data_ptr(), args[0].shape)
        if key not in io_memo:
            io_memo[key] = mlp_io(module, loss_fn, state, args, kwargs, target, layers)
        return dict(io_memo[key])  # flat_sides pops from it

    def memo_inv(*a, **k):
        if "v" not in inv_memo:
            inv_memo["v"] = inverses(*a, **k)
        return dict(inv_memo["v"])

    def finite(x):
        return True

    def no_stage2(sk, blk, piece, out=None):
        # the first d columns of S (one cheap copy): rows the Fisher can still invert
        return out.copy_(piece[:, :out.shape[1]])

    patches = {
        "-stage2": [(fr, "_stage_two", no_stage2)],
        "-mlp_io": [(fl, "mlp_io", memo_io)],
        "-checks": [(checks, "all_finite", finite), (pl, "all_finite", finite),
                    (ff, "all_finite", finite)],
        "-inverse": [(fg, "_inverses", memo_inv)],
    }
    patches["-all"] = [x for v in patches.values() for x in v]

    @contextlib.contextmanager
    def patched(items):
        old = [(m, n, getattr(m, n)) for m, n, _ in items]
        for m, n, f in items:
            setattr(m, n, f)
        try:
            yield
        finally:
            for m, n, f in old:
                setattr(m, n, f)

    variants = {"base": (base, []), "A/A": (build(), [])}  # a second unchanged method: the noise
    for e in (int(x) for x in args.bytes.split(",") if x):
        variants[f"bytes=2**{e}"] = (build(2 ** e), [])
    for name, items in patches.items():
        variants[name] = (build(), items)
    for name, (r, _) in variants.items():
        if name.startswith("bytes"):
            got = r.score(r.prepare())
            print(f"{name}: scores max diff / max|S| "
                  f"{float((got - ref).abs().max() / ref.abs().max()):.1e}")

    def run(r, items):
        with patched(items):
            t0 = time.thread_time_ns()
            r.score(r.prepare())
            return time.thread_time_ns() - t0

    for r, items in variants.values():
        for _ in range(5):
            run(r, items)
    times = {n: [] for n in variants}
    names = list(variants)
    for i in range(args.rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            times[n].append(run(*variants[n]))
    print(f"{args.task} factgrass prepare + score, {args.rounds} interleaved rounds "
          f"(load {os.getloadavg()[0]:.2f})")
    for n in names:
        ratio = statistics.median(x / y for x, y in zip(times[n], times["base"], strict=True))
        print(f"  {n:12s} {statistics.median(times[n]) / 1e3:8.0f} us  /base {ratio:.3f}")


if __name__ == "__main__":
    main()
