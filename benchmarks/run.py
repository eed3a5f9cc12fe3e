"""Every attribution method on a bundled task: LDS, LOO, time and peak memory; optionally vs dattri.

    OMP_NUM_THREADS=1 python -m benchmarks.run --task digits-mlp --methods all --against dattri

Each (method, side) runs in its own spawned process (:func:`benchmarks.peak.measure_peak`, the peak
read from ``VmHWM``). The setup builds the task, the trained models and the method and runs it once
on a 64-example slice (first calls page in library code, which would count as memory); then the peak
mark is reset and ``prepare`` + ``score`` are timed (best of up to ``--repeats`` runs while a run
takes under a second). "peak MiB" is the peak resident size during that step minus the size just
before it (RSS: ~1 MiB resolution); "tensor MiB" is the exact high-water mark of the bytes of CPU
tensors one more ``prepare`` + ``score`` allocates (:func:`benchmarks.peak.tensor_peak`, torch's
allocator under the profiler: both sides' tensors counted alike), the column the memory ratio
against dattri uses. LDS uses :func:`dattri_fn.eval.retrain.lds_ground_truth` on the same task (cached under
``--cache-dir``); the models attributed are ``train_model(task, seed=c)`` for ``c < --models`` (the
first one for single-model methods; TRAK and TracIn use all of them). A method that fails is a table
row with its error. Raw numbers are appended as JSON lines. """

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.against_dattri import (
    COUNTERPARTS,
    DATTRI_INSTALL,
    DATTRI_VERSION,
    MATCHED,
    Runner,
    dattri_available,
    dattri_version,
)
from benchmarks.peak import measure_peak

# n_train, n_test, subsets: a few minutes on 2 cores for the digits tasks (all methods).
DEFAULT_SIZES = {"digits-lr": (500, 50, 64), "digits-mlp": (500, 50, 64),
                 "digits-cnn": (300, 30, 32), "text-lm": (128, 16, 32)}
WARM_ROWS = 64
SIDES = ("ours", "matched", "dattri", "defaults")
# Methods with a README-level "defaults" row (RPS has no setting-free form: it needs a head split).
DEFAULTS = ("if-explicit", "if-cg", "if-arnoldi", "if-datainf", "if-kfac", "if-ekfac",
            "grad-dot", "grad-cos", "tracin", "trak")
EXTRA_PAIRS = {"trak": "trak-noproj"}  # also compared without projection: the same quantity
# Methods this runner builds itself (not recipes): LoGra and FactGraSS at the sizes of
# benchmarks.against_dattri (k = 8 per side; d = 64 per layer, blowup 4), default damping.
EXTRA_METHODS = ("logra", "factgrass")
DIAGNOSES = ("corr_vs_dattri_fixed", "corr_ours_next_seed")


# ----------------------------------------------------------------------------------- setup
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Return the parsed command line (see ``python -m benchmarks.run --help``)."""
    from dattri_fn.app.recipes import METHODS
    from dattri_fn.eval.tasks import TASKS

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
        epilog="Methods: " + ", ".join(METHODS + EXTRA_METHODS)
        + ". Run with OMP_NUM_THREADS=1 on shared CPUs.")
    p.add_argument("--task", default="digits-mlp", choices=TASKS, help="bundled task (default: digits-mlp)")
    p.add_argument("--methods", default="all",
                   help="'all' (default; every method but magic and magic-ens, which are "
                        "named: --sgd --methods magic,magic-ens) or a comma-separated list")
    p.add_argument("--n-train", type=int, default=None,
                   help="training examples (default: 500 digits, 300 digits-cnn, 128 text-lm)")
    p.add_argument("--n-test", type=int, default=None,
                   help="test examples (default: 50 digits, 30 digits-cnn, 16 text-lm)")
    p.add_argument("--subsets", type=int, default=None,
                   help="LDS: retrained half-subsets m (default: 64 digits, 32 others)")
    p.add_argument("--models", type=int, default=3,
                   help="trained models C (default 3); TRAK and TracIn use all, the rest the first")
    p.add_argument("--loo", type=int, default=0,
                   help="also report the LOO correlation over K removed training points (default 0)")
    p.add_argument("--against", choices=("dattri",), default=None,
                   help=f"also run dattri {DATTRI_VERSION}'s counterpart of each method")
    p.add_argument("--json", default=".cache/bench/results.jsonl",
                   help="append raw numbers as JSON lines here ('' = none; default "
                        ".cache/bench/results.jsonl)")
    p.add_argument("--device", default="cpu",
                   help="torch device of data, models and methods (default cpu)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, subsets and projections (default 0)")
    p.add_argument("--damping", type=float, default=1e-3,
                   help="extra damping of influence methods, TRAK's kernel damping (default 1e-3)")
    p.add_argument("--proj-dim", type=int, default=512,
                   help="TRAK projection size (default 512; the recipe caps it at n_train // 4)")
    p.add_argument("--max-iter", type=int, default=100, help="CG iterations (default 100)")
    p.add_argument("--arnoldi-rank", type=int, default=64, help="Arnoldi eigenpairs kept (default 64)")
    p.add_argument("--arnoldi-block", type=int, default=16,
                   help="Krylov columns per curvature call of our Arnoldi (default 16; dattri: 1)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    p.add_argument("--repeats", type=int, default=3,
                   help="best of up to this many runs while a run takes < 1 s (default 3)")
    p.add_argument("--cache-dir", default=".cache/dattri_fn",
                   help="retraining cache root (default .cache/dattri_fn)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one method may take, setup included; it is then killed and "
                        "reported as failed (default 600; 0 = none)")
    p.add_argument("--defaults", action="store_true",
                   help="also run each method as a user writes it from the README (only the "
                        "settings one must choose: solver, damping, iterations, rank, "
                        "projection size) next to the recipe rows")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--sgd", action="store_true",
                   help="train (and retrain) with mini-batch SGD on the functional trainer "
                        "(dattri_fn.eval.tasks.SGD_HPARAMS): the run magic/magic-ens differentiate")
    args = p.parse_args(argv)
    # 'all' keeps the table of the single-model methods; MAGIC trains the run it differentiates
    # (on an L-BFGS task it is refused), so it is asked for by name.
    known = METHODS + EXTRA_METHODS
    args.methods = [m for m in known if not m.startswith("magic")] if args.methods == "all" else [
        m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        p.error(f"--methods: unknown {unknown}; expected names among {list(known)}")
    n_train, n_test, m = DEFAULT_SIZES[args.task]
    args.n_train = args.n_train or n_train
    args.n_test = args.n_test or n_test
    args.subsets = args.subsets or m
    return args


def hyper_parameters(args: argparse.Namespace) -> dict:
    """Return the method settings both sides share (see :func:`dattri_fn.app.recipes.recipe`)."""
    return {"damping": args.damping, "proj_dim": args.proj_dim, "max_iter": args.max_iter,
            "arnoldi_rank": args.arnoldi_rank, "arnoldi_block": args.arnoldi_block,
            "batch_size": args.batch_size,
            "seed": args.seed, "device": args.device}


def task_spec(args: argparse.Namespace) -> dict:
    from dattri_fn.eval.tasks import SGD_HPARAMS

    return {"name": args.task, "n_train": args.n_train, "n_test": args.n_test,
            "seed": args.seed, "device": args.device,
            "hparams": dict(SGD_HPARAMS) if getattr(args, "sgd", False) else None}


def load_task(spec: dict):
    """Return the task of ``spec`` on its device."""
    from dattri_fn.eval.tasks import get_task

    task = get_task(spec["name"], n_train=spec["n_train"], n_test=spec["n_test"],
                    seed=spec["seed"], hparams=spec.get("hparams"))
    return task.to(spec["device"])


def train_states(task, n_models: int) -> list[dict]:
    """Return the state dicts of ``train_model(task, seed=c)``, ``c < n_models``, as numpy.

    numpy arrays travel to spawned processes by plain pickling (tensors would go through
    torch's shared-memory file descriptors).
    """
    from dattri_fn.eval.tasks import train_model

    return [{k: v.detach().cpu().numpy().copy()
             for k, v in train_model(task, seed=c).state_dict().items()}
            for c in range(n_models)]


def load_models(task, states: list[dict]) -> list:
    """Return ``task.make_model(c)`` loaded with ``states[c]``, in eval mode on the data's device."""
    models = []
    for c, state in enumerate(states):
        model = task.make_model(c)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        models.append(model.to(task.x_train.device).eval())
    return models


def warm_slice(task):
    """Return the task cut to its first 64 training and 2 test examples (warm-up)."""
    k = min(task.n_train, WARM_ROWS)
    return dataclasses.replace(task, x_train=task.x_train[:k], y_train=task.y_train[:k],
                               x_test=task.x_test[:2], y_test=task.y_test[:2], flipped=None)


# ----------------------------------------------------------------------------------- sides
def ours_runner(name: str, task, models: list, hp: dict) -> Runner:
    """Return the recipe ``name`` (or ``trak-noproj``: TRAK on raw gradients) as a Runner."""
    from dattri_fn.app.recipes import _trak, recipe
    from dattri_fn.model import functional_model

    if name in EXTRA_METHODS:
        from benchmarks.against_dattri import FACTGRASS_BLOWUP, FACTGRASS_DIM, LOGRA_K
        from dattri_fn.attribute.factgrass import factgrass
        from dattri_fn.attribute.logra import logra

        fm = functional_model(models[0].eval(), task.loss_fn)
        method = logra(fm, proj_dim=LOGRA_K) if name == "logra" else factgrass(
            fm, proj_dim=FACTGRASS_DIM, blowup=FACTGRASS_BLOWUP)
        r = recipe("grad-dot", task, models[:1], batch_size=hp["batch_size"])  # the data layout
        return Runner(lambda: method.prepare(fm.params, r.train),
                      lambda st: method.score(fm.params, st, r.train, r.test))
    if name == "trak-noproj":
        fms = [functional_model(m.eval(), task.loss_fn) for m in models]
        method = _trak(task, fms, None, hp["seed"], hp["damping"])
        r = recipe("trak", task, models, damping=hp["damping"], batch_size=hp["batch_size"])
        params = [f.params for f in fms]
        return Runner(lambda: method.prepare(params, r.train),
                      lambda st: method.score(params, st, r.train, r.test))
    r = recipe(name, task, models, damping=hp["damping"], proj_dim=hp["proj_dim"],
               seed=hp["seed"], batch_size=hp["batch_size"], max_iter=hp["max_iter"],
               arnoldi_rank=hp["arnoldi_rank"], arnoldi_block=hp.get("arnoldi_block", 16))
    return Runner(lambda: r.method.prepare(r.params, r.train),
                  lambda st: r.method.score(r.params, st, r.train, r.test))


def defaults_runner(name: str, task, models: list, hp: dict) -> Runner:
    """Return ``name`` written as in the README: a FunctionalModel, the solver, the damping of
    the training objective (``l2 = wd / 2``) and the sizes a user must pick; nothing else."""
    from dattri_fn.app.recipes import trak_dim
    from dattri_fn.attribute import grad_cos, grad_dot, influence, tracin, trak
    from dattri_fn.attribute.trak import classification_margin_loss, classification_weight_loss
    from dattri_fn.model import functional_model

    wd = float(task.hparams.get("weight_decay", 0.0))
    fms = [functional_model(m.eval(), task.loss_fn) for m in models]
    fm = fms[0]
    bs = hp["batch_size"]
    train = [(task.x_train[i:i + bs], task.y_train[i:i + bs]) for i in range(0, task.n_train, bs)]
    test = (task.x_test, task.y_test)
    params = fm.params
    if name.startswith("if-"):
        solver = name[3:]
        opts = {"cg": dict(max_iter=hp["max_iter"]),
                "arnoldi": dict(rank=hp["arnoldi_rank"])}.get(solver, {})
        method = influence(fm, solver=solver, l2=wd / 2, damping=hp["damping"], **opts)
    elif name in ("grad-dot", "grad-cos"):
        method = (grad_dot if name == "grad-dot" else grad_cos)(fm)
    elif name == "tracin":
        method = tracin(fm, lrs=[float(task.hparams.get("lr", 1.0))] * len(fms))
        params = [f.params for f in fms]
    elif name == "trak":
        margin = functional_model(fm.module, classification_margin_loss)
        weight = functional_model(fm.module, classification_weight_loss)
        method = trak(margin, weight_fn=weight, proj_dim=trak_dim(task.n_train, hp["proj_dim"]))
        params = [f.params for f in fms]
    else:
        raise ValueError(f"defaults_runner(name=...): expected one of {list(DEFAULTS)}, "
                         f"got {name!r}.")
    return Runner(lambda: method.prepare(params, train),
                  lambda st: method.score(params, st, train, test))



# the settings the in-process benchmarks (g_against and the A/B scripts) give runner_for
BENCH_HP = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
            "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}


def task_and_models(name: str, n_models: int = 3):
    """``(task, models)``: the bundled task at its default sizes (seed 0, CPU) and its first
    ``n_models`` trained models, as the in-process benchmarks load them."""
    n_train, n_test, _ = DEFAULT_SIZES[name]
    task = load_task({"name": name, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    return task, load_models(task, train_states(task, n_models))


def runner_for(side: str, name: str, task, models: list, hp: dict) -> Runner:
    """Return the Runner of ``name`` on ``side`` (``ours``, ``matched``, ``dattri`` or
    ``defaults``)."""
    from benchmarks import against_dattri

    if side == "defaults":
        return defaults_runner(name, task, models, hp)
    if side == "ours" or name == "trak-noproj" and side == "matched":
        return ours_runner(name, task, models, hp)
    if side == "matched":
        return against_dattri.matched_runner(name, task, models, hp)
    if name == "trak-noproj":
        return against_dattri.dattri_runner("trak", task, models, {**hp, "proj_dim": None})
    return against_dattri.dattri_runner(name, task, models, hp)


def _timed(runner: Runner) -> tuple[float, float, torch.Tensor]:
    t0 = time.perf_counter()
    state = runner.prepare()
    t1 = time.perf_counter()
    scores = runner.score(state)
    return t1 - t0, time.perf_counter() - t1, scores


def bench_setup(spec: dict):
    """Build one (method, side) in this (spawned) process, warm it up; return the timed step.

    ``spec``: ``task`` (see :func:`task_spec`), ``states``, ``method``, ``side``, ``hp``,
    ``repeats``. The step returns ``{"prepare_s", "score_s", "scores" [n_train, n_test]}``.
    """
    import warnings

    warnings.filterwarnings("ignore")  # dattri warns per batch; ours warn once, in the warm-up
    task = load_task(spec["task"])
    models = load_models(task, spec["states"])
    args = (spec["side"], spec["method"])
    warm = runner_for(*args, warm_slice(task), models, spec["hp"])
    _timed(warm)
    runner = runner_for(*args, task, models, spec["hp"])

    def once() -> torch.Tensor:  # one run: what benchmarks.peak's tensor pass profiles
        return runner.score(runner.prepare())

    def step() -> dict:
        best = None
        for _ in range(spec["repeats"]):
            run = _timed(runner)
            if best is None or run[0] + run[1] < best[0] + best[1]:
                best = run
            if run[0] + run[1] > 1.0:
                break
        prep, score, scores = best
        # numpy, not a tensor: torch pickles tensors through shared memory that the child
        # frees when it exits
        return {"prepare_s": prep, "score_s": score,
                "scores": scores.detach().to("cpu", torch.float64).numpy()}

    step.once = once
    return step


def measure(spec: dict, timeout: float | None = None) -> dict:
    """Return ``{prepare_s, score_s, peak_mib, tensor_peak_mib, peak_reset, scores}`` or
    ``{error}`` for ``spec`` (``tensor_peak_mib``: :func:`benchmarks.peak.tensor_peak` of one
    more ``prepare`` + ``score`` in the same process, after the RSS peak was read).

    A method still running after ``timeout`` seconds (setup and warm-up included) is killed and
    reported as an error.
    """
    t0 = time.perf_counter()
    out = measure_peak(bench_setup, spec, timeout=timeout, tensors=True)
    if out.get("timeout"):
        return {"error": f"TimeoutError: killed after {timeout:g} s (--timeout)",
                "wall_s": time.perf_counter() - t0}
    if "error" in out:
        return {"error": out["error"], "wall_s": time.perf_counter() - t0}
    res = {**out["result"], "scores": torch.from_numpy(out["result"]["scores"])}
    return {**res, "peak_mib": out["peak_mib"], "tensor_peak_mib": out.get("tensor_peak_mib"),
            "peak_reset": out["peak_reset"], "wall_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------- metrics
def quality(scores: torch.Tensor, gt, loo) -> dict:
    """Return LDS mean / CI and (with ``loo``) the LOO correlations of ``scores``, or an error."""
    from dattri_fn.eval.metrics import lds, loo_correlation

    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        return {"quality_error": f"{bad} of {scores.numel()} scores are NaN/inf"}
    out = {}
    res = lds(scores, gt.subsets, gt.targets.to(scores.dtype))
    out.update(lds=float(res.mean), lds_lo=float(res.ci95[0]), lds_hi=float(res.ci95[1]))
    if loo is not None:
        lc = loo_correlation(scores[loo.indices], loo.diffs.to(scores.dtype))
        out.update(loo_pearson=float(lc.pearson), loo_spearman=float(lc.spearman))
    return out


def pearson_all(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return Pearson's r over all entries of two score matrices (NaN if either is not finite)."""
    a, b = a.double().flatten(), b.double().flatten()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------------- table
def _num(x, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, fmt)


def _ratio(a, b) -> str:
    if a is None or b is None or b <= 0:
        return "—"
    return f"{a / b:.2f}"


def _err(row: dict) -> str:
    text = row.get("error") or row.get("quality_error") or ""
    return text.replace("|", "/").replace("\n", " ")[:160]


def method_table(rows: list[dict], loo: bool) -> str:
    """Return the markdown table of our methods: LDS (CI), [LOO], times, peak MiB (RSS and
    tensors), error."""
    head = ["method", "LDS", "95% CI"] + (["LOO r"] if loo else []) + [
        "prepare s", "score s", "peak MiB", "tensor MiB", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = (f"[{r['lds_lo']:.3f}, {r['lds_hi']:.3f}]" if "lds_lo" in r else "—")
        cells = [r["method"], _num(r.get("lds")), ci]
        if loo:
            cells.append(_num(r.get("loo_pearson")))
        cells += [_num(r.get("prepare_s"), ".3f"), _num(r.get("score_s"), ".3f"),
                  _num(r.get("peak_mib"), ".1f"), _num(r.get("tensor_peak_mib"), ".2f"), _err(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def defaults_table(rows: list[dict]) -> str:
    """Markdown: each method's defaults row next to its recipe row, time ratio defaults/recipe."""
    recipe = {r["method"]: r for r in rows if r["side"] == "ours"}
    lines = ["| method | LDS defaults | LDS recipe | defaults s | recipe s | time ratio | "
             "defaults MiB |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["side"] == "defaults"):
        o = recipe.get(r["method"], {})
        t = lambda x: x.get("prepare_s", math.nan) + x.get("score_s", math.nan)
        lines.append(f"| {r['method']} | {_num(r.get('lds'))} | {_num(o.get('lds'))} | "
                     f"{_num(t(r))} | {_num(t(o))} | {_ratio(t(r), t(o))} | "
                     f"{_num(r.get('peak_mib'), '.1f')} |" + (f" {_err(r)}" if _err(r) else ""))
    return "\n".join(lines)


def pair_record(label: str, ours: dict, theirs: dict, exact: torch.Tensor | None,
                recipe_row: dict | None = None) -> dict:
    """Return the side-by-side numbers of one method: ratios, LDS difference, correlations.

    ``recipe_row``: our recipe's row when ``ours`` is a matched configuration; its time over
    dattri's is reported too (``recipe_time_ratio``).
    """
    t_ours = ours.get("prepare_s", 0) + ours.get("score_s", 0) if "score_s" in ours else None
    t_theirs = (theirs.get("prepare_s", 0) + theirs.get("score_s", 0)
                if "score_s" in theirs else None)
    rec = {"method": label, "ours_side": ours.get("side"), "time_ours_s": t_ours,
           "time_dattri_s": t_theirs, "peak_ours_mib": ours.get("peak_mib"),
           "peak_dattri_mib": theirs.get("peak_mib"), "lds_ours": ours.get("lds"),
           "lds_dattri": theirs.get("lds"), "error_ours": _err(ours),
           "error_dattri": _err(theirs)}
    rec["time_ratio"] = t_ours / t_theirs if t_ours is not None and t_theirs else None
    if recipe_row is not None and "score_s" in recipe_row and t_theirs:
        t_recipe = recipe_row.get("prepare_s", 0) + recipe_row["score_s"]
        rec["recipe_time_ratio"] = t_recipe / t_theirs
    po, pt = rec["peak_ours_mib"], rec["peak_dattri_mib"]
    rec["rss_ratio"] = po / pt if po is not None and pt and pt > 0 else None
    rec["tensor_ours_mib"] = ours.get("tensor_peak_mib")
    rec["tensor_dattri_mib"] = theirs.get("tensor_peak_mib")
    to, tt = rec["tensor_ours_mib"], rec["tensor_dattri_mib"]
    # the exact tensor peaks where both sides have one, else the resident sizes
    rec["peak_ratio"] = to / tt if to is not None and tt else rec["rss_ratio"]
    lo, lt = rec["lds_ours"], rec["lds_dattri"]
    rec["lds_diff"] = lo - lt if lo is not None and lt is not None else None
    so, st = ours.get("scores"), theirs.get("scores")
    rec["corr"] = pearson_all(so, st) if so is not None and st is not None else None
    if exact is not None:
        rec["corr_exact_ours"] = pearson_all(so, exact) if so is not None else None
        rec["corr_exact_dattri"] = pearson_all(st, exact) if st is not None else None
    return rec


def against_table(pairs: list[dict]) -> str:
    """Return the markdown side-by-side table (ratios are ours / dattri; "mem ratio" of the
    tensor peaks, "RSS ratio" of the resident-size peaks)."""
    head = ["method", "ours s", "dattri s", "time ratio", "ours tensor MiB", "dattri tensor MiB",
            "mem ratio", "ours RSS MiB", "dattri RSS MiB", "RSS ratio", "LDS ours", "LDS dattri",
            "LDS diff", "corr", "corr exact o/d", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in pairs:
        exact = (f"{_num(p.get('corr_exact_ours'), '.4f')} / "
                 f"{_num(p.get('corr_exact_dattri'), '.4f')}" if "corr_exact_ours" in p else "—")
        notes = "; ".join(x for x in (
            "ours: " + p["error_ours"] if p["error_ours"] else "",
            "dattri: " + p["error_dattri"] if p["error_dattri"] else "",
            "ours = matched config" if p["ours_side"] == "matched" else "",
            "diagnosis failed: " + p["diagnose_error"] if p.get("diagnose_error") else "",
            f"recipe/dattri time {p['recipe_time_ratio']:.3f}" if p.get("recipe_time_ratio")
            else "",
            *(f"{k.removeprefix('corr_').replace('_', ' ')}: {v:.4f}" for k, v in p.items()
              if k in DIAGNOSES)) if x)
        cells = [p["method"], _num(p["time_ours_s"]), _num(p["time_dattri_s"]),
                 _num(p["time_ratio"], ".3f"), _num(p.get("tensor_ours_mib"), ".2f"),
                 _num(p.get("tensor_dattri_mib"), ".2f"), _num(p["peak_ratio"], ".2f"),
                 _num(p["peak_ours_mib"], ".1f"), _num(p["peak_dattri_mib"], ".1f"),
                 _num(p.get("rss_ratio"), ".2f"),
                 _num(p["lds_ours"]), _num(p["lds_dattri"]), _num(p["lds_diff"], "+.3f"),
                 _num(p["corr"], ".4f"), exact, notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def append_jsonl(path: str, records: list[dict]) -> None:
    """Append ``records`` (tensors dropped) as JSON lines to ``path`` (created with parents)."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for rec in records:
            clean = {k: v for k, v in rec.items() if not isinstance(v, torch.Tensor)}
            f.write(json.dumps(clean, sort_keys=True, default=str) + "\n")


def machine() -> dict:
    """Return the facts that a timing depends on."""
    return {"torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(), "dattri": dattri_version(),
            "platform": platform.platform()}


# ------------------------------------------------------------------------------------ main
def _log(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def run_side(args, name: str, side: str, states, gt, loo, base: dict) -> dict:
    """Measure ``name`` on ``side`` in a fresh process and score its quality; return its row."""
    spec = {"task": task_spec(args), "states": states, "method": name, "side": side,
            "hp": hyper_parameters(args), "repeats": args.repeats}
    row = {**base, "record": "method", "method": name, "side": side,
           **measure(spec, args.timeout or None)}
    if "scores" in row:
        row.update(quality(row["scores"], gt, loo))
    _log(args, f"  {side:>7} {name:<12} wall {row['wall_s']:.1f}s"
               + (f"  ERROR {_err(row)}" if _err(row) else ""))
    return row


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; print the tables; return ``{"rows", "pairs"}`` (with score tensors)."""
    from dattri_fn.eval.retrain import lds_ground_truth, loo_ground_truth

    args = parse_args(argv)
    # tqdm reads it when imported (torch imports it): set before spawning the workers
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.against == "dattri" and not dattri_available():
        raise SystemExit(f"--against dattri: dattri or a module it imports is missing "
                         f"({DATTRI_INSTALL}, or the [bench] extra)")
    task = load_task(task_spec(args))
    _log(args, f"{args.task}: n_train={args.n_train} n_test={args.n_test} m={args.subsets} "
               f"models={args.models}")
    gt = lds_ground_truth(task, args.subsets, cache_dir=args.cache_dir, seed=args.seed,
                          progress=not args.quiet)
    loo = None
    if args.loo:
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(args.n_train, generator=g)[: args.loo]
        loo = loo_ground_truth(task, idx, cache_dir=args.cache_dir, seed=args.seed,
                               progress=not args.quiet)
    states = train_states(task, args.models)
    base = {"run": datetime.datetime.now().isoformat(timespec="seconds"), "task": args.task,
            "n_train": args.n_train, "n_test": args.n_test, "subsets": args.subsets,
            "models": args.models, "loo": args.loo, "hp": hyper_parameters(args),
            "machine": machine(), "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]])
            if argv is None else " ".join(["python -m benchmarks.run", *argv])}
    rows = [run_side(args, name, "ours", states, gt, loo, base) for name in args.methods]
    if args.defaults:
        rows += [run_side(args, name, "defaults", states, gt, loo, base)
                 for name in args.methods if name in DEFAULTS]
    pairs = []
    if args.against == "dattri":
        pairs = run_against(args, task, states, gt, loo, base, rows)
    print(f"\n### {args.task}: n_train={args.n_train}, n_test={args.n_test}, LDS over "
          f"m={args.subsets} half-subsets, {args.models} model(s)\n")
    print(method_table([r for r in rows if r["side"] == "ours"], loo is not None))
    if args.defaults:
        print("\n### README defaults (only the settings a user must choose) vs the recipes\n")
        print(defaults_table(rows))
    if pairs:
        print(f"\n### ours vs dattri {dattri_version()} (ratios: ours / dattri)\n")
        print(against_table(pairs))
    append_jsonl(args.json, rows + [{**base, "record": "pair", **p} for p in pairs])
    return {"rows": rows, "pairs": pairs}


def run_against(args, task, states, gt, loo, base, rows) -> list[dict]:
    """Run dattri's counterparts (and our matched configurations); return the pair records."""
    from benchmarks.against_dattri import diagnose, exact_influence

    ours = {r["method"]: r for r in rows}
    models = load_models(task, states)
    names = [m for m in args.methods if m in COUNTERPARTS]
    names += [EXTRA_PAIRS[m] for m in names if m in EXTRA_PAIRS]
    exact = None
    if any(m in MATCHED for m in names):
        try:
            exact = exact_influence(task, models[:1], hyper_parameters(args))
        except RuntimeError as err:  # too large for a dense Hessian: no reference column
            _log(args, f"  no closed-form reference: {err}")
    pairs = []
    for name in names:
        side = "matched" if name in MATCHED or name in EXTRA_PAIRS.values() else "ours"
        mine = ours.get(name) if side == "ours" else None
        if mine is None:
            mine = run_side(args, name, side, states, gt, loo, base)
            rows.append(mine)
        theirs = run_side(args, name, "dattri", states, gt, loo, base)
        rows.append(theirs)
        pair = pair_record(name, mine, theirs, exact if name in MATCHED else None,
                           ours.get(name) if side == "matched" else None)
        if "scores" in mine:
            try:
                pair.update(diagnose(name, task, models, hyper_parameters(args), mine["scores"]))
            except Exception as err:  # a diagnosis is extra: report it, keep the pair
                pair["diagnose_error"] = f"{type(err).__name__}: {err}"[:160]
        pairs.append(pair)
    return pairs


if __name__ == "__main__":
    main()
