"""The overflow fixes of stop 25, engineer F2: old vs new, interleaved in ONE process.

    OMP_NUM_THREADS=1 python -m benchmarks.overflow_f2_ab [--rounds 11] [--rev a6bea25^]

Cases (each round runs both sides, alternating which goes first; main-thread CPU time;
medians and the median of the per-round new/old ratios; outputs checked torch.equal):

* ``if-datainf``: the digits-mlp recipe's ``prepare + score``; old = ``ihvp_datainf`` of
  ``git show <rev>:dattri_fn/operators/datainf.py`` loaded beside the current module
  (new: one ``all_finite`` of ``|g|^2`` per block, one ``isfinite`` of the default damping).
* ``less``: ``adam_direction`` + ``unit_rows`` on ``[C=2, B=500, P=2,410]`` float32 (the
  digits-mlp size) as in LESS's train side; old = the formulas before 3098f6f (new: one
  ``all_finite(v)`` and one ``any`` over the row norms), and LESS ``prepare + score`` end to
  end on a 64-32-10 MLP recorded with AdamW (500 train, 50 test).
* ``if-lissa``: the digits-mlp ``matched`` LiSSA (ours) ``prepare + score`` with
  ``influence_inverse.row_scaled`` vs the identity (one ``|V|.amax`` per solve).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _old(rev: str, path: str, name: str):
    src = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    file = os.path.join(tempfile.mkdtemp(), f"{name.rsplit('.', 1)[1]}.py")
    with open(file, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _ab(label: str, run, rounds: int) -> None:
    """``run(new: bool) -> output``; times both sides alternately, checks outputs equal."""
    a, b = run(True), run(False)
    outs = (a, b) if isinstance(a, torch.Tensor) else (a[0], b[0])
    assert torch.equal(*outs), f"{label}: outputs differ"
    times = {True: [], False: []}
    for r in range(rounds):
        for side in ((True, False) if r % 2 == 0 else (False, True)):
            t0 = time.thread_time()
            run(side)
            times[side].append(time.thread_time() - t0)
    ratios = [n / o for n, o in zip(times[True], times[False], strict=True)]
    print(f"{label:34s} old {statistics.median(times[False]) * 1e3:9.2f} ms  new "
          f"{statistics.median(times[True]) * 1e3:9.2f} ms  median new/old "
          f"{statistics.median(ratios):.3f}  (outputs torch.equal)", flush=True)


def _old_adam(G, ck):
    b1, b2 = ck.betas
    t = (ck.counts + 1)[:, None, None]
    m = (b1 * ck.mu[:, None] + (1 - b1) * G) / (1 - b1 ** t)
    v = (b2 * ck.nu[:, None] + (1 - b2) * G * G) / (1 - b2 ** t)
    return m / (v.sqrt() + ck.eps)


def _old_unit(G):
    return G / G.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)


def _less_case(rounds: int) -> None:
    import torch.nn.functional as F
    from torch import nn

    from dattri_fn.model import functional_model
    from dattri_fn.training import (
        adamw,
        batch_order,
        finish_record,
        make_step,
        record_step,
        start_record,
        take,
    )

    less_mod = importlib.import_module("dattri_fn.attribute.less")
    g = torch.Generator().manual_seed(0)
    C, B, P = 2, 500, 2410
    ck = less_mod.RecordedCheckpoints({}, torch.ones(C), torch.tensor([10.0, 30.0]),
                                      1e-2 * torch.randn(C, P, generator=g),
                                      1e-4 * torch.rand(C, P, generator=g), (0.9, 0.999), 1e-8,
                                      (0, 1))
    G = torch.randn(C, B, P, generator=g)
    new_adam, new_unit = less_mod.adam_direction, less_mod.unit_rows
    _ab("less adam_direction+unit_rows", lambda new: (new_unit if new else _old_unit)(
        (new_adam if new else _old_adam)(G, ck)), rounds)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(500, 64, generator=g), torch.randint(0, 10, (500,), generator=g)
    xt, yt = torch.randn(50, 64, generator=g), torch.randint(0, 10, (50,), generator=g)
    opt = adamw(1e-3)
    step = make_step(fm, opt)
    params, state = fm.params, opt.init(fm.params)
    rec = start_record("adamw", checkpoint_every=10)
    for rows in batch_order(500, batch_size=50, epochs=2, seed=0):
        batch = take((x, y), rows)
        rec = record_step(rec, rows, lr=1e-3, params=params, opt_state=state, batch=batch)
        params, state = step(params, state, batch, torch.ones(len(rows)))
    rec = finish_record(rec, params=params, opt_state=state)

    def run(new: bool):
        less_mod.unit_rows = new_unit if new else _old_unit
        less_mod.adam_direction = new_adam if new else _old_adam
        try:
            m = less_mod.less(fm)
            return m.score(rec, m.prepare(rec, (x, y)), (x, y), (xt, yt))
        finally:
            less_mod.unit_rows, less_mod.adam_direction = new_unit, new_adam

    _ab("less prepare+score (64-32-10, 500x50)", run, rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--rev", default="a6bea25^")
    ap.add_argument("--only", default="datainf,less,lissa")
    args = ap.parse_args()
    only = args.only.split(",")
    print(f"load {os.getloadavg()}", flush=True)
    from benchmarks.run import BENCH_HP, runner_for, task_and_models
    from dattri_fn.attribute import influence_inverse
    from dattri_fn.operators import datainf

    task, models = task_and_models("digits-mlp", n_models=1)
    if "datainf" in only:
        old = _old(args.rev, "dattri_fn/operators/datainf.py", "dattri_fn.operators.datainf_old")
        new_fn = datainf.ihvp_datainf
        runner = runner_for("ours", "if-datainf", task, models, BENCH_HP)

        def run(new: bool):
            datainf.ihvp_datainf = new_fn if new else old.ihvp_datainf
            try:
                return runner.score(runner.prepare())
            finally:
                datainf.ihvp_datainf = new_fn

        _ab("digits-mlp if-datainf prepare+score", run, args.rounds)
    if "less" in only:
        _less_case(args.rounds)
    if "lissa" in only:
        runner = runner_for("matched", "if-lissa", task, models, BENCH_HP)
        real = influence_inverse.row_scaled

        def run_l(new: bool):
            influence_inverse.row_scaled = real if new else (lambda inv: inv)
            try:
                return runner.score(runner.prepare())
            finally:
                influence_inverse.row_scaled = real

        _ab("digits-mlp if-lissa (matched) p+s", run_l, max(3, args.rounds // 3))
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
