"""TRAK's weights from the capture pass's margins against their own weight forwards: A/B in ONE process.

    OMP_NUM_THREADS=1 python -m benchmarks.trak_weights_ab --task digits-lr [--rounds 40]

The recipe g_against times (3 models, DEFAULT_SIZES, proj_dim 512): ``prepare + score`` with
``FeatureConfig.weight_from_pass`` forced off (Q by one weight forward per checkpoint, as before)
and as built (Q = sigmoid(-m) from the capture pass's margins), alternated each round; main-thread CPU
time, each side's median and the median of the per-round ratios (new / old). Scores and weights
are compared too (torch.equal).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.run import BENCH_HP, DEFAULT_SIZES, runner_for, task_and_models  # noqa: E402

trak_mod = importlib.import_module("dattri_fn.attribute.trak")
_REAL = trak_mod.feature_calls
_FROM_PASS = [True]


def _feature_calls(func, params, cfg, *rest):
    """trak's feature engine, with Q from the pass only while _FROM_PASS[0] (the A/B switch)."""
    return _REAL(func, params, cfg if _FROM_PASS[0] else cfg._replace(weight_from_pass=False),
                 *rest)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-lr", choices=tuple(DEFAULT_SIZES))
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    task, models = task_and_models(args.task, args.models)
    hp = dict(BENCH_HP)
    r = runner_for("ours", "trak", task, models, hp)
    trak_mod.feature_calls = _feature_calls
    out, cpu = {}, {False: [], True: []}
    for side in (False, True):  # warm-up, and the values compared
        _FROM_PASS[0] = side
        s = r.prepare()
        out[side] = (s.train_weights, r.score(s))
    for _ in range(args.rounds):
        for side in (False, True):
            _FROM_PASS[0] = side
            c0 = time.thread_time()
            r.score(r.prepare())
            cpu[side].append(time.thread_time() - c0)
    _FROM_PASS[0] = True
    trak_mod.feature_calls = _REAL
    ratios = [b / a for a, b in zip(cpu[False], cpu[True], strict=True)]
    print(f"{args.task}: {args.rounds} rounds, load {os.getloadavg()[0]:.2f}; prepare + score "
          f"thread CPU ms: weight forwards {1e3 * statistics.median(cpu[False]):.2f}, from the "
          f"pass {1e3 * statistics.median(cpu[True]):.2f}; median per-round ratio "
          f"{statistics.median(ratios):.3f} (quartiles "
          f"{statistics.quantiles(ratios, n=4)[0]:.3f}-{statistics.quantiles(ratios, n=4)[2]:.3f})")
    print(f"weights torch.equal: {torch.equal(out[False][0], out[True][0])}, scores torch.equal: "
          f"{torch.equal(out[False][1], out[True][1])}")


if __name__ == "__main__":
    main()
