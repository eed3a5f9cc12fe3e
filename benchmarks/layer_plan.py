"""Cost of applying a capture plan: held (checked once) against checked on every call.

    OMP_NUM_THREADS=1 python -m benchmarks.layer_plan [--task digits-mlp] [--repeats 30]
    OMP_NUM_THREADS=1 python -m benchmarks.layer_plan --trees /tmp/s17tree,/tmp/s18tree,. \
        --rounds 3 [--repeats 15]

Median thread CPU time (ms) of ``--repeats`` warm calls on a bundled task (one process):

* ``held``: ``layer_grads_stacked`` on one 256-row batch with a plan checked once
  (``check_plan``), C = 1 and 3;
* ``unchecked``: the same call with the unchecked ``layer_plan(fm)`` (checked on every call);
* ``per_sample_layer_grads``: the public call that builds and checks a plan on every call;
* ``grad-dot prepare+score``: ``grad_dot(fm)`` prepare + score, 500 x 50 in batches of 256,
  as a user writes it (``recipe("grad-dot")``); ``grad-dot prepare``: prepare alone (where a
  capture plan is checked once since stop 19); ``grad-dot score``: score alone on a state
  prepared once;
* ``tracin C=3``: ``recipe("tracin")`` over 3 models (seeds 0-2), prepare + score and score
  alone; ``trak``: ``recipe("trak")`` over one model, likewise.

``--trees``: run this measurement in each tree (``PYTHONPATH=<tree>``, one subprocess per tree
and round, the order rotated every round) and print every round's numbers and each row's range
per tree. A library without ``check_plan`` (before plans were values) holds its plan by mutating
it on the first call, which is what ``held`` then measures; one whose ``prepare`` returns ``()``
checks inside ``score``, so its two e2e rows then differ only by the prepare call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return 1e3 * statistics.median(times)


def measure(task_name: str, repeats: int) -> dict[str, float]:
    """Every row's median thread CPU ms in this process (the dattri_fn on sys.path)."""
    from dattri_fn.app.recipes import recipe
    from dattri_fn.eval.tasks import get_task, train_model
    from dattri_fn.model import functional_model
    from dattri_fn.transforms import layer_grads as lg

    task = get_task(task_name, n_train=500, n_test=50, seed=0)
    models = [train_model(task, seed=s).eval() for s in range(3)]
    fm = functional_model(models[0], task.loss_fn)
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
            h, s, batch), repeats)
        if hasattr(lg, "check_plan"):
            plan = lg.layer_plan(fm)
            rows[f"unchecked plan, C={C}"] = _median_ms(
                lambda s=stacked: lg.layer_grads_stacked(plan, s, batch), repeats)
    rows["per_sample_layer_grads"] = _median_ms(
        lambda: lg.per_sample_layer_grads(fm, fm.params, batch), repeats)
    for name, label, ms in (("grad-dot", "grad-dot", models[:1]), ("tracin", "tracin C=3", models),
                            ("trak", "trak", models[:1])):
        r = recipe(name, task, ms, batch_size=256)  # the data as benchmarks.run batches it
        m = r.method
        state = m.prepare(r.params, r.train)

        def e2e(m=m, r=r):
            m.score(r.params, m.prepare(r.params, r.train), r.train, r.test)

        reps = max(3, repeats // 3)
        rows[f"{label} prepare"] = _median_ms(lambda m=m, r=r: m.prepare(r.params, r.train), reps)
        rows[f"{label} prepare+score 500x50"] = _median_ms(e2e, reps)
        rows[f"{label} score (prepared once)"] = _median_ms(
            lambda m=m, r=r, s=state: m.score(r.params, s, r.train, r.test), reps)
    return rows


def _interleaved(trees: list[str], rounds: int, task: str, repeats: int) -> None:
    script = Path(__file__).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    got: dict[str, list[dict]] = {t: [] for t in trees}
    for r in range(rounds):
        order = trees[r % len(trees):] + trees[:r % len(trees)]
        for tree in order:
            out = subprocess.run([sys.executable, str(script), "--task", task, "--repeats",
                                  str(repeats), "--json"], env={**env, "PYTHONPATH": tree},
                                 cwd=tree, capture_output=True, text=True, check=True)
            got[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
            load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() \
                else "?"
            print(f"round {r} {tree} (load {load}): " + ", ".join(
                f"{k}={v:.2f}" for k, v in got[tree][-1].items()), flush=True)
    names = list(dict.fromkeys(k for runs in got.values() for run in runs for k in run))
    print(f"\n{task}: median thread CPU ms, min-max over {rounds} rounds")
    print(f"  {'':<36}" + "".join(f"{Path(t).name or t:>22}" for t in trees))
    for k in names:
        cells = []
        for t in trees:
            v = [run.get(k, math.nan) for run in got[t]]
            v = [x for x in v if not math.isnan(x)]
            cells.append(f"{min(v):.2f}-{max(v):.2f}" if v else "-")
        print(f"  {k:<36}" + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="digits-mlp")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--trees", default=None, help="comma-separated source trees to interleave")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON line of the rows")
    args = ap.parse_args()
    if args.trees:
        _interleaved([str(Path(t).resolve()) for t in args.trees.split(",")], args.rounds,
                     args.task, args.repeats)
        return
    rows = measure(args.task, args.repeats)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.task}: median thread CPU ms")
    for name, ms in rows.items():
        print(f"  {name:<36} {ms:8.3f}")


if __name__ == "__main__":
    main()
