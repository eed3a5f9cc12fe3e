"""One capture pass, this tree against earlier checkouts, interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.capture_ab --baseline before=/tmp/base \
        [--baseline head=/tmp/head] [--tasks digits-lr,digits-mlp,text-lm] [--rounds 200]

Each ``--baseline NAME=TREE`` imports ``TREE/dattri_fn`` as ``dattri_fn_NAME`` (a copy in a
temporary folder), so every tree runs the same model, params and rows. Per task, rows:

* ``pass``: the engine's plain pass, ``batched_io(tapped, loss, state, args, kwargs, target,
  None, like)`` (``tapped.probed``, one forward under the capture mode, one ``autograd.grad``)
  over the layers of kinds linear / conv1d / embedding with a weight in ``params``;
* ``factored``: ``layer_grads_paths._factored`` of the model's ``layer_plan`` (the pass plus
  the per-layer assembly, what Grad-Dot's score and LoGra's passes run);
* ``bare``: ``functional_call`` + ``autograd.grad`` of the summed loss, no capture (the floor).

Rows: digits tasks take ``[test, *train]`` as ``benchmarks.g_against`` does (550 rows);
``text-lm`` takes 64 sequences. Every round runs every (tree, row) once in a rotated order;
printed: median thread CPU microseconds and each tree's median per-round ratio to the first.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch


def _load(name: str, tree: str):
    root = tempfile.mkdtemp(prefix="capture_ab_")
    shutil.copytree(os.path.join(tree, "dattri_fn"), os.path.join(root, f"dattri_fn_{name}"))
    sys.path.insert(0, root)
    return importlib.import_module(f"dattri_fn_{name}")


def _rows(task_name: str):
    from dattri_fn.eval.tasks import get_task, train_model

    if task_name == "text-lm":
        task = get_task(task_name, n_train=64, n_test=8, seed=0)
        batch = (task.x_train, task.y_train)
    else:
        task = get_task(task_name, n_train=500, n_test=50, seed=0)
        batch = (torch.cat([task.x_test, task.x_train]), torch.cat([task.y_test, task.y_train]))
    model = train_model(task, seed=0).eval()
    return task, model, batch


def _parts(pkg, task, model, batch) -> dict:
    """``{row: thunk}`` of one tree on one task (module docstring)."""
    cap = importlib.import_module(f"{pkg.__name__}.transforms.capture")
    layers = importlib.import_module(f"{pkg.__name__}.transforms.layers")
    lg = importlib.import_module(f"{pkg.__name__}.transforms.layer_grads")
    paths = importlib.import_module(f"{pkg.__name__}.transforms.layer_grads_paths")
    fm = pkg.functional_model(model, task.loss_fn)
    names = [n for n, s in cap.layer_specs(fm.module).items()
             if s.weight in fm.params and s.kind in ("linear", "conv1d", "embedding")]
    tapped = cap.tap(fm.module, names)
    state = {**fm.fixed, **fm.params}
    args, kwargs, target = layers.unpack_example(batch)
    like = next(iter(fm.params.values()))
    plan = lg.layer_plan(fm)
    stacked = {k: v[None] for k, v in fm.params.items()}

    def bare():
        live = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
        with torch.enable_grad():
            out = torch.func.functional_call(fm.module, {**fm.fixed, **live}, args, kwargs)
            loss = layers.per_example_losses(fm.loss_fn, out, target).sum()
            return torch.autograd.grad(loss, list(live.values()))

    return {"pass": lambda: layers.batched_io(tapped, fm.loss_fn, state, args, kwargs, target,
                                              None, like),
            "factored": lambda: paths._factored(plan, stacked, batch),
            "bare": bare}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return True


def run(trees: dict, tasks: list[str], rounds: int) -> None:
    for task_name in tasks:
        task, model, batch = _rows(task_name)
        parts = {t: _parts(pkg, task, model, batch) for t, pkg in trees.items()}
        names = list(trees)
        out0 = {r: fn() for r, fn in parts[names[0]].items()}
        for t in names[1:]:
            for r, fn in parts[t].items():
                if r == "pass":
                    print(f"  {task_name} {t} pass torch.equal to {names[0]}: "
                          f"{_same(fn(), out0[r])}")
        times = {(t, r): [] for t in names for r in parts[t]}
        keys = list(times)
        for i in range(rounds):
            k = i % len(keys)
            for key in keys[k:] + keys[:k]:
                fn = parts[key[0]][key[1]]
                t0 = time.thread_time()
                fn()
                times[key].append(1e6 * (time.thread_time() - t0))
        print(f"{task_name}: rows {batch[0].shape[0]}, median thread CPU us of {rounds} rounds "
              f"(load {open('/proc/loadavg').read().split()[0]})")
        for r in parts[names[0]]:
            base = times[(names[0], r)]
            line = [f"  {r:9s}"]
            for t in names:
                med = statistics.median(times[(t, r)])
                ratio = statistics.median([x / y for x, y in zip(times[(t, r)], base, strict=True)])
                line.append(f"{t} {med:8.1f} ({ratio:5.3f})")
            print("  ".join(line))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capture_ab",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", action="append", default=[], help="NAME=TREE (repeatable)")
    p.add_argument("--tasks", default="digits-lr,digits-mlp,text-lm")
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import dattri_fn

    trees = {}
    for spec in args.baseline:
        name, _, tree = spec.partition("=")
        trees[name] = _load(name, tree)
    trees["now"] = dattri_fn
    run(trees, args.tasks.split(","), args.rounds)


if __name__ == "__main__":
    main()
