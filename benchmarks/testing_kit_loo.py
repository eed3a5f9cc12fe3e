"""How well influence agrees with exact leave-one-out on the kit's convex problems.

    OMP_NUM_THREADS=1 python -m benchmarks.testing_kit_loo            # 10 seeds, ~80 s
    OMP_NUM_THREADS=1 python -m benchmarks.testing_kit_loo --seeds 25  # the documented figures

Prints, per configuration at the smallest sizes ``strategies.problems(fitted=True)`` draws,
the MINIMUM over seeds of the Pearson correlation between the ``[n, n]`` scores and
``exact_loo``: for the exact influence ``g_i^T (H + 1e-3 I)^-1 g_j`` (what ``check_method``'s
default ``min_loo_corr`` must let through), and for two wrong methods at ``cond = 1`` and
``cond = 10``: Grad-Dot (no inverse) and influence multiplying by ``H`` instead of ``H^-1``
(what the bound should reject where ``H^-1`` matters).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from dattri_fn.testing import (
    dense_curvature,
    exact_influence,
    exact_loo,
    linear_regression,
    logistic_regression,
    per_example_grads,
    ridge_regression,
)


def _corr(scores, loo) -> float:
    return float(torch.corrcoef(torch.stack([scores.flatten(), loo.flatten()]))[0, 1])


def _configs():
    for cond, dim in itertools.product((1.0, 10.0, 30.0), (1, 2, 4)):
        n = 8 * (dim + 1)
        for l2 in (0.01, 1.0):
            yield f"ridge cond={cond:g} dim={dim} n={n} l2={l2}", \
                lambda s, n=n, dim=dim, l2=l2, cond=cond: ridge_regression(
                    n=n, dim=dim, seed=s, l2=l2, cond=cond)
        yield f"least squares cond={cond:g} dim={dim} n={n}", \
            lambda s, n=n, dim=dim, cond=cond: linear_regression(n=n, dim=dim, seed=s, fit=True,
                                                                 cond=cond)
    for cond, dim, classes in itertools.product((1.0, 10.0, 30.0), (1, 3), (2, 3)):
        n = max(16, 3 * classes * (dim + 1))
        yield f"logistic cond={cond:g} dim={dim} classes={classes} n={n} l2=0.05", \
            lambda s, n=n, dim=dim, classes=classes, cond=cond: logistic_regression(
                n=n, dim=dim, classes=classes, seed=s, l2=0.05, fit=True, cond=cond)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args(argv)
    seeds = range(args.seeds)
    print(f"exact influence: min correlation with exact LOO over {args.seeds} seeds")
    overall = 1.0
    for label, make in _configs():
        worst = min(_corr(exact_influence(p, damping=1e-3), exact_loo(p))
                    for p in (make(s) for s in seeds))
        overall = min(overall, worst)
        print(f"  {label:52s} {worst:.3f}")
    print(f"  overall minimum {overall:.3f}")
    print("wrong methods (min / max over seeds): Grad-Dot, and H instead of H^-1")
    for cond in (1.0, 10.0):
        for name, make in (("ridge n=32 dim=3", lambda s, c=cond: ridge_regression(
                n=32, dim=3, seed=s, cond=c)), ("logistic n=27 dim=2 classes=3",
                lambda s, c=cond: logistic_regression(n=27, dim=2, classes=3, seed=s, l2=0.05,
                                                      fit=True, cond=c))):
            gd, hh = [], []
            for s in seeds:
                p = make(s)
                loo, G = exact_loo(p), per_example_grads(p.loss, p.params, p.data)
                H = dense_curvature(p, "hessian")
                gd.append(_corr(G @ G.T, loo))
                hh.append(_corr(G @ H @ G.T, loo))
            print(f"  {name:30s} cond={cond:<3g} Grad-Dot {min(gd):.2f}-{max(gd):.2f}   "
                  f"H instead of H^-1 {min(hh):.2f}-{max(hh):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
