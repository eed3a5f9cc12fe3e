"""Gauss-Newton CG influence, a baseline tree against this one, interleaved in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.gn_ab --baseline /tmp/b_before [--case large]
        [--rounds 5]

``--baseline`` is a checkout of an earlier commit (``git worktree add /tmp/b_before <commit>``);
its ``dattri_fn`` is copied to a temporary folder as the package ``dattri_fn_base`` (its
imports are relative), so both versions run side by side on the same model, data and test
gradients. Each round times, in thread CPU seconds (steadier than wall time while others load
the machine), one ``k``-row factored Gauss-Newton product, the bare block CG solve of the
``k`` test gradients (``rtol = 1e-6``) and the whole ``influence(fm, solver="cg", ...)``
prepare + score of :mod:`benchmarks.defaults_gn`, baseline then this tree; the printout has
min and median per row, the load average before and after each round, the steps each block
CG took and the scores' max relative difference.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch

from benchmarks.defaults_gn import CASES, KEYS, _case


def _load_baseline(tree: str):
    """Import ``tree``/dattri_fn as ``dattri_fn_base`` (a copy in a temporary folder)."""
    root = tempfile.mkdtemp(prefix="gn_ab_")
    shutil.copytree(os.path.join(tree, "dattri_fn"), os.path.join(root, "dattri_fn_base"))
    sys.path.insert(0, root)
    return importlib.import_module("dattri_fn_base")


def _parts(pkg, fm, train, test, opts):
    """``{name: thunk}`` of one tree: product, block CG, influence."""
    gauss_newton = importlib.import_module(f"{pkg.__name__}.operators").gauss_newton
    block_cg = importlib.import_module(f"{pkg.__name__}.solve.block_cg")
    influence = importlib.import_module(f"{pkg.__name__}.attribute").influence
    fm = pkg.functional_model(fm.module, fm.loss_fn)
    G = pkg.per_sample_grad(fm.loss, fm.params, test).contiguous()
    op = gauss_newton(fm)(fm.params, train)
    damping = opts["damping"] + 2 * opts["l2"]
    tol = 1e-6 * G.norm(dim=1)
    damped = lambda V: op.matmat(V).add(V, alpha=damping)  # noqa: E731
    method = influence(fm, **opts)
    return {"product": lambda: op.matmat(G),
            "block CG": lambda: block_cg._block(damped, None, G, tol, 100, "gn_ab"),
            "influence": lambda: method.score(fm.params, method.prepare(fm.params, train),
                                              train, test)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="a checkout of the commit to compare with")
    ap.add_argument("--case", default="large")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import dattri_fn

    base = _load_baseline(args.baseline)
    label = KEYS[args.case]
    task, fm, train, opts = _case(label)
    test = (task.x_test, task.y_test)
    rows = {}
    for tag, pkg in (("baseline", base), ("this tree", dattri_fn)):
        for name, fn in _parts(pkg, fm, train, test, opts).items():
            rows[f"{name}, {tag}"] = fn
    out = {name: fn() for name, fn in rows.items()}  # warm-up, and the values compared below
    S0, S1 = out["influence, baseline"], out["influence, this tree"]
    print(f"{label}, {CASES[label][0]} x {CASES[label][1]}: block CG steps "
          f"{int(out['block CG, baseline'][1].max())} (baseline), "
          f"{int(out['block CG, this tree'][1].max())} (this tree); scores max rel diff "
          f"{float((S1 - S0).abs().max() / S0.abs().max()):.1e}")
    times: dict = {name: [] for name in rows}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, fn in rows.items():
            t0 = time.thread_time()
            fn()
            times[name].append(time.thread_time() - t0)
        loads.append(os.getloadavg()[0])
    print("| part | min CPU s | median CPU s | median / baseline |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        ref = statistics.median(times[name.replace("this tree", "baseline")])
        print(f"| {name} | {min(ts):.3f} | {statistics.median(ts):.3f} | "
              f"{statistics.median(ts) / ref:.2f} |")
    print("load per round: " + " ".join(f"{x:.2f}" for x in loads))


if __name__ == "__main__":
    main()
