"""TRAK's recipe at a base commit against the working tree: interleaved A/B in ONE process.

    OMP_NUM_THREADS=1 python -m benchmarks.trak_ab --task digits-lr --base <rev> [--rounds 40]

The working tree's ``dattri_fn`` is copied to a temporary directory as ``dattri_fn_base`` with
TRAK's own modules (``dattri_fn/attribute/trak*.py``) as they are at ``--base`` (so other
engineers' uncommitted files are on both sides), every ``dattri_fn`` name in it renamed (its own
module checks, e.g. ``trak_pair._captured``'s, see its own ``functional_model``); both packages
build the recipe ``g_against`` times (3 models, DEFAULT_SIZES, proj_dim 512) on the same task
and modules.
Each round runs ``prepare + score`` of both, alternating which goes first; main-thread CPU
time, each side's median and the median and quartiles of the per-round ratios (new / base).
The states (kernel, features, weights) and the scores of the two are compared (torch.equal).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.run import BENCH_HP, DEFAULT_SIZES, task_and_models  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def base_package(rev: str) -> str:
    """The working tree's ``dattri_fn`` with TRAK's modules at ``rev``, importable as
    ``dattri_fn_base``."""
    out = Path(tempfile.mkdtemp(prefix="trak_ab_"))
    pkg = out / "dattri_fn_base"
    shutil.copytree(ROOT / "dattri_fn", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for f in (pkg / "attribute").glob("trak*.py"):
        f.unlink()
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "dattri_fn/attribute/"],
                           cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        if Path(name).name.startswith("trak") and name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            (pkg / "attribute" / Path(name).name).write_text(text)
    for f in (out / "dattri_fn_base").rglob("*.py"):
        f.write_text(re.sub(r"\bdattri_fn\b", "dattri_fn_base", f.read_text()))
    sys.path.insert(0, str(out))
    return "dattri_fn_base"


def runner(pkg: str, task, models):
    recipes = importlib.import_module(f"{pkg}.app.recipes")
    hp = BENCH_HP
    r = recipes.recipe("trak", task, models, damping=hp["damping"], proj_dim=hp["proj_dim"],
                       seed=hp["seed"], batch_size=hp["batch_size"])
    return lambda: (lambda s: (s, r.method.score(r.params, s, r.train, r.test)))(
        r.method.prepare(r.params, r.train))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-lr", choices=tuple(DEFAULT_SIZES))
    p.add_argument("--base", required=True, help="git revision of the base side")
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    task, models = task_and_models(args.task, args.models)
    sides = {"base": runner(base_package(args.base), task, models),
             "new": runner("dattri_fn", task, models)}
    out = {k: f() for k, f in sides.items()}  # warm-up, and the values compared
    cpu = {k: [] for k in sides}
    for i in range(args.rounds):
        for k in ("base", "new") if i % 2 == 0 else ("new", "base"):
            c0 = time.thread_time()
            sides[k]()
            cpu[k].append(time.thread_time() - c0)
    ratios = [b / a for a, b in zip(cpu["base"], cpu["new"], strict=True)]
    q = statistics.quantiles(ratios, n=4)
    print(f"{args.task}: {args.rounds} rounds, load {os.getloadavg()[0]:.2f}; prepare + score "
          f"thread CPU ms: base {args.base} {1e3 * statistics.median(cpu['base']):.2f}, new "
          f"{1e3 * statistics.median(cpu['new']):.2f}; median per-round ratio new/base "
          f"{statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    (s0, S0), (s1, S1) = out["base"], out["new"]
    same = all(torch.equal(a, b) for a, b in zip(s0[:3], s1[:3], strict=True)
               if isinstance(a, torch.Tensor))
    print(f"state (kernel, features, weights) torch.equal: {same}, scores torch.equal: "
          f"{torch.equal(S0, S1)}")


if __name__ == "__main__":
    main()
