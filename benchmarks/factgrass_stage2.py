"""FactGraSS's stage 2 (a count-sketch ``R [w, d]``, one +-1 per row) applied to ``S = vec(g' a'^T)``
three ways, interleaved in one process: main-thread CPU, median and per-round ratio to the dense one.

    OMP_NUM_THREADS=1 python -m benchmarks.factgrass_stage2 [--rows 500] [--k 16,16] [--rounds 101]

* ``dense``: ``S @ R`` (what :func:`dattri_fn.attribute.factgrass_blocks._stage_two` does below
  ``_DENSE_STAGE2`` entries: one GEMM, bits of record);
* ``index_add``: ``S^T`` formed transposed, signs applied, ``index_add_`` into ``[d, b]`` rows;
* ``padded``: ``S``'s columns gathered into zero-padded buckets ``[b, d, m]``, signed, summed.

The sparse ones touch ``w`` instead of ``w d`` numbers per row but sum in another order (float32:
~1e-7 relative from the GEMM's); printed as the largest difference relative to the largest value.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.factgrass_stage2")
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--k", default="16,16", help="k_out,k_in (w = k_out k_in)")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--rounds", type=int, default=101)
    p.add_argument("--float64", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dt = torch.float64 if args.float64 else torch.float32
    ko, ki = map(int, args.k.split(","))
    b, w, d = args.rows, ko * ki, args.d
    gen = torch.Generator().manual_seed(0)
    h = torch.randint(0, d, (w,), generator=gen)
    s = (torch.randint(0, 2, (w,), generator=gen) * 2 - 1).to(dt)
    R = torch.zeros(w, d, dtype=dt)
    R[torch.arange(w), h] = s
    g, a = torch.randn(b, ko, generator=gen, dtype=dt), torch.randn(b, ki, generator=gen, dtype=dt)
    m = int(torch.bincount(h, minlength=d).max())
    order = torch.argsort(h, stable=True)
    counts = torch.bincount(h, minlength=d)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(w) - starts[h[order]]
    idx = torch.full((d, m), w)
    sg = torch.zeros(d, m, dtype=dt)
    idx[h[order], slot] = order
    sg[h[order], slot] = s[order]
    flat = idx.flatten()

    def dense():
        return (g[:, :, None] * a[:, None, :]).flatten(1) @ R

    def index_add():
        ST = (g.T[:, None, :] * a.T[None, :, :]).view(w, b).mul_(s[:, None])
        return torch.zeros(d, b, dtype=dt).index_add_(0, h, ST).T

    def padded():
        S = torch.empty(b, w + 1, dtype=dt)
        torch.mul(g[:, :, None], a[:, None, :], out=S[:, :w].view(b, ko, ki))
        S[:, w] = 0
        return (S[:, flat].view(b, d, m) * sg).sum(-1)

    ways = {"dense": dense, "index_add": index_add, "padded": padded}
    ref = dense()
    times = {n: [] for n in ways}
    names = list(ways)
    for r in range(args.rounds):
        for n in names[r % 3:] + names[:r % 3]:
            t0 = time.thread_time()
            ways[n]()
            times[n].append(1e6 * (time.thread_time() - t0))
    print(f"stage 2, b={b} w={w} ({ko}x{ki}) d={d} {dt}, max bucket {m}, {args.rounds} rounds "
          f"(load {os.getloadavg()[0]:.2f})")
    for n, f in ways.items():
        got = f()
        ratio = statistics.median(x / y for x, y in zip(times[n], times["dense"], strict=True))
        diff = float((got - ref).abs().max() / ref.abs().max())
        print(f"  {n:10s} {statistics.median(times[n]):9.1f} us  /dense {ratio:6.3f}  rel diff {diff:.1e}")


if __name__ == "__main__":
    main()
