"""Core transforms against their naive references, measured in the same run.

    python -m benchmarks.primitives [--quick]

Rows: per-sample gradients (vmap vs a Python loop of ``torch.autograd.grad``), the Grad-Dot
Gram ``G G^T`` of a batch (Linear layers factored by ``per_sample_layer_grads`` vs ``vmap``
gradients and a matmul), k HVPs at once
(vmap'd forward-over-reverse vs a loop of double-backward HVPs), chunked projection vs a dense
``X @ R``. Each side runs in its own spawned process; "peak MiB" is that process's peak resident
size minus its size just before the measured step (interpreter, torch import and inputs excluded).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.project_bench import bench_projection, measure_peak_rss


def _mlp(width: int, depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers, d = [], 64
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


def _data(B: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 64, generator=g), torch.randint(0, 10, (B,), generator=g)


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def psg_vmap(width, depth, B, repeats):
    from dattri_fn import functional_model, per_sample_grad

    fm = functional_model(_mlp(width, depth), F.cross_entropy)
    batch = _data(B)
    per_sample_grad(fm.loss, fm.params, (batch[0][:2], batch[1][:2]))
    return lambda: _best(lambda: per_sample_grad(fm.loss, fm.params, batch), repeats)


def psg_loop(width, depth, B, repeats):
    model = _mlp(width, depth)
    x, y = _data(B)
    params = list(model.parameters())

    def run():
        rows = []
        for i in range(B):
            g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(rows)

    return lambda: _best(run, repeats)


def gram_factored(width, depth, B, repeats):
    from dattri_fn import functional_model, per_sample_layer_grads

    fm = functional_model(_mlp(width, depth), F.cross_entropy)
    batch = _data(B)

    def run():
        lg = per_sample_layer_grads(fm, fm.params, batch)
        return lg.scores(lg)

    run()
    return lambda: _best(run, repeats)


def gram_dense(width, depth, B, repeats):
    from dattri_fn import functional_model, per_sample_grad

    fm = functional_model(_mlp(width, depth), F.cross_entropy)
    batch = _data(B)

    def run():
        G = per_sample_grad(fm.loss, fm.params, batch)
        return G @ G.T

    run()
    return lambda: _best(run, repeats)


def hvp_vmap(width, depth, B, k, repeats, mode="fwd-rev"):
    from dattri_fn import functional_model, hvp

    fm = functional_model(_mlp(width, depth), F.cross_entropy)
    op = hvp(fm.loss, fm.params, _data(B), mode=mode)
    V = torch.randn(k, op.dim)
    op(V[:1])
    return lambda: _best(lambda: op(V), repeats)


def hvp_loop(width, depth, B, k, repeats):
    model = _mlp(width, depth)
    x, y = _data(B)
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    V = torch.randn(k, P)

    def run():
        out = []
        for j in range(k):
            loss = F.cross_entropy(model(x), y)
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
            hv = torch.autograd.grad(g @ V[j], params)
            out.append(torch.cat([t.reshape(-1) for t in hv]))
        return torch.stack(out)

    return lambda: _best(run, repeats)


def _row(name, ours, ref):
    t_o, t_r = ours["result"], ref["result"]
    return (f"| {name} | {t_o * 1e3:.1f} | {t_r * 1e3:.1f} | {t_r / t_o:.1f}x | "
            f"{ours['peak_mib']:.1f} | {ref['peak_mib']:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    args = ap.parse_args(argv)
    width, depth, B, k, rep = (32, 1, 64, 8, 2) if args.quick else (128, 2, 256, 32, 3)
    print(f"MLP 64-{width}x{depth}-10, batch {B}, {k} HVP vectors, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| step | ours ms | reference ms | speed-up | ours peak MiB | reference peak MiB |")
    print("|---|---|---|---|---|---|")
    print(_row(f"per-sample grads, B={B} (vmap vs autograd loop)",
               measure_peak_rss(psg_vmap, width, depth, B, rep),
               measure_peak_rss(psg_loop, width, depth, B, rep)))
    print(_row(f"Grad-Dot Gram G G^T, B={B} (factored vs vmap grads + matmul)",
               measure_peak_rss(gram_factored, width, depth, B, rep),
               measure_peak_rss(gram_dense, width, depth, B, rep)))
    hvp_ref = measure_peak_rss(hvp_loop, width, depth, B, k, rep)
    for mode in ("fwd-rev", "rev-rev"):
        print(_row(f"{k} HVPs, hvp(mode={mode!r}) vs double-backward loop",
                   measure_peak_rss(hvp_vmap, width, depth, B, k, rep, mode), hvp_ref))
    P, d, Bp = (20_000, 128, 16) if args.quick else (200_000, 512, 64)
    proj = bench_projection(P=P, d=d, B=Bp, repeats=rep)
    print(f"\nprojection P={P}, d={d}, B={Bp}:")
    print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in proj.items()})


if __name__ == "__main__":
    main()
