"""Interleaved A/B of a held certified plan's batch path, layer_grads._plain_mlp (Grad-Dot's score
pass): A2's stop-25 form (the key guard + the shared layer_grads_certified._mlp_factors /
_mlp_grads helpers) against engineer A's form (ae71d41: the same steps inline, no key guard).
Thread CPU, one process, the order alternated each round; both gradients torch.equal.

    cd /tmp && OMP_NUM_THREADS=1 PYTHONPATH=/work/main nice -n 15 \
        python -m benchmarks.gradsim_plain_ab --rounds 400
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.transforms import layer_grads as lg
from dattri_fn.transforms import mlp_io as _mlp_io


def _old(plan, stacked, batch):
    """engineer A's _plain_mlp (ae71d41), verbatim but for the names."""
    if (plan.loop or plan.rest or plan.autodiff or plan.tie_factors
            or any(kind != "flat" for _, kind in plan.layout)
            or len(plan.layout) != len(plan.layers)
            or next(iter(stacked.values())).shape[0] != 1):
        return None
    first = {k: v[0] for k, v in stacked.items()}
    args, kwargs, target = lg._unpack(plan.model)(batch)
    io = _mlp_io.mlp_io(plan.model.module, plan.model.loss_fn, {**plan.model.fixed, **first},
                        args, kwargs, target, tuple(plan.layers))
    if io is None:
        return None
    return lg._assemble(plan, {n: (a[None], g[None]) for n, (a, g) in io.items()}, {},
                        lead=2)[0]


def _case(name):
    torch.manual_seed(0)
    m = (nn.Linear(64, 10) if name == "lr" else
         nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))).eval()
    fm = functional_model(m, F.cross_entropy)
    batch = (torch.randn(550, 64), torch.randint(0, 10, (550,)))
    stacked = {k: v.detach()[None] for k, v in fm.params.items()}
    plan = lg.check_plan(lg.layer_plan(fm), fm.params, batch)
    return plan, stacked, batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    for name in ("lr", "mlp"):
        plan, stacked, batch = _case(name)
        a, b = _old(plan, stacked, batch), lg._plain_mlp(plan, stacked, batch)
        assert all(torch.equal(s, t) for n in a.factors
                   for s, t in zip(a.factors[n], b.factors[n], strict=True))
        fns = [lambda: _old(plan, stacked, batch), lambda: lg._plain_mlp(plan, stacked, batch)]
        times = [[], []]
        for i in range(args.rounds):
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                c0 = time.thread_time()
                fns[j]()
                times[j].append(time.thread_time() - c0)
        ratio = statistics.median(n / o for o, n in zip(*times, strict=True))
        print(f"  digits-{name}-shaped 550 rows: A's {1e6 * statistics.median(times[0]):.1f} us, "
              f"A2's {1e6 * statistics.median(times[1]):.1f} us, per-round ratio {ratio:.4f}")


if __name__ == "__main__":
    main()
