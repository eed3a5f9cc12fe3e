"""A tied LM's Kronecker block from its members' factors against its dense ``[B, V D]`` rows.

A toy LM (Embedding V x D, one Linear D x D, head tied to the Embedding, T positions) in float32:
one batch's gradients through a checked plan and their Kronecker projection (``proj_dim`` per
side), with the tie's rows formed (``dense_rows``, the path before stop 23) and kept as factors
(``LayerPlan.tie_factors``, after F_to_D.patch), alternated over rounds in one process: the median
thread CPU time and the exact tensor peak of each (``benchmarks.peak.tensor_peak``), and the
largest difference of the projected rows. Run: ``OMP_NUM_THREADS=1 nice -n 15 python -m
benchmarks.tie_factors_bench --vocab 16000 --dim 64``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.peak import tensor_peak


class _TiedLM(nn.Module):
    def __init__(self, V: int, D: int):
        super().__init__()
        self.tok, self.fc, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V)
        self.head.weight = self.tok.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.tok(ids))))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--T", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    from dattri_fn.model import functional_model
    from dattri_fn.transforms.kronecker import kronecker_layers, make_kronecker_projector
    from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan

    torch.manual_seed(0)
    V, D, T, B = a.vocab, a.dim, a.T, a.batch

    def loss(logits, y):
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())

    fm = functional_model(_TiedLM(V, D).eval(), loss)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g))
    plan = check_plan(layer_plan(fm), fm.params, batch)
    if "tie_factors" not in plan._fields:
        raise SystemExit("needs F_to_D.patch (LayerPlan.tie_factors)")
    plans = {"rows": plan, "factors": plan._replace(tie_factors=True)}
    layers, rest = kronecker_layers(plan, fm.params)
    kp = make_kronecker_projector(layers, proj_dim=a.k, seed=0, rest=rest)
    stacked = {k: v[None] for k, v in fm.params.items()}

    def step(which):
        return kp.layer_grads(layer_grads_stacked(plans[which], stacked, batch))

    out = {w: step(w) for w in plans}  # warm both
    diff = float((out["rows"] - out["factors"]).abs().max() / out["rows"].abs().max())
    cpu = {w: [] for w in plans}
    for _ in range(a.rounds):
        for w in plans:
            t0 = time.thread_time()
            step(w)
            cpu[w].append(time.thread_time() - t0)
    peak = {w: tensor_peak(lambda w=w: step(w))[1] / 2**20 for w in plans}
    med = {w: statistics.median(v) * 1e3 for w, v in cpu.items()}
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"V={V} D={D} T={T} B={B} k={a.k} (load {' '.join(load)})")
    print("| tie as | CPU ms (median) | tensor peak MiB |")
    print("|---|---|---|")
    for w in plans:
        print(f"| {w} | {med[w]:.1f} | {peak[w]:.2f} |")
    print(f"ratio factors/rows: CPU {med['factors'] / med['rows']:.3f}, "
          f"peak {peak['factors'] / peak['rows']:.3f}; max rel. difference {diff:.2e}")
    return {"cpu_ms": med, "peak_mib": peak, "diff": diff}


if __name__ == "__main__":
    main()
