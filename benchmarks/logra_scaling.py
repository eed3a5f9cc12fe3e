"""LoGra against dense projected TRAK / Grad-Dot: equal LDS on text-lm, then time and memory at 1M/10M.

    OMP_NUM_THREADS=1 python -m benchmarks.logra_scaling lds                # the equal-LDS search
    OMP_NUM_THREADS=1 python -m benchmarks.logra_scaling lds --params 1e6 --subsets 64 \
        --ds 256,1024 --ks 8,16 --seeds 2 --cache-dir benchmarks/.cache/logra_lds
    OMP_NUM_THREADS=1 python -m benchmarks.logra_scaling scale --params 1e6 --ks 8,16 --d 1024
    OMP_NUM_THREADS=1 python -m benchmarks.logra_scaling scale --params 1e7 --ks 8,16 --d 1024

``lds``: on ``text-lm`` (the runner's model 0; ``n_train x n_test`` sequences, LDS against ``m``
cached half-subset retrainings), LDS of dense projected TRAK (output ``-loss``,
``(Phi^T Phi + damping I)^-1``, the recipe's damping) and Grad-Dot at each ``d`` and of LoGra
(per-layer Kronecker projection ``k x k`` of the captured Linear layers, the damped inverse of
the projected per-layer Fisher, its default damping) at each ``k``, each the mean over ``--seeds``
projection seeds. "Equal LDS" is paired: the difference of the per-test-point LDS of LoGra k and
the dense row (same test points, same retrainings) with its 95% normal interval; equal means the
interval holds 0 (or lies above it). The table names, for each dense row, the smallest ``k`` at
equal LDS, with LoGra's CPU time and peak memory as shares of the dense row's. The model is the
bundled one (P = 15,872) or, with ``--params``, its transformer widened to about that many
parameters (``dim`` from the count, ``hidden = 4 dim``, ``--heads``), trained (the attributed
model and every retraining) by the task's full-batch Adam at ``--lr`` for ``--epochs``; the
attributed model's train/test loss and the retrained models' mean test loss are printed. Each
row and seed runs in its own spawned process (:func:`benchmarks.peak.measure_peak`) on the
same trained parameters, warmed up on 2 rows of a random width-16 model: one prepare + score,
wall and CPU seconds and the peak resident size above the set-up, one thread.

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


def _lds_spec(n_train: int, n_test: int, params: float | None, heads: int, lr: float,
              epochs: int) -> dict:
    """The ``lds`` task spec: bundled ``text-lm``, or (``params``) its transformer widened to
    ``dim = _dim_for(params)``, ``hidden = 4 dim``, trained with ``lr``/``epochs`` (Adam)."""
    hparams = None
    if params is not None:
        from dattri_fn.eval.tasks import VOCAB

        D = _dim_for(params, len(VOCAB), 32)
        hparams = {"dim": D, "heads": heads, "hidden": 4 * D, "lr": lr, "epochs": epochs}
    return {"name": "text-lm", "n_train": n_train, "n_test": n_test, "seed": 0, "device": "cpu",
            "hparams": hparams}


def _row_method(name: str, fm, dim: int, seed: int):
    from dattri_fn.attribute import logra

    if name == "logra":
        return logra(fm, proj_dim=dim, seed=seed)
    return _dense(name, fm, dim, seed)


def _lds_row_setup(spec: dict, state: dict, name: str, dim: int, seed: int):
    """Load the trained model of ``spec`` from ``state`` in a spawned process, warm ``name`` up on
    2 rows of a random width-16 model of the same architecture (a full-width warm-up would cost
    a dense row another draw of its [P, d] R), and return one timed prepare + score."""
    import warnings

    from benchmarks.run import load_models, load_task
    from dattri_fn.eval.tasks import TinyLM
    from dattri_fn.model import functional_model

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    task = load_task(spec)
    hp = task.hparams
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        small = TinyLM(len(task.meta["vocab"]), hp["context"], 16, hp["heads"], 64).eval()
    warm_fm = functional_model(small, task.loss_fn)
    warm = [(task.x_train[:2], task.y_train[:2])]
    method = _row_method(name, warm_fm, dim, seed)
    method.score(warm_fm.params, method.prepare(warm_fm.params, warm), warm, warm[0])
    fm = functional_model(load_models(task, [state])[0], task.loss_fn)
    train = [(task.x_train[i:i + 64], task.y_train[i:i + 64]) for i in range(0, task.n_train, 64)]
    test = (task.x_test, task.y_test)
    method = _row_method(name, fm, dim, seed)

    def step() -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        state_ = method.prepare(fm.params, train)
        scores = method.score(fm.params, state_, train, test)
        out = {"time_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
               "scores": scores.detach().to(torch.float64).numpy()}
        # LoGra may hold its rows factored (LoGraState.train_factors): its feature_rows forms one
        rows = (state_.feature_rows(0, 1) if hasattr(state_, "feature_rows")
                else getattr(state_, "train_features", None))
        out["width"] = rows.shape[-1] if isinstance(rows, torch.Tensor) else dim
        return out

    return step


def _mean_ci(values: torch.Tensor) -> tuple[float, float, float]:
    ok = values[torch.isfinite(values)]
    half = 1.96 * float(ok.std()) / math.sqrt(ok.numel())
    return float(ok.mean()), float(ok.mean()) - half, float(ok.mean()) + half


def lds_search(spec: dict, m: int, ds, ks, seeds: int, *, cache_dir: str | None = None,
               timeout: float = 1800.0, names=("trak", "grad-dot"), keep: str | None = None) -> None:
    """Print the ``lds`` tables (see the module docstring)."""
    import warnings

    from benchmarks.run import load_models, load_task, train_states
    from dattri_fn.eval.metrics import lds
    from dattri_fn.eval.retrain import lds_ground_truth

    warnings.filterwarnings("ignore")
    task = load_task(spec)
    t0 = time.perf_counter()
    gt = lds_ground_truth(task, m, seed=0, cache_dir=cache_dir, progress=False)
    print(f"ground truth: {time.perf_counter() - t0:.0f} s; load {_load()}")
    # ``keep``: the attributed model and the finished (row, seed) runs with their scores, so that a
    # killed run resumes (and a table over fewer seeds or rows reruns nothing).
    saved = {}
    if keep is not None and os.path.isfile(keep):
        saved = torch.load(keep, weights_only=False)
        saved = saved if saved["spec"] == spec and saved["m"] == m else {}
    done, states = saved.get("runs", {}), saved.get("states")

    def save() -> None:
        torch.save({"spec": spec, "m": m, "states": states, "runs": done}, keep + ".tmp")
        os.replace(keep + ".tmp", keep)

    # LoGra first: its rows are cheap, and a run cut short still pairs them with what it reached.
    rows = [("logra", k) for k in ks] + [(name, d) for name in names for d in ds]
    if states is None and not all((n, d, s) in done for n, d in rows for s in range(seeds)):
        states = train_states(task, 1)
        if keep is not None:
            save()
    P = sum(v.numel() for v in task.make_model(0).parameters())
    if states is not None:
        model = load_models(task, states)[0]
        with torch.no_grad():
            losses = [float(task.loss_fn(model(x), y)) for x, y in
                      ((task.x_train, task.y_train), (task.x_test, task.y_test))]
        print(f"attributed model: train loss {losses[0]:.3f}, test loss {losses[1]:.3f}")
    # The targets are -mean token CE per test sequence: their mean is the retrained models' loss.
    print(f"the {m} half-subset models' mean test loss {-float(gt.targets.mean()):.3f}")
    results = {}
    for name, dim in rows:
        per_seed = []
        for seed in range(seeds):
            out = done.get((name, dim, seed))
            if out is None:
                out = measure_peak(_lds_row_setup, spec, states[0], name, dim, seed,
                                   timeout=timeout)
            if "result" not in out:
                print(f"{name} {dim} seed {seed}: {out.get('error') or 'killed after timeout'}")
                break
            if keep is not None and (name, dim, seed) not in done:
                done[(name, dim, seed)] = out
                save()
            S = torch.from_numpy(out["result"]["scores"])
            per_seed.append((lds(S, gt.subsets, gt.targets.double()).per_test, out))
        if len(per_seed) < seeds:
            continue
        outs = [o for _, o in per_seed]
        results[(name, dim)] = {
            "per_test": torch.stack([pt for pt, _ in per_seed]).mean(0),
            "time": sum(o["result"]["time_s"] for o in outs) / seeds,
            "cpu": sum(o["result"]["cpu_s"] for o in outs) / seeds,
            "peak": max(o["peak_mib"] for o in outs), "width": outs[0]["result"]["width"]}
        r = results[(name, dim)]
        print(f"  {name} {dim}: LDS {_mean_ci(r['per_test'])[0]:.3f}, {r['cpu']:.2f} CPU-s, "
              f"{r['peak']:.0f} MiB; load {_load()}", flush=True)

    hp = task.hparams
    print(f"\n### text-lm, P = {P:,} (dim {hp['dim']}, hidden {hp['hidden']}, heads {hp['heads']}; "
          f"Adam lr {hp['lr']}, {hp['epochs']} epochs): n_train={task.n_train}, "
          f"n_test={task.n_test}, m={m} half-subsets, means over {seeds} projection seeds; "
          f"load {_load()}\n")
    print("| method | dim | features | LDS [95% CI] | time s | CPU s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for (name, dim), r in results.items():
        mean, lo, hi = _mean_ci(r["per_test"])
        label = f"k={dim}" if name == "logra" else f"d={dim}"
        print(f"| {name} | {label} | {r['width']} | {mean:.3f} [{lo:.3f}, {hi:.3f}] | "
              f"{r['time']:.2f} | {r['cpu']:.2f} | {r['peak']:.0f} |")
    ks = [k for k in ks if ("logra", k) in results]
    dense = [(n, d) for n, d in rows if n != "logra" and (n, d) in results]
    print("\nLoGra k against each dense row: paired LDS difference (LoGra - dense) [95% CI]; "
          "then, for the smallest k at equal LDS, LoGra's CPU time and peak as shares of the "
          "dense row's\n")
    print("| dense | " + " | ".join(f"logra k={k}" for k in ks)
          + " | smallest k at equal LDS | CPU time ratio | peak ratio |")
    print("|---|" + "---|" * (len(ks) + 3))
    for name, d in dense:
        cells, best = [], None
        for k in ks:
            mean, lo, hi = _paired(results[("logra", k)]["per_test"], results[(name, d)]["per_test"])
            cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            if best is None and hi >= 0:
                best = k
        ratios = " | |"
        if best is not None:
            lg, de = results[("logra", best)], results[(name, d)]
            ratios = f" {lg['cpu'] / de['cpu']:.4f} | {lg['peak'] / max(de['peak'], 1e-9):.4f} |"
        print(f"| {name} d={d} | " + " | ".join(cells) + f" | {best or 'none'} |" + ratios)


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
    a.add_argument("--params", type=float, default=None,
                   help="widen text-lm's transformer to about this many parameters (default: the "
                        "bundled P = 15,872 model)")
    a.add_argument("--heads", type=int, default=4, help="attention heads of the widened model")
    a.add_argument("--lr", type=float, default=3e-3, help="Adam lr of the widened model")
    a.add_argument("--epochs", type=int, default=20, help="full-batch epochs of the widened model")
    a.add_argument("--methods", default="trak,grad-dot", help="dense rows")
    a.add_argument("--cache-dir", default=None,
                   help="retraining cache (default $DATTRI_FN_CACHE or ./.cache/dattri_fn)")
    a.add_argument("--timeout", type=float, default=1800.0, help="seconds per row and seed")
    a.add_argument("--keep", default=None,
                   help="file of finished row runs (scores, time, peak): a rerun resumes from it")
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
        spec = _lds_spec(args.n_train, args.n_test, args.params, args.heads, args.lr, args.epochs)
        lds_search(spec, args.subsets, [int(d) for d in args.ds.split(",") if d],
                   [int(k) for k in args.ks.split(",")], args.seeds, cache_dir=args.cache_dir,
                   timeout=args.timeout, names=[n for n in args.methods.split(",") if n],
                   keep=args.keep)
    else:
        scale(args.params, [int(k) for k in args.ks.split(",")], args.d, args.n_train,
              args.n_test, args.methods.split(","), args.timeout, args.chunk)


if __name__ == "__main__":
    main()
