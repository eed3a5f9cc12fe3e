"""Thread CPU time of MAGIC's reverse pass: settings per step, and recipe("magic-ens") per task.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_speed --task digits-cnn --steps 24 --chunks 5,10,25
    OMP_NUM_THREADS=1 python -m benchmarks.magic_speed --task text-lm --full

``--steps L``: one run of the task (init seed 0; the digits tasks under ``SGD_HPARAMS``, text-lm
under its own full-batch Adam), trained twice (``checkpoint_every = ceil(sqrt(T))`` and 1), and
``metagradient(horizon=L)`` (the last ``L`` steps) timed per step for each setting, the settings
interleaved within each of ``--rounds`` rounds: ``(checkpoint_every, chunk_size)`` for the
default ``ceil(sqrt(T))`` and 1 with all targets in one vmap, then 1 with each of ``--chunks``.
Each row also prints the largest difference from the first setting's weights, relative to their
largest (0.0: bit for bit). ``--gemm-conv`` adds rows (every state kept, each of ``--chunks``) whose
reverse pass differentiates the recipe's ``vjp_step`` with the first Conv2d as one GEMM
(:mod:`dattri_fn.training.gemm_conv`); ``--no-sqrt`` drops the ``ceil(sqrt(T))`` row:

    OMP_NUM_THREADS=1 python -m benchmarks.magic_speed --task digits-cnn --steps 6 --chunks 10 \
        --rounds 10 --gemm-conv --no-sqrt

``--full``: ``recipe("magic-ens")``'s method on the task's 3 models (``--recipe magic``: the one
run of model 0), prepare + score after a warm-up on a slice, thread CPU seconds and wall
seconds (``--keep-heap``: after :func:`~dattri_fn.training.keep_heap`), in the tree
``dattri_fn`` is imported from (for a "before" row run this file with ``PYTHONPATH=<older
worktree>``; the tree is printed). The machine load is printed with each row.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence

import torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_speed",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-cnn",
                   choices=("digits-lr", "digits-mlp", "digits-cnn", "text-lm"))
    p.add_argument("--steps", type=int, default=24, help="L: reverse steps timed per setting")
    p.add_argument("--chunks", default="10", help="chunk sizes to time (comma-separated)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gemm-conv", action="store_true",
                   help="also time vjp_step with the first conv as a GEMM (the recipe's; "
                        "every state kept, each of --chunks)")
    p.add_argument("--no-sqrt", action="store_true",
                   help="skip the checkpoint_every = ceil(sqrt(T)) setting")
    p.add_argument("--full", action="store_true", help="time recipe('magic-ens') instead")
    p.add_argument("--recipe", default="magic-ens", choices=("magic", "magic-ens"),
                   help="--full: the recipe timed")
    p.add_argument("--keep-heap", action="store_true",
                   help="--full: call training.keep_heap() first (process-wide, permanent)")
    p.add_argument("--save", default=None, help="--full: save the scores [n_train, n_test] here")
    p.add_argument("--n-train", type=int, default=None, help="default 500 (text-lm 128)")
    p.add_argument("--n-test", type=int, default=None, help="default 50 (text-lm 16)")
    args = p.parse_args(argv)
    lm = args.task == "text-lm"
    args.n_train = args.n_train or (128 if lm else 500)
    args.n_test = args.n_test or (16 if lm else 50)
    args.chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    return args


def load(args):
    from dattri_fn.eval.tasks import SGD_HPARAMS, get_task

    hparams = None if args.task == "text-lm" else dict(SGD_HPARAMS)
    return get_task(args.task, n_train=args.n_train, n_test=args.n_test, seed=0, hparams=hparams)


def load_avg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def full(args) -> dict:
    """Thread CPU and wall seconds of recipe(args.recipe) prepare + score on the task."""
    from dattri_fn.app.recipes import recipe
    from dattri_fn.eval.tasks import train_model

    if args.keep_heap:
        from dattri_fn.training import keep_heap

        args.keep_heap = keep_heap()
    task = load(args)
    models = [train_model(task, seed=c) for c in range(3 if args.recipe == "magic-ens" else 1)]
    rec = recipe(args.recipe, task, models)
    method, params, data, test = rec.method, rec.params, rec.train, rec.test
    few = (data[0][:32], data[1][:32])
    method.score(params, method.prepare(params, few), few, (test[0][:2], test[1][:2]))
    w0, c0 = time.perf_counter(), time.thread_time()
    state = method.prepare(params, data)
    c1 = time.thread_time()
    scores = method.score(params, state, data, test)
    c2, w2 = time.thread_time(), time.perf_counter()
    if args.save:
        torch.save(scores, args.save)
    import dattri_fn

    row = {"task": args.task, "recipe": args.recipe, "tree": dattri_fn.__file__.rsplit("/dattri_fn/", 1)[0],
           "prepare_cpu_s": c1 - c0, "score_cpu_s": c2 - c1,
           "total_cpu_s": c2 - c0, "wall_s": w2 - w0, "keep_heap": args.keep_heap,
           "load": load_avg()}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    return row


def per_step(args) -> dict:
    """ms of thread CPU per reverse step for each (checkpoint_every, chunk_size) setting."""
    from torch.func import grad, vmap

    from dattri_fn.attribute.magic import metagradient
    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.eval.tasks import adam_run, sgd_run, task_step
    from dattri_fn.model import functional_model
    from dattri_fn.training import make_step, train

    task = load(args)
    hp = task.hparams
    fm = functional_model(task.make_model(0), task.loss_fn)
    if hp["optimizer"] == "sgd":
        opt, order = sgd_run(task.n_train, seed=0, epochs=hp["epochs"], lr=hp["lr"],
                             weight_decay=hp.get("weight_decay", 0.0),
                             batch_size=hp["batch_size"], momentum=hp["momentum"])
        step = make_step(fm, opt)
        target = functional_model(task.make_model(0), classification_margin_loss).loss
    else:
        opt, order = adam_run(task.n_train, epochs=hp["epochs"], lr=hp["lr"])
        step = task_step(fm, opt, hp["weight_decay"])
        target = lambda p, ex: -fm.loss(p, ex)
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    T = len(order)
    L = min(args.steps, T)
    sqrt_every = max(1, math.ceil(math.sqrt(T)))
    trajs = {e: train(step, fm.params, opt.init(fm.params), data, order, checkpoint_every=e)
             for e in {sqrt_every, 1}}
    cot = vmap(grad(target), in_dims=(None, 0))(trajs[1].params, test)
    settings = [] if args.no_sqrt else [(sqrt_every, None, None)]
    settings += [(1, None, None)] + [(1, c, None) for c in args.chunks]
    vjp_steps = {None: None}
    if args.gemm_conv:
        from dattri_fn.app.recipes import _gemm_vjp_step

        vjp_steps["gemm"] = _gemm_vjp_step(task.make_model(0), task.loss_fn, opt)
        settings += [(1, c, "gemm") for c in args.chunks]
    ms: dict[tuple, list[float]] = {s: [] for s in settings}
    diff: dict[tuple, float] = {}
    ref = None
    for _ in range(args.rounds):
        for every, chunk, vjp in settings:
            t0 = time.thread_time()
            out = metagradient(step, trajs[every], data, order, cot, horizon=L,
                               chunk_size=chunk, vjp_step=vjp_steps[vjp]).weights
            ms[every, chunk, vjp].append((time.thread_time() - t0) / L * 1e3)
            ref = out if ref is None else ref
            diff[every, chunk, vjp] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    print(f"\n### {args.task}: thread CPU ms per reverse step (last {L} of T = {T} steps, "
          f"k = {args.n_test} targets), load {load_avg()}\n")
    print("| checkpoint_every | chunk_size | vjp_step | ms / step, each round | median | max diff "
          "from the first / max |")
    print("|---|---|---|---|---|---|")
    for key in settings:
        every, chunk, vjp = key
        print(f"| {every} | {chunk or 'all'} | {vjp or 'step'} | "
              + ", ".join(f"{v:.1f}" for v in ms[key])
              + f" | {statistics.median(ms[key]):.1f} | {diff[key]:.3g} |")
    return {"ms": ms, "diff": diff}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    return full(args) if args.full else per_step(args)


if __name__ == "__main__":
    main()
