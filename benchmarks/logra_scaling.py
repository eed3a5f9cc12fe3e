"""LoGra against dense projected TRAK / Grad-Dot: equal LDS on text-lm, then time and memory at 1M/10M.

    OMP_NUM_THREADS=1 python -m benchmarks.logra_scaling lds                # the equal-LDS search
    OMP_NUM_THREADS=1 python -m benchmarks.logra_scaling scale --params 1e6 --ks 8,16 --d 1024
    OMP_NUM_THREADS=1 python -m benchmarks.logra_scaling scale --params 1e7 --ks 8,16 --d 1024

``lds``: on the bundled ``text-lm`` task (the runner's model 0; ``n_train x n_test`` sequences,
LDS against ``m`` cached half-subset retrainings), LDS of dense projected TRAK (output
``-loss``, ``(Phi^T Phi + damping I)^-1``, the recipe's damping) and Grad-Dot at each ``d`` and
of LoGra (per-layer Kronecker projection ``k x k`` of the captured Linear layers, the damped
inverse of the projected per-layer Fisher, its default damping) at each ``k``, each the mean over
``--seeds`` projection seeds. "Equal LDS" is paired: the difference of the per-test-point LDS of
LoGra k and the dense row (same test points, same retrainings) with its 95% normal interval;
equal means the interval holds 0 (or lies above it). The table names, for each dense row, the
smallest ``k`` at equal LDS.

``scale``: the same architecture (text-lm's one-block transformer) widened to ``--params``
(``dim``, ``hidden = 4 dim``), random init (seeded; time and memory do not depend on training),
on text-lm's tokens: ``prepare + score`` of ``n_train x n_test`` for LoGra ``k`` and the dense
TRAK / Grad-Dot ``d``, each in its own spawned process (:func:`benchmarks.peak.measure_peak`:
the peak resident size above the set-up, after a warm-up on 2 rows of the same model at width
16), one thread. A row still
running after ``--timeout`` s is killed and reported as such. ``uptime``'s load average is
printed before and after, since the machine is shared.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from benchmarks.kron_bench import timed_step
from benchmarks.peak import measure_peak

DAMPING = 1e-3  # the TRAK recipe's damping


def _neg_loss(fm):
    return lambda p, ex: -fm.loss(p, ex)


def _dense(name: str, fm, d: int, seed: int, chunk_size: int | None = None):
    from dattri_fn.attribute import grad_dot, trak

    if name == "trak":
        return trak(_neg_loss(fm), proj_dim=d, seed=seed, damping=DAMPING, chunk_size=chunk_size)
    return grad_dot(fm, proj_dim=d, seed=seed, chunk_size=chunk_size)


def _paired(a, b) -> tuple[float, float, float]:
    """Mean and 95% normal interval of ``a - b`` over the test points both define."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    diff = (a - b)[ok]
    half = 1.96 * float(diff.std()) / math.sqrt(diff.numel())
    mean = float(diff.mean())
    return mean, mean - half, mean + half


def lds_search(n_train: int, n_test: int, m: int, ds, ks, seeds: int) -> None:
    """Print the ``lds`` tables (see the module docstring)."""
    import warnings

    from benchmarks.run import load_models, load_task, train_states
    from dattri_fn.attribute import logra
    from dattri_fn.eval.metrics import lds
    from dattri_fn.eval.retrain import lds_ground_truth
    from dattri_fn.model import functional_model

    warnings.filterwarnings("ignore")
    spec = {"name": "text-lm", "n_train": n_train, "n_test": n_test, "seed": 0, "device": "cpu"}
    task = load_task(spec)
    t0 = time.perf_counter()
    gt = lds_ground_truth(task, m, seed=0, progress=False)
    print(f"ground truth: {time.perf_counter() - t0:.0f} s; load {_load()}")
    fm = functional_model(load_models(task, train_states(task, 1))[0].eval(), task.loss_fn)
    train = [(task.x_train[i:i + 64], task.y_train[i:i + 64]) for i in range(0, n_train, 64)]
    test = (task.x_test, task.y_test)
    P = sum(v.numel() for v in fm.params.values())

    def per_test(build) -> tuple[torch.Tensor, float, int]:
        """Per-test LDS averaged over seeds [n_test], seconds per run, features per example."""
        rows, t, width = [], time.perf_counter(), None
        for seed in range(seeds):
            method = build(seed)
            state = method.prepare(fm.params, train)
            S = method.score(fm.params, state, train, test)
            rows.append(lds(S.double(), gt.subsets, gt.targets.double()).per_test)
            features = getattr(state, "train_features", None)
            width = features.shape[-1] if isinstance(features, torch.Tensor) else None
        return torch.stack(rows).mean(0), (time.perf_counter() - t) / seeds, width

    results = {}
    for name in ("trak", "grad-dot"):
        for d in ds:
            results[(name, d)] = per_test(lambda s, name=name, d=d: _dense(name, fm, d, s))
    for k in ks:
        results[("logra", k)] = per_test(lambda s, k=k: logra(fm, proj_dim=k, seed=s))
    print(f"\n### text-lm, P = {P:,}: n_train={n_train}, n_test={n_test}, m={m} half-subsets, "
          f"means over {seeds} projection seeds; load {_load()}\n")
    print("| method | dim | features | LDS [95% CI] | time s |")
    print("|---|---|---|---|---|")
    for (name, dim), (pt, secs, width) in results.items():
        ok = pt[torch.isfinite(pt)]
        half = 1.96 * float(ok.std()) / math.sqrt(ok.numel())
        feats = width if name == "logra" else dim
        label = f"k={dim}" if name == "logra" else f"d={dim}"
        print(f"| {name} | {label} | {feats} | {float(ok.mean()):.3f} [{float(ok.mean()) - half:.3f}, "
              f"{float(ok.mean()) + half:.3f}] | {secs:.2f} |")
    print("\nLoGra k against each dense row: paired LDS difference (LoGra - dense) [95% CI]\n")
    print("| dense | " + " | ".join(f"logra k={k}" for k in ks) + " | smallest k at equal LDS |")
    print("|---|" + "---|" * (len(ks) + 1))
    for name in ("trak", "grad-dot"):
        for d in ds:
            cells, best = [], "none"
            for k in ks:
                mean, lo, hi = _paired(results[("logra", k)][0], results[(name, d)][0])
                cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
                if best == "none" and hi >= 0:
                    best = str(k)
            print(f"| {name} d={d} | " + " | ".join(cells) + f" | {best} |")


# -- scale ---------------------------------------------------------------------------------------
def _dim_for(params: float, vocab: int, context: int) -> int:
    """The width ``dim`` (a multiple of 4 heads) whose one-block model has about ``params``."""
    count = lambda D: 12 * D * D + (2 * vocab + context + 19) * D + vocab
    D = 4
    while count(D + 4) <= params:
        D += 4
    return D


def _scale_problem(spec: dict):
    from dattri_fn.eval.tasks import TinyLM, get_task
    from dattri_fn.model import functional_model

    task = get_task("text-lm", n_train=spec["n_train"], n_test=spec["n_test"])
    hp = task.hparams
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        D = spec["dim"]
        net = TinyLM(len(task.meta["vocab"]), hp["context"], D, 4, 4 * D).eval()
    fm = functional_model(net, task.loss_fn)
    bs = spec["batch"]
    train = [(task.x_train[i:i + bs], task.y_train[i:i + bs]) for i in range(0, spec["n_train"], bs)]
    return fm, train, (task.x_test, task.y_test)


def _scale_method(name: str, fm, spec: dict):
    from dattri_fn.attribute import logra

    if name.startswith("logra"):
        return logra(fm, proj_dim=int(name.split("=")[1]))
    return _dense(name, fm, spec["d"], 0, chunk_size=spec["chunk"])


def _scale_setup(spec: dict, name: str):
    """Build ``name`` in a spawned process, warmed up on 2 rows of the same model at width 16
    (a warm-up at full width would cost the dense rows two more draws of a [P, d] R); return
    the timed step."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    small = _scale_problem({**spec, "dim": 16})
    warm_fm, warm = small[0], [(small[1][0][0][:2], small[1][0][1][:2])]
    method = _scale_method(name, warm_fm, spec)
    method.score(warm_fm.params, method.prepare(warm_fm.params, warm), warm, warm[0])
    fm, train, test = _scale_problem(spec)
    return timed_step(_scale_method(name, fm, spec), fm, train, test)


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def scale(params: float, ks, d: int, n_train: int, n_test: int, methods, timeout: float,
          chunk: int | None) -> None:
    """Print the ``scale`` table (see the module docstring)."""
    from dattri_fn.eval.tasks import VOCAB

    D = _dim_for(params, len(VOCAB), 32)
    spec = {"dim": D, "n_train": n_train, "n_test": n_test, "batch": 64, "seed": 0, "d": d,
            "chunk": chunk}
    fm, _, _ = _scale_problem(spec)
    P = sum(v.numel() for v in fm.params.values())
    del fm
    print(f"\n### P = {P:,} (dim {D}, hidden {4 * D}), n_train = {n_train}, n_test = {n_test}, "
          f"dense d = {d}, chunk {chunk or 'one batch of 64'}, one thread; load before {_load()}\n")
    print("| method | time s | peak MiB | load after |")
    print("|---|---|---|---|")
    rows = {}
    names = [f"logra k={k}" for k in ks] + list(methods)
    for name in names:
        out = measure_peak(_scale_setup, spec, name, timeout=timeout)
        label = name if name.startswith("logra") else f"{name} dense d={d}"
        if out.get("timeout"):
            print(f"| {label} | > {timeout:.0f} (killed) | | {_load()} |", flush=True)
            continue
        if "error" in out:
            print(f"| {label} | error: {out['error'][:100]} | | {_load()} |", flush=True)
            continue
        rows[name] = out
        print(f"| {label} | {out['result']['time_s']:.2f} | {out['peak_mib']:.0f} | {_load()} |",
              flush=True)
    for lg_name in [n for n in names if n.startswith("logra") and n in rows]:
        lg = rows[lg_name]
        for name in [n for n in methods if n in rows]:
            ratio = lg["result"]["time_s"] / rows[name]["result"]["time_s"]
            print(f"{lg_name} / {name} dense: time {ratio:.4f}x, "
                  f"peak {lg['peak_mib'] / max(rows[name]['peak_mib'], 1e-9):.4f}x")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("lds")
    a.add_argument("--n-train", type=int, default=128)
    a.add_argument("--n-test", type=int, default=64)
    a.add_argument("--subsets", type=int, default=32)
    a.add_argument("--ds", default="64,256,1024")
    a.add_argument("--ks", default="2,4,8,16")
    a.add_argument("--seeds", type=int, default=3)
    b = sub.add_parser("scale")
    b.add_argument("--params", type=float, default=1e6)
    b.add_argument("--ks", default="8,16", help="LoGra k per side, one row each")
    b.add_argument("--d", type=int, default=1024)
    b.add_argument("--n-train", type=int, default=128)
    b.add_argument("--n-test", type=int, default=16)
    b.add_argument("--methods", default="trak,grad-dot", help="dense rows")
    b.add_argument("--timeout", type=float, default=300.0)
    b.add_argument("--chunk", type=int, default=None,
                   help="dense rows per per-sample-gradient call (default: the whole batch of 64)")
    args = p.parse_args(argv)
    if args.mode == "lds":
        lds_search(args.n_train, args.n_test, args.subsets, [int(d) for d in args.ds.split(",")],
                   [int(k) for k in args.ks.split(",")], args.seeds)
    else:
        scale(args.params, [int(k) for k in args.ks.split(",")], args.d, args.n_train,
              args.n_test, args.methods.split(","), args.timeout, args.chunk)


if __name__ == "__main__":
    main()
