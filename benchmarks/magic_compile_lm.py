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
    p.add_argument("--metagradient", type=int, default=0, metavar="L",
                   help="instead: metagradient(horizon=L) eager against compile=--backend through "
                        "the library (dattri_fn.training.compile), graphs compiled and drift")
    p.add_argument("--extra-shapes", default="", help="comma-separated target counts to compile too")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
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

    if args.metagradient:
        return library(args, step, vstep, traj, data, order, cot)
    compiled = torch.compile(eager, dynamic=False, backend=args.backend)
    ref = eager(floats, w, bar)
    row: dict = {"T": T, "k": args.k, "batch": len(order[T // 2]), "backend": args.backend}
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


def library(args, step, vstep, traj, data, order, cot) -> dict:
    """metagradient(horizon=L) eager, then with compile=backend: CPU, graphs, relative drift."""
    from dattri_fn.attribute.metagradient import metagradient
    from dattri_fn.training.compile import reverse_step

    L = args.metagradient
    t0 = time.thread_time()
    ref = metagradient(step, traj, data, order, cot, horizon=L, vjp_step=vstep)
    eager_s = time.thread_time() - t0
    backend = True if args.backend == "inductor" else args.backend
    t0, p0, w0 = time.thread_time(), cpu_all(), time.perf_counter()
    out = metagradient(step, traj, data, order, cot, horizon=L, vjp_step=vstep, compile=backend)
    rs = reverse_step(vstep, "inductor" if backend is True else backend)
    row = {"L": L, "backend": args.backend, "graphs": rs.graphs, "off": rs.reason,
           "eager_thread_cpu_s": round(eager_s, 1),
           "compiled_thread_cpu_s": round(time.thread_time() - t0, 1),
           "compiled_process_children_cpu_s": round(cpu_all() - p0, 1),
           "compiled_wall_s": round(time.perf_counter() - w0, 1),
           "rel_diff_weights": float((out.weights - ref.weights).abs().max()
                                     / ref.weights.abs().max()),
           "rel_diff_params": max(float((out.params[n] - ref.params[n]).abs().max()
                                        / ref.params[n].abs().max()) for n in ref.params)}
    with open("/proc/loadavg") as f:
        row["load"] = " ".join(f.read().split()[:3])
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
