"""Chunked random projection vs a dense ``X @ R``: time and peak-memory increment, same run.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.project_bench`` (about 15 s on one core).
Each side runs in its own freshly spawned process so that its peak resident set size is its own.
"""

from __future__ import annotations

import time

import torch

from benchmarks.peak import measure_peak


def measure_peak_rss(fn, *args) -> dict:
    """Return ``{"result", "peak_mib", "peak_reset"}`` for ``step = fn(*args); step()``.

    See :func:`benchmarks.peak.measure_peak`; raises ``RuntimeError`` with the child's error.
    """
    out = measure_peak(fn, *args)
    if "error" in out:
        raise RuntimeError(f"measure_peak_rss: the measured child failed: {out['error']}")
    return out


def _inputs(P: int, B: int, seed: int) -> torch.Tensor:
    return torch.randn(B, P, generator=torch.Generator().manual_seed(seed))


def _best_of(fn, repeats: int) -> tuple[float, object]:
    out, best = fn(), float("inf")  # the first call warms up BLAS and the allocator
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _warm_up(kind: str, d: int) -> None:
    """Run both sides once on a tiny problem: first calls page in library code, counted as RSS."""
    from dattri_fn.transforms.project import make_projector

    x = _inputs(64, 2, 0)
    proj = make_projector(64, proj_dim=d, kind=kind)
    proj(x), x @ proj.matrix()


def _chunked_step(P, d, B, kind, repeats, seed):
    from dattri_fn.transforms.project import make_projector

    _warm_up(kind, d)
    X = _inputs(P, B, seed)
    proj = make_projector(P, proj_dim=d, kind=kind, seed=seed)

    def step():
        t, Y = _best_of(lambda: proj(X), repeats)
        return {"time_s": t, "checksum": Y.double().square().sum().sqrt().item(),
                "cached": proj.cacheable, "threads": torch.get_num_threads()}

    return step


def _dense_step(P, d, B, kind, repeats, seed):
    from dattri_fn.transforms.project import make_projector

    _warm_up(kind, d)
    X = _inputs(P, B, seed)
    proj = make_projector(P, proj_dim=d, kind=kind, seed=seed, dtype=X.dtype)

    def step():
        t0 = time.perf_counter()
        R = proj.matrix()
        build = time.perf_counter() - t0
        t, Y = _best_of(lambda: X @ R, repeats)
        return {"time_s": t, "build_s": build,
                "checksum": Y.double().square().sum().sqrt().item()}

    return step


def bench_projection(P: int = 200_000, d: int = 512, B: int = 64, kind: str = "rademacher",
                     repeats: int = 3, seed: int = 0) -> dict:
    """Return times (best of ``repeats``), their ratio and peak-RSS increments (MiB) of both sides.

    ``chunked``: ``make_projector(P, proj_dim=d, kind=kind)(X)``, which regenerates ``R`` block
    by block on every call. ``dense``: ``X @ R`` with ``R = projector.matrix()`` materialised
    once (``dense_build_s``, not in ``dense_s``). Same ``X`` (float32, ``[B, P]``), same ``R``;
    ``max_rel_diff`` compares the two outputs' norms as a sanity check.
    """
    args = (P, d, B, kind, repeats, seed)
    chunked = measure_peak_rss(_chunked_step, *args)
    dense = measure_peak_rss(_dense_step, *args)
    c, r = chunked["result"], dense["result"]
    return {
        "P": P, "d": d, "B": B, "kind": kind, "repeats": repeats,
        "chunked_s": c["time_s"], "dense_s": r["time_s"], "dense_build_s": r["build_s"],
        "ratio_chunked_over_dense": c["time_s"] / r["time_s"],
        "ratio_chunked_over_dense_with_build": c["time_s"] / (r["time_s"] + r["build_s"]),
        "chunked_peak_mib": chunked["peak_mib"], "dense_peak_mib": dense["peak_mib"],
        "dense_matrix_mib": P * d * 4 / 2**20,
        "peak_reset": chunked["peak_reset"] and dense["peak_reset"],
        "chunked_cached": c["cached"],
        "max_rel_diff": abs(c["checksum"] - r["checksum"]) / r["checksum"],
        "threads": c["threads"],
    }


if __name__ == "__main__":
    for kind in ("rademacher", "gaussian", "sjlt"):
        res = bench_projection(kind=kind)
        print(f"{kind:>10}: chunked {res['chunked_s']:.3f}s vs dense X@R {res['dense_s']:.3f}s "
              f"(+ build {res['dense_build_s']:.3f}s) -> ratio {res['ratio_chunked_over_dense']:.2f}"
              f" ({res['ratio_chunked_over_dense_with_build']:.2f} with build); peak RSS "
              f"+{res['chunked_peak_mib']:.1f} MiB vs +{res['dense_peak_mib']:.1f} MiB "
              f"(R alone {res['dense_matrix_mib']:.0f} MiB); norm rel diff "
              f"{res['max_rel_diff']:.1e}" + ("; R cached" if res["chunked_cached"] else ""))
