"""How time and peak memory grow with n_train and with the parameter count, one process a point.

    OMP_NUM_THREADS=1 python -m benchmarks.scaling [--quick] [--budget 120] [--out benchmarks]

Methods: Grad-Dot, TracIn (3 checkpoints), TRAK (3 models, ``proj_dim = min(512, n // 4)``),
IF-CG (Gauss-Newton, exactly ``--cg-iters`` iterations: ``rtol = 0``, so the cost does not
depend on when CG happens to converge) and IF-Arnoldi (64 eigenpairs from 128 Krylov steps),
configured as :func:`dattri_fn.app.recipes.recipe`; 32 test points.

* n_train sweep (1k, 4k, 16k, 64k) on the digits-mlp network (64-32-10, 2,410 parameters).
  Rows beyond the 1,797 digits are synthesised: digits rows (standardised) drawn with
  replacement and perturbed by N(0, 0.1^2) noise per pixel (seeded), labels kept.
* parameter sweep (~10k, 100k, 1M) at n_train = 1k: the hidden layer widened to 133, 1,333
  and 13,333 units (``P = 75 h + 10``); training batches shrink to ``2**25 // P`` rows (at
  least 8) so one batch of per-sample gradients stays near 128 MiB.

Models are the untrained, seeded initialisations: time and memory do not depend on the weights
here (CG runs a fixed number of iterations). Each point runs in a fresh spawned process (setup
and a 64-row warm-up not measured; "peak MiB" is the peak resident size during prepare + score
minus the size before). A point over ``--budget`` seconds is killed; a size whose run time,
extrapolated linearly from the previous size, would exceed the budget is skipped. Both are
reported. The plot goes to ``<out>/scaling.png`` (``scaling-quick.png`` with ``--quick``).

``--against dattri`` also measures dattri 0.3.0's counterpart of every point (configured by
:func:`benchmarks.against_dattri.dattri_runner`: same data, models, batch size, CG iterations,
Arnoldi rank, TRAK projection size; its IF-CG solves with the Hessian on the whole training set
as one cached batch, as that module documents) and prints time and memory ratios ours/dattri.

``--floor`` also measures, per point and in the same way (its own process, process CPU time),
the model-bound floor: one plain forward and backward (``loss.backward``'s gradients w.r.t. the
parameters, no probes, no projection) of the same model over the same training batches (our
side's, ``batch_rows(P)`` rows each) and the test batch. Every method here needs at least that
much of the model; the table "against the floor" gives ours / floor and dattri / floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from benchmarks.run import measure_peak

METHODS = ("grad-dot", "tracin", "trak", "if-cg", "if-arnoldi")  # the default run
# Every other method with a dattri 0.3.0 counterpart (benchmarks.against_dattri.COUNTERPARTS),
# by name only (``--methods``): our side is the recipe, LoGra/FactGraSS as benchmarks.run builds
# them, the CG ensemble as IF-CG (exactly ``--cg-iters`` iterations) over the 3 models.
MORE_METHODS = ("grad-cos", "tracin-cos", "if-explicit", "if-lissa", "if-datainf", "if-ekfac",
                "if-cg-ens", "rps", "knn-shapley", "logra", "factgrass")
ALL_METHODS = METHODS + MORE_METHODS
N_SIZES = (1_000, 4_000, 16_000, 64_000)
WIDTHS = (133, 1_333, 13_333)  # P = 75 h + 10: ~10k, 100k, 1M
BASE_WIDTH = 32  # digits-mlp
QUICK = {"methods": ("grad-dot", "if-cg"), "n_sizes": (128, 256), "widths": (16, 64),
         "n_fixed": 128}
NOISE = 0.1
N_TEST = 32
N_MODELS = 3
MEM_CAP_GIB = 4.0  # a point's process is killed past this resident size (the machine is shared)
MEM_CAP_EXIT = 86  # its exit code: reported as status "memcap"


class Point(NamedTuple):
    """One measurement: ``sweep`` is ``"n"`` or ``"P"``; ``status`` ok / timeout / skipped /
    error (``detail`` says why)."""

    method: str
    sweep: str
    n_train: int
    width: int
    params: int
    status: str
    prepare_s: float | None = None
    score_s: float | None = None
    peak_mib: float | None = None
    detail: str = ""
    side: str = "ours"
    cpu_s: float | None = None  # process CPU time of prepare + score (one thread: the work)


def num_params(width: int, features: int = 64, classes: int = 10) -> int:
    """Return the parameter count of the features-width-classes MLP: ``(f + 1) w + (w + 1) c``."""
    return (features + 1) * width + (width + 1) * classes


def batch_rows(params: int) -> int:
    """Return training rows per batch: 256, fewer for big models (``2**25 // P``, at least 8)."""
    return max(8, min(256, 2**25 // params))


# ------------------------------------------------------------------------------- the data
def synthetic_digits(n_train: int, *, seed: int = 0, noise: float = NOISE):
    """Return a digits-mlp Task with ``n_train`` rows resampled from the digits plus noise.

    Pool: the 1,765 standardised training rows of ``get_task("digits-mlp", n_train=1765,
    n_test=32)``; ``x = pool[idx] + noise * N(0, 1)``, ``y = labels[idx]`` with ``idx`` drawn
    with replacement from a ``torch.Generator(seed)``. The test set is the task's own 32 rows.
    """
    from dattri_fn.eval.tasks import get_task

    base = get_task("digits-mlp", n_train=1797 - N_TEST, n_test=N_TEST, seed=seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(base.n_train, (n_train,), generator=g)
    x = base.x_train[idx] + noise * torch.randn(n_train, base.x_train.shape[1], generator=g)
    return dataclasses.replace(base, x_train=x, y_train=base.y_train[idx].clone())


def mlp(width: int, seed: int) -> nn.Module:
    """Return the seeded, untrained 64-width-10 tanh MLP."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10)).eval()


# ----------------------------------------------------------------------------- the method
def runner(name: str, task, models: list[nn.Module], *, cg_iters: int, side: str = "ours"):
    """Return ``() -> (prepare_s, score_s)`` running method ``name`` (of ``side``) once."""
    if side == "dattri":
        return dattri_point(name, task, models, cg_iters=cg_iters)
    if side == "floor":
        return floor_point(task, models)
    r = our_recipe(name, task, models, cg_iters=cg_iters)

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        state = r.method.prepare(r.params, r.train)
        t1 = time.perf_counter()
        r.method.score(r.params, state, r.train, r.test)
        return t1 - t0, time.perf_counter() - t1

    return run


def our_recipe(name: str, task, models: list[nn.Module], *, cg_iters: int):
    """Return our side of ``name`` as a :class:`dattri_fn.app.recipes.Recipe`.

    :func:`~dattri_fn.app.recipes.recipe` with only the batch size set (:func:`batch_rows`),
    except: IF-CG and its ensemble run exactly ``cg_iters`` iterations (``rtol = 0``, as dattri's
    CG has no tolerance), LoGra/FactGraSS (no recipe) are built as ``benchmarks.run`` builds
    them (``k = 8`` per side; ``d = 64`` per layer, blowup 4).
    """
    from dattri_fn.app.recipes import Recipe, curvature_rows, gauss_newton, recipe
    from dattri_fn.attribute import influence
    from dattri_fn.model import functional_model

    P = sum(p.numel() for p in models[0].parameters())
    built = name in ("if-cg", "if-cg-ens", "logra", "factgrass")
    r = recipe("grad-dot" if built else name, task, models, batch_size=batch_rows(P))
    if not built:
        return r
    if name in ("if-cg", "if-cg-ens"):
        wd = float(task.hparams["weight_decay"])
        fm = functional_model(models[0], task.loss_fn)
        method = influence(fm, l2=wd / 2, solver="cg", damping=wd + 1e-3,
                           curvature=gauss_newton(fm, task.loss_fn, curvature_rows(P, batch_rows(P))),
                           max_iter=cg_iters, rtol=0.0)
        params = fm.params
        if name == "if-cg-ens":  # the mean of per-model scores, as the recipe (and dattri)
            params = [functional_model(m, task.loss_fn).params for m in models]
    else:  # as benchmarks.run: the sizes of benchmarks.against_dattri
        from benchmarks.against_dattri import FACTGRASS_BLOWUP, FACTGRASS_DIM, LOGRA_K
        from dattri_fn.attribute.factgrass import factgrass
        from dattri_fn.attribute.logra import logra

        fm = functional_model(models[0].eval(), task.loss_fn)
        method = logra(fm, proj_dim=LOGRA_K) if name == "logra" else factgrass(
            fm, proj_dim=FACTGRASS_DIM, blowup=FACTGRASS_BLOWUP)
        params = fm.params
    return Recipe(name, method, params, r.train, r.test)


def floor_point(task, models: list[nn.Module]):
    """Return ``() -> (train_s, test_s)``: one forward and backward of ``models[0]``'s loss
    (gradients w.r.t. its parameters) per training batch of our side (``batch_rows(P)`` rows),
    then over the test batch: the model-bound work every method repeats at least once."""
    from dattri_fn.app.recipes import recipe

    model = models[0].eval()
    params = [p for p in model.parameters() if p.requires_grad]
    r = recipe("grad-dot", task, models[:1], batch_size=batch_rows(sum(p.numel() for p in params)))

    def step(batch) -> None:
        x, y = batch
        torch.autograd.grad(task.loss_fn(model(x), y), params)

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        for batch in r.train:
            step(batch)
        t1 = time.perf_counter()
        step(r.test)
        return t1 - t0, time.perf_counter() - t1

    return run


def dattri_point(name: str, task, models: list[nn.Module], *, cg_iters: int):
    """Return ``() -> (prepare_s, score_s)`` running dattri's counterpart of ``name`` once."""
    from benchmarks.against_dattri import dattri_runner

    P = sum(p.numel() for p in models[0].parameters())
    hp = dict(damping=1e-3, proj_dim=512, max_iter=cg_iters, arnoldi_rank=64,
              batch_size=batch_rows(P), seed=0, device="cpu")
    r = dattri_runner(name, task, models, hp)

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        state = r.prepare()
        t1 = time.perf_counter()
        r.score(state)
        return t1 - t0, time.perf_counter() - t1

    return run


def point_setup(name: str, n_train: int, width: int, cg_iters: int, side: str = "ours"):
    """Build the point in this (spawned) process, warm it up on 64 rows; return the step."""
    import warnings

    warnings.filterwarnings("ignore")  # CG with rtol = 0 warns that it did not converge
    task = synthetic_digits(n_train)
    models = [mlp(width, c) for c in range(N_MODELS)]
    k = min(64, n_train)
    warm = dataclasses.replace(task, x_train=task.x_train[:k], y_train=task.y_train[:k],
                               x_test=task.x_test[:2], y_test=task.y_test[:2])
    runner(name, warm, models, cg_iters=min(cg_iters, 2), side=side)()
    run = runner(name, task, models, cg_iters=cg_iters, side=side)
    return lambda: run()


def _watch_rss(cap_gib: float, every: float = 0.05) -> None:
    """Start a daemon thread that ends this process (exit :data:`MEM_CAP_EXIT`) once its
    resident size passes ``cap_gib``: seven people share the machine's 23 GiB, and dattri's
    dense Hessians and per-example Jacobians grow to tens of GiB at the bigger points."""
    import threading

    from benchmarks.peak import _vm_kib

    def watch() -> None:
        while True:
            if _vm_kib("VmRSS") > cap_gib * 2**20:
                print(f"scaling: resident size over {cap_gib:g} GiB, stopped", file=sys.stderr,
                      flush=True)
                os._exit(MEM_CAP_EXIT)
            time.sleep(every)

    threading.Thread(target=watch, daemon=True).start()


def point_setup_timed(name: str, n_train: int, width: int, cg_iters: int, side: str = "ours",
                      mem_cap_gib: float = MEM_CAP_GIB):
    """:func:`point_setup` under a resident-size cap; the step returns ``(prepare_s, score_s,
    cpu_s)``: wall times and the process CPU time of both (one thread: CPU time is the work
    itself, not the waits a machine loaded by others adds to the wall time)."""
    if mem_cap_gib:
        _watch_rss(mem_cap_gib)
    step = point_setup(name, n_train, width, cg_iters, side)

    def timed() -> tuple[float, float, float]:
        c0 = time.process_time()
        prep, score = step()
        return prep, score, time.process_time() - c0

    return timed


# ------------------------------------------------------------------------------ the sweep
def plan(sizes: Sequence[int]) -> list[tuple[int, float]]:
    """Return ``(size, growth from the previous size)`` pairs; the first growth is 0."""
    return [(s, 0.0 if i == 0 else s / sizes[i - 1]) for i, s in enumerate(sizes)]


def predicted_over(last: Point | None, growth: float, budget: float) -> bool:
    """True when the previous point's time times ``growth`` (linear) exceeds ``budget``, or the
    previous point did not finish."""
    if last is None:
        return False
    if last.status != "ok":
        return True
    return (last.prepare_s + last.score_s) * growth > budget


def dense_over_cap(name: str, params: int, mem_cap_gib: float) -> bool:
    """True for IF-explicit when one dense float32 ``P x P`` matrix alone passes the cap (both
    sides form one: our Gauss-Newton, dattri's Hessian)."""
    return name == "if-explicit" and bool(mem_cap_gib) and 4 * params**2 > mem_cap_gib * 2**30


def measure(fn, *args, timeout: float, start: str = "spawn") -> dict:
    """:func:`benchmarks.peak.measure_peak` of ``fn(*args)``'s step in a fresh process.

    ``start="forkserver"``: the process is forked from a server that imported torch, dattri_fn
    and dattri once (:data:`PRELOAD`), not spawned: ~1 instead of ~10 CPU-s of imports per
    point (dattri's import alone is ~6 s). The step and its peak are measured the same way (the
    peak is over the resident size after the setup, which excludes the inherited pages).
    """
    if start == "spawn":
        return measure_peak(fn, *args, timeout=timeout)
    import multiprocessing

    from benchmarks.peak import _peak_child

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_child, args=(send, fn, args, False), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            proc.kill()
            return {"timeout": True}
        status, payload = recv.recv()
    except EOFError:
        proc.join()
        return {"error": f"the child exited with code {proc.exitcode}"}
    finally:
        proc.join()
    if status != "ok":
        return {"error": payload}
    result, peak_mib, reset, _ = payload
    return {"result": result, "peak_mib": peak_mib, "peak_reset": reset}


# imported once by the fork server (those absent are skipped by multiprocessing)
PRELOAD = ("torch", "dattri_fn.app.recipes", "dattri_fn.attribute",
           "benchmarks.against_dattri", "sklearn.datasets", "dattri.algorithm")


def sweep(name: str, kind: str, sizes: Sequence[int], *, n_fixed: int, width_fixed: int,
          budget: float, cg_iters: int, log, side: str = "ours",
          mem_cap_gib: float = MEM_CAP_GIB, timeout: float | None = None,
          start: str = "spawn") -> list[Point]:
    """Measure ``name`` over ``sizes`` of ``kind`` (``"n"``: n_train, ``"P"``: widths).

    A size is skipped when :func:`predicted_over` (on the CPU time where measured: a loaded
    machine stretches the wall time) or :func:`dense_over_cap` says so; a point still running
    after ``timeout`` s (default ``budget + 60``: setup and warm-up) is killed.
    """
    timeout = budget + 60 if timeout is None else timeout
    points: list[Point] = []
    last = None
    for size, growth in plan(sizes):
        n, w = (size, width_fixed) if kind == "n" else (n_fixed, size)
        base = dict(method=name, sweep=kind, n_train=n, width=w, params=num_params(w), side=side)
        seen = last if last is None or last.cpu_s is None else last._replace(
            prepare_s=last.cpu_s, score_s=0.0)
        if predicted_over(seen, growth, budget) or dense_over_cap(name, num_params(w),
                                                                   mem_cap_gib):
            why = (f"dense P x P over the {mem_cap_gib:g} GiB cap"
                   if dense_over_cap(name, num_params(w), mem_cap_gib) else
                   f"previous size {last.status}" if last.status != "ok" else
                   f"predicted {(seen.prepare_s + seen.score_s) * growth:.0f} s > budget "
                   f"{budget:.0f} s")
            # a later size is skipped too: its growth counts from the size skipped here
            last = Point(**base, status="skipped", detail=why)
            points.append(last)
            log(f"  {side:<6} {name:<10} {kind}: n={n} P={base['params']} skipped ({why})")
            continue
        t0 = time.perf_counter()
        out = measure(point_setup_timed, name, n, w, cg_iters, side, mem_cap_gib,
                      timeout=timeout, start=start)
        if out.get("timeout"):
            last = Point(**base, status="timeout", detail=f"killed after {timeout:.0f} s")
        elif "error" in out and out["error"].endswith(f"code {MEM_CAP_EXIT}"):
            last = Point(**base, status="memcap",
                         detail=f"resident size over {mem_cap_gib:g} GiB, stopped")
        elif "error" in out:
            last = Point(**base, status="error", detail=out["error"][:200])
        else:
            prep, score, cpu = out["result"]
            last = Point(**base, status="ok", prepare_s=prep, score_s=score,
                         peak_mib=out["peak_mib"], cpu_s=cpu)
        points.append(last)
        log(f"  {side:<6} {name:<10} {kind}: n={n} P={base['params']} {last.status} "
            f"wall {time.perf_counter() - t0:.1f}s"
            + (f" time {last.prepare_s + last.score_s:.2f}s cpu {last.cpu_s:.2f}s "
               f"peak {last.peak_mib:.0f} MiB load {os.getloadavg()[0]:.1f}"
               if last.status == "ok" else f" {last.detail}"))
    return points


# ----------------------------------------------------------------------------- reporting
def table(points: list[Point]) -> str:
    """Return a markdown table of the points."""
    head = ["method", "side", "sweep", "n_train", "params", "prepare s", "score s", "total s",
            "CPU s", "peak MiB", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        ok = p.status == "ok"
        cells = [p.method, p.side, p.sweep, str(p.n_train), f"{p.params:,}",
                 f"{p.prepare_s:.3f}" if ok else "—", f"{p.score_s:.3f}" if ok else "—",
                 f"{p.prepare_s + p.score_s:.3f}" if ok else "—",
                 f"{p.cpu_s:.3f}" if ok and p.cpu_s is not None else "—",
                 f"{p.peak_mib:.1f}" if ok else "—",
                 p.status + (f": {p.detail}" if p.detail else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _time(p: Point) -> float | None:
    """CPU s of prepare + score where measured (one thread), else the wall time; None if not ok."""
    if p.status != "ok":
        return None
    return p.cpu_s if p.cpu_s is not None else p.prepare_s + p.score_s


def ratio_table(points: list[Point]) -> str:
    """Return time and memory ratios ours/dattri for every point both sides measured (time:
    the process CPU time where both have it, as :func:`_time`)."""
    theirs = {(p.method, p.sweep, p.n_train, p.params): p for p in points if p.side == "dattri"}
    head = ["method", "sweep", "n_train", "params", "ours s", "dattri s", "time ratio",
            "ours MiB", "dattri MiB", "mem ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        d = theirs.get((p.method, p.sweep, p.n_train, p.params))
        if p.side != "ours" or d is None:
            continue
        # CPU times where both sides have them (a side that did not finish has none)
        cpu = all(q.cpu_s is not None or q.status != "ok" for q in (p, d))
        t_o = _time(p) if cpu else (p.prepare_s + p.score_s if p.status == "ok" else None)
        t_d = _time(d) if cpu else (d.prepare_s + d.score_s if d.status == "ok" else None)
        fmt = lambda v, f: "—" if v is None else format(v, f)
        m_o = p.peak_mib if p.status == "ok" else None
        m_d = d.peak_mib if d.status == "ok" else None
        ratio = lambda a, b: fmt(a / b if a is not None and b else None, ".3f")
        lines.append("| " + " | ".join([
            p.method, p.sweep, str(p.n_train), f"{p.params:,}", fmt(t_o, ".3f"),
            fmt(t_d, ".3f") if d.status == "ok" else d.status, ratio(t_o, t_d),
            fmt(m_o, ".1f"), fmt(m_d, ".1f"), ratio(m_o, m_d)]) + " |")
    return "\n".join(lines)


def floor_table(points: list[Point]) -> str:
    """Return ours / floor and dattri / floor (process CPU time, :func:`_time`) for every point
    with a floor (``--floor``)."""
    key = lambda p: (p.method, p.sweep, p.n_train, p.params)  # noqa: E731
    by = {(p.side, *key(p)): p for p in points}
    head = ["method", "sweep", "n_train", "params", "floor s", "ours s", "dattri s",
            "ours / floor", "dattri / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in points:
        if f.side != "floor":
            continue
        t_f = _time(f)
        o, d = by.get(("ours", *key(f))), by.get(("dattri", *key(f)))
        t_o, t_d = (None if q is None else _time(q) for q in (o, d))
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        over = lambda t: fmt(t / t_f if t is not None and t_f else None, ".2f")  # noqa: E731
        lines.append("| " + " | ".join([f.method, f.sweep, str(f.n_train), f"{f.params:,}",
                                        fmt(t_f, ".3f"), fmt(t_o, ".3f"), fmt(t_d, ".3f"),
                                        over(t_o), over(t_d)]) + " |")
    return "\n".join(lines)


def plot(points: list[Point], path: str) -> None:
    """Save time and peak memory against n_train and against P (log-log) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for col, (kind, xlabel, key) in enumerate((("n", "n_train", "n_train"),
                                               ("P", "parameters P", "params"))):
        colours = {}
        for name, side in dict.fromkeys((p.method, p.side) for p in points):
            ok = [p for p in points if p.method == name and p.sweep == kind and p.side == side
                  and p.status == "ok"]
            if not ok:
                continue
            xs = [getattr(p, key) for p in ok]
            style = dict(ls="-" if side == "ours" else "--", marker="o" if side == "ours" else "x",
                         label=name if side == "ours" else f"{name} ({side})")
            if name in colours:
                style["color"] = colours[name]
            line, = axes[0, col].plot(xs, [p.prepare_s + p.score_s for p in ok], **style)
            colours[name] = line.get_color()
            axes[1, col].plot(xs, [max(p.peak_mib, 0.1) for p in ok], **{**style,
                                                                          "color": colours[name]})
        for row, ylabel in enumerate(("prepare + score, s", "peak RSS increment, MiB")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"dattri_fn scaling, 1 thread (torch {torch.__version__})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    """Return the positive integers of a comma-separated ``text`` (``''``: none)."""
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        out = (0,)
    if any(v < 1 for v in out):
        raise SystemExit(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Return the parsed command line (see ``python -m benchmarks.scaling --help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="Grad-Dot and IF-CG on tiny sizes only (about half a minute)")
    p.add_argument("--methods", default=None,
                   help=f"'all' or a comma-separated list of {','.join(ALL_METHODS)} (default: "
                        f"{','.join(METHODS)})")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated n_train of the n sweep (default "
                        f"{','.join(map(str, N_SIZES))}; '' = no n sweep)")
    p.add_argument("--widths", default=None,
                   help=f"comma-separated hidden widths of the P sweep, P = 75 w + 10 (default "
                        f"{','.join(map(str, WIDTHS))}; '' = no P sweep)")
    p.add_argument("--mem-cap", type=float, default=MEM_CAP_GIB,
                   help=f"GiB of resident size a point may reach before it is stopped (default "
                        f"{MEM_CAP_GIB:g}; 0 = no cap)")
    p.add_argument("--budget", type=float, default=120.0,
                   help="seconds a point may take; bigger sizes predicted over it are skipped "
                        "(default 120)")
    p.add_argument("--timeout", type=float, default=None,
                   help="wall seconds after which a point is killed (default: budget + 60)")
    p.add_argument("--start", choices=("spawn", "forkserver"), default="spawn",
                   help="how a point's process starts: spawn (default) or forked from a server "
                        "that imported torch and dattri once (~10 -> ~1 CPU-s per point)")
    p.add_argument("--cg-iters", type=int, default=20, help="CG iterations (default 20)")
    p.add_argument("--out", default="benchmarks",
                   help="folder of scaling.png (default benchmarks)")
    p.add_argument("--json", default=".cache/bench/scaling.jsonl",
                   help="append points as JSON lines here ('' = none)")
    p.add_argument("--against", choices=("dattri",), default=None,
                   help="also measure dattri 0.3.0's counterpart of every point")
    p.add_argument("--floor", action="store_true",
                   help="also measure every point's floor: one plain forward and backward of the "
                        "model over the same batches (no probes, no projection)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Point]:
    """Run both sweeps; print the table; save the plot; return the points."""
    args = parse_args(argv)
    # tqdm reads it when imported (dattri's progress bars): set before spawning the workers
    os.environ.setdefault("TQDM_DISABLE", "1")
    methods = QUICK["methods"] if args.quick else METHODS
    if args.methods == "all":
        methods = ALL_METHODS
    elif args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in ALL_METHODS]
        if bad:
            raise SystemExit(f"--methods: unknown {bad}; expected among {list(ALL_METHODS)}")
    n_sizes = QUICK["n_sizes"] if args.quick else N_SIZES
    widths = QUICK["widths"] if args.quick else WIDTHS
    if args.sizes is not None:
        n_sizes = _ints(args.sizes, "--sizes")
    if args.widths is not None:
        widths = _ints(args.widths, "--widths")
    n_fixed = QUICK["n_fixed"] if args.quick else N_SIZES[0]
    log = functools.partial(print, file=sys.stderr, flush=True) if not args.quiet else (
        lambda *a, **k: None)
    start = time.perf_counter()
    points: list[Point] = []
    sides = ("ours", "dattri") if args.against else ("ours",)
    sides += ("floor",) if args.floor else ()
    for name in methods:
        for side in sides:
            common = dict(n_fixed=n_fixed, width_fixed=BASE_WIDTH, budget=args.budget,
                          cg_iters=args.cg_iters, log=log, side=side, mem_cap_gib=args.mem_cap,
                          timeout=args.timeout, start=args.start)
            points += sweep(name, "n", n_sizes, **common)
            points += sweep(name, "P", widths, **common)
    elapsed = time.perf_counter() - start
    print(f"\n### scaling ({'quick' if args.quick else 'full'}): {elapsed:.0f} s wall, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch {torch.__version__}\n")
    print(table(points))
    if args.against:
        print("\n### ours / dattri 0.3.0\n")
        print(ratio_table(points))
    if args.floor:
        print("\n### against the floor (one plain forward and backward over the same batches)\n")
        print(floor_table(points))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot(points, str(Path(args.out) / ("scaling-quick.png" if args.quick else "scaling.png")))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            for p in points:
                f.write(json.dumps({**p._asdict(), "quick": args.quick,
                                    "cg_iters": args.cg_iters, "budget": args.budget,
                                    "torch": torch.__version__}) + "\n")
    return points


if __name__ == "__main__":
    main()
