"""Cost of applying a capture plan: held (checked once) against checked on every call.

    OMP_NUM_THREADS=1 python -m benchmarks.layer_plan [--task digits-mlp] [--repeats 30]

Median thread CPU time (ms) of ``--repeats`` warm calls on one 256-row batch of a bundled
task (one process):

* ``held``: ``layer_grads_stacked`` with a plan checked once (``check_plan``), C = 1 and 3;
* ``unchecked``: the same call with the unchecked ``layer_plan(fm)`` (checked on every call);
* ``per_sample_layer_grads``: the public call that builds and checks a plan on every call;
* ``grad-dot``: ``grad_dot(fm)`` prepare + score, 500 x 50 in batches of 256, as a user
  writes it.

Run it on two trees (``PYTHONPATH=<tree>``) to compare: a library without ``check_plan``
(before plans were values) holds its plan by mutating it on the first call, which is what
``held`` then measures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="digits-mlp")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()

    from dattri_fn.app.recipes import recipe
    from dattri_fn.attribute.gradsim import grad_dot
    from dattri_fn.eval.tasks import get_task, train_model
    from dattri_fn.model import functional_model
    from dattri_fn.transforms import layer_grads as lg

    task = get_task(args.task, n_train=500, n_test=50, seed=0)
    model = train_model(task, seed=0).eval()
    fm = functional_model(model, task.loss_fn)
    batch = (task.x_train[:256], task.y_train[:256])
    rows = {}
    for C in (1, 3):
        stacked = {k: torch.stack([v] * C) for k, v in fm.params.items()}
        if hasattr(lg, "check_plan"):
            held = lg.check_plan(lg.layer_plan(fm), stacked, batch)
        else:  # before plans were values: the first call upgrades the plan in place
            held = lg.layer_plan(fm)
            lg.layer_grads_stacked(held, stacked, batch)
        rows[f"held plan, C={C}"] = _median_ms(lambda h=held, s=stacked: lg.layer_grads_stacked(
            h, s, batch), args.repeats)
        if hasattr(lg, "check_plan"):
            plan = lg.layer_plan(fm)
            rows[f"unchecked plan, C={C}"] = _median_ms(
                lambda s=stacked: lg.layer_grads_stacked(plan, s, batch), args.repeats)
    rows["per_sample_layer_grads"] = _median_ms(
        lambda: lg.per_sample_layer_grads(fm, fm.params, batch), args.repeats)
    m = grad_dot(fm)
    r = recipe("grad-dot", task, [model], batch_size=256)  # the data as benchmarks.run batches it

    def e2e():
        state = m.prepare(fm.params, r.train)
        m.score(fm.params, state, r.train, r.test)

    rows["grad-dot prepare+score 500x50"] = _median_ms(e2e, max(3, args.repeats // 3))
    print(f"{args.task}: 256-row batch, median thread CPU ms")
    for name, ms in rows.items():
        print(f"  {name:<32} {ms:8.3f}")


if __name__ == "__main__":
    main()
