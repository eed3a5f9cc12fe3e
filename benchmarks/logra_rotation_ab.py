"""LoGra's several-block scoring: each block's cached factors rotated in it (shipped) against every
cached row rotated at once (8b8b634's form, review RC F1 of stop 25), interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.logra_rotation_ab [--n 16000] [--rounds 21]

The point is :mod:`benchmarks.e18_peak`'s (:mod:`benchmarks.scaling`'s ``synthetic_digits(n)``,
the 64-32-10 tanh MLP, LoGra ``k = 8``), prepared once; at n = 4000 and 16000 its cached rows
are scored in several blocks. Each round times ``score`` (main-thread CPU) with the shipped
``_cached_spans`` and with a copy of it that rotates every cached row first, the order
alternating each round; the tensor peak of each ``score`` is measured once
(:func:`benchmarks.peak.tensor_peak`). Printed: medians, the median of the per-round ratios
(whole / per-block), both peaks, and whether the scores are ``torch.equal``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")


def _whole_rotation(rows_mod):
    """8b8b634's ``_cached_spans``: several blocks take their rows from one rotated copy of every
    cached factor (``a' Q_A``, ``g' Q_G`` of all n rows), each block then its outer products."""
    shipped = rows_mod._cached_spans

    def spans(state, device, block_bytes, eigvecs=None):
        rows, blocks = shipped(state, device, block_bytes, eigvecs)
        if eigvecs is None or state.train_features is not None or len(blocks) == 1:
            return rows, blocks
        rot = {ln: (a.to(device) @ eigvecs[ln][0], g.to(device) @ eigvecs[ln][1])
               for ln, (a, g) in state.train_factors.items()}

        def rotated(s, e):
            import torch

            parts = [(a[s:e], g[s:e]) for a, g in rot.values()]
            b, d = e - s, sum(a.shape[1] * g.shape[1] for a, g in parts)
            outT, start = parts[0][0].new_empty(d, b), 0
            for a, g in parts:
                ko, ki = g.shape[1], a.shape[1]
                torch.mul(g.T[:, None, :], a.T[None, :, :],
                          out=outT[start:start + ko * ki].view(ko, ki, b))
                start += ko * ki
            return outT.T

        return rotated, blocks

    return spans


def main() -> None:
    import torch

    from benchmarks.e18_peak import _run
    from benchmarks.peak import tensor_peak

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16000)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logra_mod = importlib.import_module("dattri_fn.attribute.logra")
    rows_mod = importlib.import_module("dattri_fn.attribute.logra_rows")
    shipped, whole = logra_mod._cached_spans, _whole_rotation(rows_mod)
    _, r = _run("logra", args.n, "ours")
    state = r.method.prepare(r.params, r.train)
    blocks = len(shipped(state, "cpu", logra_mod._BLOCK_BYTES, state.eigvecs)[1])

    def score(spans):
        logra_mod._cached_spans = spans
        try:
            return r.method.score(r.params, state, r.train, r.test)
        finally:
            logra_mod._cached_spans = shipped

    out, peak = {}, {}
    for name, spans in (("per-block", shipped), ("whole", whole)):
        out[name], peak[name] = tensor_peak(lambda s=spans: score(s))
    times: dict = {"per-block": [], "whole": []}
    for i in range(args.rounds):
        order = (("per-block", shipped), ("whole", whole))
        for name, spans in order if i % 2 == 0 else order[::-1]:
            c = time.thread_time()
            score(spans)
            times[name].append(time.thread_time() - c)
    ratio = statistics.median(w / p for w, p in zip(times["whole"], times["per-block"], strict=True))
    load = open("/proc/loadavg").read().split()[0]
    print(f"logra score n={args.n} ({blocks} blocks), {args.rounds} rounds, load {load}")
    for name in times:
        print(f"  {name:10s} cpu {statistics.median(times[name]) * 1e3:8.2f} ms  "
              f"peak {peak[name] / 2**20:7.3f} MiB")
    print(f"  whole / per-block: median per-round ratio {ratio:.3f}; "
          f"scores torch.equal: {torch.equal(out['whole'], out['per-block'])}")


if __name__ == "__main__":
    main()
