"""torch.compile of MAGIC's reverse step on text-lm: cold compile cost, step time, value drift.

    TORCHINDUCTOR_COMPILE_THREADS=1 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) OMP_NUM_THREADS=1 \
        python -m benchmarks.magic_compile_lm --rounds 6

The text-lm run of ``recipe("magic")`` (init seed 0, the task's Adam + recursive cosine), the state
before step ``T/2``, the recipe's ``vjp_step`` (one loss path), ``--k`` targets (default the 16 test
rows, all in one vmap as the recipe). ``eager``: the library's reverse step (``vjp`` once, its
pullback vmapped); ``compiled``: ``torch.compile`` (inductor, ``dynamic=False``) of the same
function for this one step (its int step counter a constant: one graph, so this measures the best
case per shape). Prints the first call's cost (thread CPU; process + children CPU: inductor's C++
compiles run in child processes; wall), the largest relative difference from eager (state
cotangent, weight cotangents), thread CPU ms per step for both forms interleaved over ``--rounds``
rounds, medians and the median per-round ratio; then ``--extra-shapes`` further compiles of the
same step with fewer targets (the shapes early exit makes), each one's thread / process+children
CPU. A fresh cache directory measures a cold compile.

No library compile API is used: the library has none (a stop-24 ``metagradient(compile=...)``
opt-in was taken out). In torch 2.13 inductor's values here are O(1) off: its post-grad pattern
``add(mm(a, b), x) -> addmm(x, a, b)`` (``torch/_inductor/fx_passes/post_grad.py``, ``addmm``)
ignores ``aten.add``'s ``alpha=``, and the library's Adam with L2 decay writes
``g.add(p, alpha=wd)`` (a Linear weight's gradient is an ``mm``: ``g`` becomes ``grad + p``).

    python -m benchmarks.magic_compile_lm --repro-addmm

runs that 3-op repro alone (one small inductor compile, seconds) and prints whether ``alpha`` was
dropped, so a newer torch can be re-tested; ``--no-pattern-matcher`` compiles with inductor's
pattern matcher off (a control: the rewrite cannot fire). On text-lm (2.13.0+cpu, ``--rounds 4
--no-pattern-matcher``, cold cache) that control is right: weight cotangents 3.4e-7 relative to
eager, state cotangent 1.7e-4 (the decompositions' float32 drift), 0.662x eager per step, for
56.5 thread / 111.3 process + children CPU-s of compile (benchmarks/RESULTS.md, stop 24).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Sequence

import torch


def cpu_all() -> float:
    """Process plus waited-for children's user + system CPU seconds."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def main(argv: Sequence[str] | None = None) -> dict:
    from torch.func import grad, vjp, vmap

    from dattri_fn.attribute.metagradient import _join, _split
    from dattri_fn.eval.tasks import adam_run, get_task, task_step
    from dattri_fn.model import functional_model
    from dattri_fn.training import adam, cosine_schedule, make_step, train
    from dattri_fn.training.run import take

    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_compile_lm",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: "
                   "the traced graph without inductor, to tell a tracing error from inductor's)")
    p.add_argument("--repro-addmm", action="store_true",
                   help="only run the 3-op repro of inductor's addmm rewrite dropping alpha=")
    p.add_argument("--no-pattern-matcher", action="store_true",
                   help="compile with torch._inductor.config.pattern_matcher = False")
    p.add_argument("--extra-shapes", default="", help="comma-separated target counts to compile too")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.no_pattern_matcher:
        import torch._inductor.config as inductor_config

        inductor_config.pattern_matcher = False
    if args.repro_addmm:
        row = repro_addmm()
        row["pattern_matcher"] = not args.no_pattern_matcher
        print(json.dumps(row), flush=True)
        return row
    task = get_task("text-lm", n_train=128, n_test=args.k, seed=0)
    hp = task.hparams
    wd = float(hp.get("weight_decay", 0.0))
    fm = functional_model(task.make_model(0), task.loss_fn)
    opt, order = adam_run(task.n_train, epochs=hp["epochs"], lr=hp["lr"])
    step = task_step(fm, opt, wd)
    same = adam(cosine_schedule(hp["lr"], hp["epochs"], recursive=True), weight_decay=wd)
    vstep = make_step(fm, same)
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    T = len(order)
    traj = train(step, fm.params, opt.init(fm.params), data, order, checkpoint_every=T // 2)
    floats, how = _split(traj.checkpoints[T // 2])
    batch = take(data, order[T // 2])
    w = torch.ones(len(order[T // 2]))
    cot = vmap(grad(lambda q, ex: -fm.loss(q, ex)), in_dims=(None, 0))(traj.params, test)
    bar = [cot[n] for n in traj.params] + [torch.zeros((args.k, *f.shape))
                                           for f in floats[len(cot):]]

    def one_step(floats_t, w_rows):
        params, opt_state = _join(floats_t, how)
        return _split(vstep(params, opt_state, batch, w_rows))[0]

    def eager(floats, w, bar):
        _, pullback = vjp(one_step, floats, w)
        return vmap(pullback)(bar)

    compiled = torch.compile(eager, dynamic=False, backend=args.backend)
    ref = eager(floats, w, bar)
    row: dict = {"T": T, "k": args.k, "batch": len(order[T // 2]), "backend": args.backend,
                 "pattern_matcher": not args.no_pattern_matcher, "torch": torch.__version__}
    t0, p0, w0 = time.thread_time(), cpu_all(), time.perf_counter()
    out = compiled(floats, w, bar)
    row["compile"] = {"thread_cpu_s": round(time.thread_time() - t0, 1),
                      "process_children_cpu_s": round(cpu_all() - p0, 1),
                      "wall_s": round(time.perf_counter() - w0, 1),
                      "rel_diff_state": max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                                            for a, b in zip(out[0], ref[0], strict=True)),
                      "rel_diff_weights": float((out[1] - ref[1]).abs().max()
                                                / ref[1].abs().max())}
    print(json.dumps(row), flush=True)
    forms = {"eager": lambda: eager(floats, w, bar), "compiled": lambda: compiled(floats, w, bar)}
    ms: dict[str, list[float]] = {k: [] for k in forms}
    for _ in range(args.rounds):
        for name, f in forms.items():
            t0 = time.thread_time()
            f()
            ms[name].append((time.thread_time() - t0) * 1e3)
    row["ms"] = {k: [round(v, 1) for v in vs] for k, vs in ms.items()}
    row["median_ms"] = {k: round(statistics.median(vs), 1) for k, vs in ms.items()}
    row["paired_over_eager"] = round(statistics.median(
        [a / b for a, b in zip(ms["compiled"], ms["eager"], strict=True)]), 3)
    row["extra_shapes"] = {}
    for kk in [int(s) for s in args.extra_shapes.split(",") if s.strip()]:
        part = [b[:kk] for b in bar]
        t0, p0 = time.thread_time(), cpu_all()
        compiled(floats, w, part)
        row["extra_shapes"][kk] = {"thread_cpu_s": round(time.thread_time() - t0, 1),
                                   "process_children_cpu_s": round(cpu_all() - p0, 1)}
    with open("/proc/loadavg") as f:
        row["load"] = " ".join(f.read().split()[:3])
    print(json.dumps(row), flush=True)
    return row


def repro_addmm(backend: str = "inductor") -> dict:
    """Inductor 2.13's post-grad ``add(mm(a, b), p, alpha=) -> addmm(p, a, b)`` rewrite drops
    ``alpha`` (review R1 F2): compile ``(a @ b).add(p, alpha=1e-4)`` and compare with eager.
    ``alpha_dropped`` True: the output is ``a @ b + p`` (the bug); a fixed torch gives False and
    a difference at float32 round-off."""
    torch.manual_seed(0)
    a, b, p = torch.randn(5, 3), torch.randn(3, 4), torch.randn(5, 4)

    def f(a, b, p):
        return (a @ b).add(p, alpha=1e-4)

    ref = f(a, b, p)
    out = torch.compile(f, backend=backend, fullgraph=True)(a, b, p)
    return {"torch": torch.__version__, "backend": backend,
            "max_abs_diff": float((out - ref).abs().max()),
            "alpha_dropped": bool(torch.allclose(out, a @ b + p, atol=1e-5)),
            "correct": bool(torch.allclose(out, ref, rtol=1e-5, atol=1e-6))}


if __name__ == "__main__":
    main()
