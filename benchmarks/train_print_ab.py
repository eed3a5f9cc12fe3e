"""Cost of the train print (review RU6 H1/M2) against a digits-mlp g_against round of LoGra.

Interleaved in one process, thread CPU time, medians of per-round ratios:
  round:    LoGra prepare + score as benchmarks/g_against.py runs it (ours side)
  noop:     the timer alone, right after a round (its floor)
  take:     train_print.take on that round's train (what prepare adds: weak references only
            for data in memory)
  same:     train_print.check on the same objects (what score adds: no tensor op)
  checksum: train_print.check on equal copies (a DataLoader / reloaded data: one int pass)

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/train_print_ab.py [--rounds 41]
"""

import argparse
import os
import statistics
import time
import warnings

import torch

from benchmarks.run import DEFAULT_SIZES, load_models, load_task, ours_runner, train_states
from dattri_fn.app.recipes import recipe
from dattri_fn.attribute import train_print


def cpu(fn) -> float:
    c0 = time.thread_time()
    fn()
    return time.thread_time() - c0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--task", default="digits-mlp")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, 3))
    hp = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
          "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}
    runner = ours_runner("logra", task, models, hp)
    train = recipe("grad-dot", task, models[:1], batch_size=hp["batch_size"]).train
    copy = [tuple(t.clone() for t in b) for b in train] if isinstance(train, list) else tuple(
        t.clone() for t in train)
    rows = train_print.take("bench", train)
    for _ in range(3):  # warm-up
        runner.score(runner.prepare())
        train_print.take("bench", train)
        train_print.check("bench", copy, rows)
    t = {"round": [], "noop": [], "take": [], "take_again": [], "same": [], "checksum": []}
    for _ in range(args.rounds):
        t["round"].append(cpu(lambda: runner.score(runner.prepare())))
        t["noop"].append(cpu(lambda: None))  # the timer's own floor right after a round
        t["take"].append(cpu(lambda: train_print.take("bench", train)))
        t["take_again"].append(cpu(lambda: train_print.take("bench", train)))  # warm caches
        t["same"].append(cpu(lambda: train_print.check("bench", train, rows)))
        t["checksum"].append(cpu(lambda: train_print.check("bench", copy, rows)))
    layout = ([list(b[0].shape) for b in train] if isinstance(train, list)
              else [list(train[0].shape)])
    print(f"{args.task}: train {layout} + labels, {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    for k in ("noop", "take", "take_again", "same", "checksum"):
        ratio = statistics.median(a / b for a, b in zip(t[k], t["round"], strict=True))
        print(f"  {k:9s} median {statistics.median(t[k]) * 1e6:8.1f} us   "
              f"/ round: {ratio * 100:.2f}%")
    print(f"  round     median {statistics.median(t['round']) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
