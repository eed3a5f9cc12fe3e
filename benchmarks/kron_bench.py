"""Kronecker-factored vs dense projection at ~1M parameters: time, peak memory, agreement, same run.

    OMP_NUM_THREADS=1 python -m benchmarks.kron_bench            # ~1M-parameter tanh MLP
    OMP_NUM_THREADS=1 python -m benchmarks.kron_bench --width 64 --n-train 64   # a quick look
    OMP_NUM_THREADS=1 python -m benchmarks.kron_bench --lds digits-mlp          # quality at equal d

A ``in -> width -> width -> 10`` tanh MLP (float32, random inputs and labels, seeded: no data
is downloaded) with ``P ~ 1M`` at the defaults. Rows, each measured in its own spawned process
(:func:`benchmarks.peak.measure_peak`: peak resident size above the set-up, after a warm-up on 8
rows), ``prepare + score`` of ``n_train x n_test``:

* ``grad-dot exact``: the factored inner products (no projection), the reference;
* ``grad-dot dense d``: one ``[P, d]`` projection (``d = 3 k^2``, the Kronecker width);
* ``grad-dot kron k``: ``projection="kronecker"``, ``k x k`` per layer, never ``[B, P]``;
* ``trak dense d`` (loss as output, ``Q = 1``) and ``logra k`` (the same Kronecker
  projection, EK-FAC in the projected space).

"corr exact": Pearson of a Grad-Dot row with the exact Grad-Dot (what the projection loses);
"corr trak": Pearson of LoGra with the dense TRAK (two approximations of influence).

``--lds TASK``: Grad-Dot with a dense projection of ``d = 2 k^2`` and with the Kronecker
projection of ``k`` per side (the same ``d`` where every side is wider than ``k``) on a bundled
task (500 x 50, the runner's model 0), LDS against its cached ground truth and Pearson with
the exact Grad-Dot, each the mean over 5 projection seeds.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.peak import measure_peak


def _problem(spec: dict):
    """(FunctionalModel with CE, train, test) of ``spec`` (seeded)."""
    import torch.nn.functional as F
    from torch import nn

    from dattri_fn.model import functional_model

    torch.manual_seed(spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"])
    w, d_in = spec["width"], spec["d_in"]
    net = nn.Sequential(nn.Linear(d_in, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 10))
    n = spec["n_train"] + spec["n_test"]
    x, y = torch.randn(n, d_in, generator=g), torch.randint(0, 10, (n,), generator=g)
    bs = spec["batch"]
    nt = spec["n_train"]
    train = [(x[i:min(nt, i + bs)], y[i:min(nt, i + bs)]) for i in range(0, nt, bs)]
    return functional_model(net.eval(), F.cross_entropy), train, (x[nt:], y[nt:])


def _method(name: str, fm, spec: dict):
    from dattri_fn.attribute import grad_dot, logra, trak

    k = spec["k"]
    d = 3 * k * k
    if name == "grad-dot exact":
        return grad_dot(fm)
    if name == "grad-dot dense":
        return grad_dot(fm, proj_dim=d, chunk_size=spec["batch"])
    if name == "grad-dot kron":
        return grad_dot(fm, proj_dim=k, projection="kronecker")
    if name == "trak dense":
        return trak(fm, proj_dim=d, chunk_size=spec["batch"])
    return logra(fm, proj_dim=k)


def _setup(spec: dict, name: str):
    """Build ``name`` in a spawned process, warm it up on 8 rows; return the timed step."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    fm, train, test = _problem(spec)
    method = _method(name, fm, spec)
    warm = [(train[0][0][:8], train[0][1][:8])]
    method.score(fm.params, method.prepare(fm.params, warm), warm, (test[0][:2], test[1][:2]))
    return timed_step(method, fm, train, test)


def timed_step(method, fm, train, test):
    """``() -> {"time_s", "scores"}``: one timed prepare + score (what measure_peak runs)."""

    def step() -> dict:
        t0 = time.perf_counter()
        state = method.prepare(fm.params, train)
        scores = method.score(fm.params, state, train, test)
        return {"time_s": time.perf_counter() - t0,
                "scores": scores.detach().to(torch.float64).numpy()}

    return step


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


NAMES = ("grad-dot exact", "grad-dot dense", "grad-dot kron", "trak dense", "logra")


def lds_table(task_name: str, ks=(4, 8, 16), seeds: int = 5) -> None:
    """Print the ``--lds`` table (see the module docstring)."""
    import warnings

    from benchmarks import run
    from dattri_fn.attribute import grad_dot
    from dattri_fn.eval.metrics import lds
    from dattri_fn.eval.retrain import lds_ground_truth
    from dattri_fn.model import functional_model

    warnings.filterwarnings("ignore")
    args = run.parse_args(["--task", task_name])
    task = run.load_task(run.task_spec(args))
    gt = lds_ground_truth(task, args.subsets, cache_dir=args.cache_dir, seed=0, progress=False)
    fm = functional_model(run.load_models(task, run.train_states(task, 1))[0].eval(), task.loss_fn)
    bs = args.batch_size
    train = [(task.x_train[i:i + bs], task.y_train[i:i + bs]) for i in range(0, task.n_train, bs)]
    test = (task.x_test, task.y_test)
    quality = lambda S: float(lds(S, gt.subsets, gt.targets.to(S.dtype)).mean)
    exact = grad_dot(fm).score(fm.params, (), train, test)
    print(f"\n{task_name}: exact Grad-Dot LDS {quality(exact):.3f}; means over {seeds} seeds\n")
    print("| k | d dense / kron | LDS dense | LDS kron | corr exact dense | corr exact kron |")
    print("|---|---|---|---|---|---|")
    for k in ks:
        rows = []
        for seed in range(seeds):
            kron = grad_dot(fm, proj_dim=k, projection="kronecker", seed=seed)
            dense = grad_dot(fm, proj_dim=2 * k * k, seed=seed)
            S_d, S_k = (m.score(fm.params, (), train, test) for m in (dense, kron))
            rows.append([quality(S_d), quality(S_k), _corr(S_d, exact), _corr(S_k, exact)])
        m = torch.tensor(rows).mean(0).tolist()
        d_kron = _kron_dim(fm, k)
        print(f"| {k} | {2 * k * k} / {d_kron} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} |")


def _kron_dim(fm, k: int) -> int:
    from dattri_fn.transforms.kronecker import kronecker_layers, make_kronecker_projector
    from dattri_fn.transforms.layer_grads import layer_plan

    layers, rest = kronecker_layers(layer_plan(fm), fm.params)
    return make_kronecker_projector(layers, proj_dim=k, rest=rest).proj_dim


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=16, help="Kronecker k per side (dense d = 3 k^2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(NAMES))
    p.add_argument("--lds", default=None, metavar="TASK",
                   help="instead: dense vs Kronecker Grad-Dot LDS on a bundled task")
    args = p.parse_args(argv)
    if args.lds:
        lds_table(args.lds)
        return {}
    spec = {"d_in": args.d_in, "width": args.width, "n_train": args.n_train,
            "n_test": args.n_test, "batch": args.batch, "k": args.k, "seed": args.seed}
    w = args.width
    P = args.d_in * w + w + w * w + w + w * 10 + 10
    rows = {}
    for name in args.methods.split(","):
        out = measure_peak(_setup, spec, name)
        if "error" in out:
            rows[name] = {"error": out["error"]}
            continue
        rows[name] = {**out["result"], "peak_mib": out["peak_mib"],
                      "scores": torch.from_numpy(out["result"]["scores"])}
    ref = rows.get("grad-dot exact", {}).get("scores")
    trak_s = rows.get("trak dense", {}).get("scores")
    k, d = args.k, 3 * args.k * args.k
    print(f"\nP = {P:,}, n_train = {args.n_train}, n_test = {args.n_test}, k = {k}, d = {d}, "
          f"one thread\n")
    print("| method | time s | peak MiB | corr exact | corr trak |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        label = {"grad-dot dense": f"grad-dot dense d={d}", "grad-dot kron": f"grad-dot kron k={k}",
                 "trak dense": f"trak dense d={d}", "logra": f"logra k={k}"}.get(name, name)
        if "error" in r:
            print(f"| {label} | error: {r['error'][:80]} | | | |")
            continue
        ce = f"{_corr(r['scores'], ref):.4f}" if ref is not None and name.startswith("grad-dot") else ""
        ct = f"{_corr(r['scores'], trak_s):.4f}" if trak_s is not None and name == "logra" else ""
        print(f"| {label} | {r['time_s']:.3f} | {r['peak_mib']:.1f} | {ce} | {ct} |")
    return rows


if __name__ == "__main__":
    main()
