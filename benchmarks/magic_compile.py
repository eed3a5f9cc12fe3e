"""torch.compile of MAGIC's reverse step on digits-cnn: compile cost, step time, value drift.

    TORCHINDUCTOR_COMPILE_THREADS=1 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) OMP_NUM_THREADS=1 \
        python -m benchmarks.magic_compile --rounds 8

One digits-cnn run (init seed 0, ``SGD_HPARAMS``), the state before step ``T/2`` and the recipe's
``vjp_step``; 50 targets in chunks of 10. Three forms of one reverse step: ``eager`` (the
library's: ``vjp`` once, its pullback vmapped in chunks), ``per-chunk`` (``torch.compile`` of
``vmap(vjp(step)[1])`` on one chunk, called per chunk: the forward is recomputed per chunk) and
``whole`` (``torch.compile`` of the eager function, chunking inside); ``--no-mask``: the GEMM-conv
step without the mask ReLUs (the recipe's before :mod:`dattri_fn.training.mask_relu`). Prints each
compiled form's first-call cost (thread CPU, and process + children CPU: inductor's C++ compiles run in child
processes), its largest relative difference from eager (state cotangent, weight cotangents), then
thread CPU ms per step for each form interleaved over ``--rounds`` rounds, the medians and the
median per-round ratio to eager. A fresh cache directory measures a cold compile.
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

    from dattri_fn.app.recipes import _gemm_vjp_step
    from dattri_fn.attribute.metagradient import _join, _split
    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.eval.tasks import SGD_HPARAMS, get_task, sgd_run
    from dattri_fn.model import functional_model
    from dattri_fn.training import make_step, train
    from dattri_fn.training.run import take

    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_compile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--forms", default="per-chunk,whole", help="compiled forms to time")
    p.add_argument("--no-mask", action="store_true",
                   help="differentiate the GEMM-conv step without the mask ReLUs (before stop 23)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = get_task("digits-cnn", n_train=500, n_test=50, seed=0, hparams=dict(SGD_HPARAMS))
    hp = task.hparams
    fm = functional_model(task.make_model(0), task.loss_fn)
    opt, order = sgd_run(task.n_train, seed=0, epochs=hp["epochs"], lr=hp["lr"],
                         weight_decay=hp.get("weight_decay", 0.0), batch_size=hp["batch_size"],
                         momentum=hp["momentum"])
    step = make_step(fm, opt)
    if args.no_mask:
        from dattri_fn.training.gemm_conv import with_gemm_convs

        gemm = with_gemm_convs(task.make_model(0), ["0"])
        vstep = make_step(functional_model(gemm, task.loss_fn), opt)
    else:
        vstep = _gemm_vjp_step(task.make_model(0), task.loss_fn, opt)
    target = functional_model(task.make_model(0), classification_margin_loss).loss
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    T = len(order)
    traj = train(step, fm.params, opt.init(fm.params), data, order, checkpoint_every=T // 2)
    floats, how = _split(traj.checkpoints[T // 2])
    batch = take(data, order[T // 2])
    w = torch.ones(len(order[T // 2]))
    cot = vmap(grad(target), in_dims=(None, 0))(traj.params, test)
    bar = [cot[n] for n in traj.params] + [torch.zeros((50, *f.shape)) for f in floats[len(cot):]]

    def one_step(floats_t, w_rows):
        params, opt_state = _join(floats_t, how)
        return _split(vstep(params, opt_state, batch, w_rows))[0]

    def eager(floats, w, bar):
        _, pullback = vjp(one_step, floats, w)
        return vmap(pullback, chunk_size=10)(bar)

    def chunk(floats, w, part):
        _, pullback = vjp(one_step, floats, w)
        return vmap(pullback)(part)

    def joined(outs):
        return [torch.cat([o[0][i] for o in outs]) for i in range(len(bar))], \
            torch.cat([o[1] for o in outs])

    forms = {"eager": lambda: eager(floats, w, bar)}
    wanted = [f for f in args.forms.split(",") if f]
    if "per-chunk" in wanted:
        compiled_chunk = torch.compile(chunk, dynamic=False)
        forms["per-chunk"] = lambda: joined([compiled_chunk(floats, w, [b[i:i + 10] for b in bar])
                                             for i in range(0, 50, 10)])
    if "whole" in wanted:
        forms["whole"] = (lambda c: lambda: c(floats, w, bar))(torch.compile(eager, dynamic=False))
    ref = forms["eager"]()
    row: dict = {"compile": {}}
    for name in [f for f in forms if f != "eager"]:
        t0, p0, w0 = time.thread_time(), cpu_all(), time.perf_counter()
        out = forms[name]()
        bar_out, c_out = out
        row["compile"][name] = {
            "thread_cpu_s": round(time.thread_time() - t0, 1), "process_children_cpu_s":
            round(cpu_all() - p0, 1), "wall_s": round(time.perf_counter() - w0, 1),
            "rel_diff_state": max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                                  for a, b in zip(bar_out, ref[0], strict=True)),
            "rel_diff_weights": float((c_out - ref[1]).abs().max() / ref[1].abs().max())}
    ms: dict[str, list[float]] = {k: [] for k in forms}
    for _ in range(args.rounds):
        for name, f in forms.items():
            t0 = time.thread_time()
            f()
            ms[name].append((time.thread_time() - t0) * 1e3)
    row["ms"] = {k: [round(v, 1) for v in vs] for k, vs in ms.items()}
    row["median_ms"] = {k: round(statistics.median(vs), 1) for k, vs in ms.items()}
    row["paired_over_eager"] = {k: round(statistics.median(
        [a / b for a, b in zip(vs, ms["eager"], strict=True)]), 3) for k, vs in ms.items()}
    with open("/proc/loadavg") as f:
        row["load"] = " ".join(f.read().split()[:3])
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
