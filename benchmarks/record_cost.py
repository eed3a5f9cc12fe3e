"""Per-step cost of recording per-example gradient stores (``training.record``): one store per
step against the append mode (``GradSpec(steps_per_shard=k)``).

    OMP_NUM_THREADS=1 python -m benchmarks.record_cost [--steps 48] [--proj-dim 512]
        [--shards 8 32] [--root DIR] [--repeats 3]

The setting of ``benchmarks.training_methods --optimizer sgd``: digits-mlp (500 training
images, batches of 64), plain SGD, every step's per-example gradients projected to
``--proj-dim`` and stored. Each row runs the same ``--steps`` steps of the user's loop
(``record_step`` then a library SGD step) in this process, into a fresh directory under
``--root`` (default: a temp directory on the disk the store would use), and prints seconds per
step (best of ``--repeats``, the modes interleaved within each repeat):

* ``loop only``: no gradient stores (the training step and the record's bookkeeping);
* ``grads only``: the per-example projected gradients computed at each step, not written
  (the compute every store mode pays);
* ``one store per step``: ``GradSpec(...)`` (four atomic writes, eight fsyncs a step);
* ``append k``: ``GradSpec(..., steps_per_shard=k)`` (two atomic writes per ``k`` steps).

"write s/step" is the row's time less ``grads only``: what writing the stores costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.record_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--proj-dim", type=int, default=512)
    p.add_argument("--shards", type=int, nargs="+", default=[8, 32],
                   help="steps_per_shard values of the append rows")
    p.add_argument("--root", default=None, help="directory for the stores (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def run_loop(fm, data, order, grads, *, compute_only: bool = False) -> float:
    """Seconds per step of the recorded loop (``compute_only``: gradients computed, not stored)."""
    from dattri_fn.training import finish_record, make_step, record_step, sgd, start_record, take
    from dattri_fn.training.record import _grad_features

    opt = sgd(0.2)
    step = make_step(fm, opt)
    params, state = fm.params, opt.init(fm.params)
    rec = start_record("sgd", grads=None if compute_only else grads)
    t0 = time.perf_counter()
    for rows in order:
        batch = take(data, rows)
        rec = record_step(rec, rows, lr=0.2, params=params, opt_state=state, batch=batch)
        if compute_only:
            _grad_features(grads, params)(batch).numpy()
        params, state = step(params, state, batch, torch.ones(len(rows)))
    finish_record(rec, params=params, opt_state=state)
    return (time.perf_counter() - t0) / len(order)


def main(argv=None) -> list[dict]:
    import warnings

    from dattri_fn.eval.tasks import get_task
    from dattri_fn.model import functional_model
    from dattri_fn.training import GradSpec, batch_order

    warnings.simplefilter("ignore")
    args = parse_args(argv)
    torch.set_num_threads(1)
    task = get_task("digits-mlp", n_train=500, n_test=50)
    fm = functional_model(task.make_model(0), task.loss_fn)
    data = (task.x_train, task.y_train)
    order = batch_order(task.n_train, batch_size=64, epochs=20, seed=0)[:args.steps]
    root = tempfile.mkdtemp(prefix="record-cost-", dir=args.root)
    modes = [("loop only", None), ("grads only", "compute"), ("one store per step", None)]
    modes += [(f"append {k}", k) for k in args.shards]
    rows = []
    try:
        spec = lambda path, k=None: GradSpec(fm.loss, path, args.proj_dim, steps_per_shard=k)
        run_loop(fm, data, order[:4], spec(os.path.join(root, "warm")), compute_only=True)
        best = {}
        for r in range(args.repeats):  # modes interleaved: a change of load hits them all
            for name, k in modes:
                path = os.path.join(root, f"{name.replace(' ', '-')}-{r}")
                if name == "loop only":
                    s = run_loop(fm, data, order, None)
                elif name == "grads only":
                    s = run_loop(fm, data, order, spec(path), compute_only=True)
                else:
                    s = run_loop(fm, data, order, spec(path, k if name != "one store per step"
                                                       else None))
                best[name] = min(best.get(name, s), s)
                shutil.rmtree(path, ignore_errors=True)
        rows = [{"mode": name, "s_per_step": best[name]} for name, _ in modes]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    compute = next(r["s_per_step"] for r in rows if r["mode"] == "grads only")
    print(f"\n### Recording per-step gradient stores: digits-mlp, SGD, batches of 64, "
          f"{args.steps} steps, projected to {args.proj_dim}; {os.uname().release}, load "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| mode | s/step | write s/step |")
    print("|---|---|---|")
    for r in rows:
        write = r["s_per_step"] - compute if r["mode"] not in ("loop only", "grads only") else None
        print(f"| {r['mode']} | {r['s_per_step']:.4f} | "
              f"{'' if write is None else f'{write:.4f}'} |")
    return rows


if __name__ == "__main__":
    main()
