"""CG and LiSSA on the exact Hessian against their FLOP floor and against dattri 0.3.0, one process.

    OMP_NUM_THREADS=1 python -m benchmarks.hessian_floor [--task digits-mlp] [--rounds 3]

Both sides are the runners ``benchmarks.g_against`` compares (:func:`benchmarks.run.runner_for`:
our influence matched to dattri's quantity, ``curvature="hessian"``, and dattri's attributor).
For each method and side:

* FLOPs: one ``prepare + score`` under ``torch.utils.flop_counter.FlopCounterMode`` (the
  matrix products: mm, bmm, addmm, baddbmm, and their in-place forms, which it would count as
  0; matrix-vector products and elementwise work are not counted). On our side this is
  the Hessian-vector products times the solver's iterations, plus the test gradients; our
  Hessian products and their ``rows x examples`` are counted too (autograd's double backward
  per data batch, or the MLP R-operator of :mod:`dattri_fn.operators.linear_mlp` per row step);
* the FLOP floor: those FLOPs at this core's best float32 GEMM rate, measured in the same run
  (square products of 256, 512 and 1024; the best median): the time the run would take if every
  counted FLOP ran at that rate. ``ours / floor`` is how far the run is from it (issue 14's
  target: within 1.2x, or below 0.2x of dattri's time);
* time: ``prepare + score`` alternated ours / dattri for ``--rounds`` rounds, main-thread CPU
  seconds, medians and the median of per-round ratios.

The floor counts the FLOPs our products perform as they are written (e.g. a batched product
over ``k`` right-hand sides that repeats a shared factor ``k`` times counts ``k`` times), so a
rewrite with fewer FLOPs lowers it too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (dattri imports it)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

METHODS = ("if-cg", "if-lissa")


def _gemm(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """``2 m k n`` of ``self += a @ b`` (``[m, k] x [k, n]``, or batched ``[b, m, k]``)."""
    *batch, m, k = a_shape
    return 2 * m * k * b_shape[-1] * (batch[0] if batch else 1)


# FlopCounterMode counts mm, addmm, bmm and baddbmm but not their in-place forms (0 FLOPs),
# which the MLP R-operator uses to sum W R a and V_W^T delta into its GEMMs' outputs, nor addbmm
_IN_PLACE = {torch.ops.aten.addmm_: _gemm, torch.ops.aten.baddbmm_: _gemm,
             torch.ops.aten.addbmm: _gemm, torch.ops.aten.addbmm_: _gemm}


def count_flops(fn) -> int:
    """Return the FLOPs of the matrix products ``fn()`` runs (FlopCounterMode's count, plus
    the in-place GEMMs ``addmm_``, ``baddbmm_`` and ``addbmm(_)`` it leaves at 0)."""
    with FlopCounterMode(display=False, custom_mapping=_IN_PLACE) as counter:
        fn()
    return int(counter.get_total_flops())


def gemm_rate(sizes=(256, 512, 1024), repeats: int = 5) -> float:
    """Return this thread's best float32 GEMM rate in FLOP/s (median per size, best size)."""
    best = 0.0
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        a @ b  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.thread_time()
            a @ b
            times.append(time.thread_time() - t0)
        best = max(best, 2 * n ** 3 / max(statistics.median(times), 1e-9))
    return best


def hvp_calls(run) -> tuple[int, int]:
    """``(products, rows x examples)`` of our Hessian products during ``run()``: the plain
    autograd product (one per data batch and call) and the MLP's R-operator
    (:mod:`dattri_fn.operators.linear_mlp`, one per row step and call)."""
    from dattri_fn._checks import batch_leaves
    from dattri_fn.operators import curvature, linear_mlp

    seen = [0, 0]
    plain, mlp = curvature._plain_rev_rev, linear_mlp._product

    def counted_plain(batch_loss, flat0, V, batch, chunk_size):
        seen[0] += 1
        seen[1] += V.shape[0] * batch_leaves(batch)[0].shape[0]
        return plain(batch_loss, flat0, V, batch, chunk_size)

    def counted_mlp(layers, params, f, V):
        seen[0] += 1
        seen[1] += next(iter(V.values())).shape[0] * f["p"].shape[0]
        return mlp(layers, params, f, V)

    curvature._plain_rev_rev, linear_mlp._product = counted_plain, counted_mlp
    try:
        run()
    finally:
        curvature._plain_rev_rev, linear_mlp._product = plain, mlp
    return seen[0], seen[1]


def _cpu(runner) -> float:
    t0 = time.thread_time()
    runner.score(runner.prepare())
    return time.thread_time() - t0


def compare(name: str, task, models, hp: dict, rounds: int, rate: float,
            with_dattri: bool) -> dict:
    """One method's row: FLOPs, floor, times and ratios of both sides."""
    from benchmarks.run import runner_for

    sides = {"ours": runner_for("matched", name, task, models, hp)}
    if with_dattri:
        sides["dattri"] = runner_for("dattri", name, task, models, hp)
    row: dict = {"method": name}
    for k, r in sides.items():
        _cpu(r)  # warm-up
        row[f"{k}_flops"] = count_flops(lambda r=r: r.score(r.prepare()))
        row[f"{k}_floor_s"] = row[f"{k}_flops"] / rate
    row["hvp_calls"], row["hvp_row_examples"] = hvp_calls(
        lambda: sides["ours"].score(sides["ours"].prepare()))
    cpu: dict = {k: [] for k in sides}
    for _ in range(rounds):
        for k, r in sides.items():
            cpu[k].append(_cpu(r))
    for k, v in cpu.items():
        row[f"{k}_s"] = statistics.median(v)
    row["ours_over_floor"] = row["ours_s"] / row["ours_floor_s"]
    if with_dattri:
        row["ours_over_dattri"] = statistics.median(
            a / b for a, b in zip(cpu["ours"], cpu["dattri"], strict=True))
        row["floor_over_dattri"] = row["ours_floor_s"] / row["dattri_s"]
    row["load"] = os.getloadavg()[0]
    return row


def table(rows: list[dict], rate: float) -> str:
    """Markdown: FLOPs, floor, times and ratios per method."""
    head = ["method", "HVP products", "rows x examples", "ours GFLOP", "dattri GFLOP",
            "floor s", "ours s", "ours / floor", "dattri s", "ours / dattri", "floor / dattri",
            "load"]
    f = lambda x, fmt: "—" if x is None else format(x, fmt)  # noqa: E731
    lines = [f"GEMM rate {rate / 1e9:.1f} GFLOP/s (float32, this thread)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], str(r["hvp_calls"]), f"{r['hvp_row_examples']:,}",
            f(r["ours_flops"] / 1e9, ".2f"),
            f(r.get("dattri_flops") and r["dattri_flops"] / 1e9, ".2f"),
            f(r["ours_floor_s"], ".3f"), f(r["ours_s"], ".3f"), f(r["ours_over_floor"], ".2f"),
            f(r.get("dattri_s"), ".3f"), f(r.get("ours_over_dattri"), ".3f"),
            f(r.get("floor_over_dattri"), ".3f"), f(r["load"], ".1f")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-dattri", action="store_true", help="our side and the floor only")
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")  # dattri warns per batch
    from benchmarks.against_dattri import dattri_available
    from benchmarks.run import DEFAULT_SIZES, load_models, load_task, train_states

    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, args.models))
    hp = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
          "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}
    rate = gemm_rate()
    with_dattri = not args.no_dattri and dattri_available()
    rows = []
    for name in (m.strip() for m in args.methods.split(",") if m.strip()):
        rows.append(compare(name, task, models, hp, args.rounds, rate, with_dattri))
        print(f"  {name}: {rows[-1]}", flush=True)
    print(f"\n{args.task}: n_train={n_train}, n_test={n_test}, threads={torch.get_num_threads()}\n")
    print(table(rows, rate))
    return rows


if __name__ == "__main__":
    main()
