"""RPS (representer points, ``recipe("rps")``) on digits-lr: before/after a change and dattri
0.3.0's RPSAttributor, interleaved in one invocation.

    OMP_NUM_THREADS=1 python -m benchmarks.rps_speed --before d469687 --rounds 3

Each round runs the three sides one after another, each in a fresh process
(``benchmarks.run.bench_setup``: the task, the trained model, a warm-up on a 64-row slice,
then ``prepare`` + ``score`` timed, best of ``--repeats``). ``before`` imports the library as
it was at the commit ``--before`` (``git archive`` into a temporary directory placed first on
``PYTHONPATH``); ``after`` is this checkout. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from benchmarks.run import bench_setup, train_states, load_task
import dattri_fn
spec = json.loads(sys.argv[1])
task = load_task(spec["task"])
spec["states"] = train_states(task, 1)
step = bench_setup(spec)
out = step()
print(json.dumps({"prepare_s": out["prepare_s"], "score_s": out["score_s"],
                  "library": dattri_fn.__file__}))
"""


def side(name: str, spec: dict, pythonpath: str) -> dict:
    """Run one side in a fresh process and return its timings (and the library it imported).

    The child runs in the first ``pythonpath`` directory: ``python -c`` puts its working
    directory first on ``sys.path``, so that directory's ``dattri_fn`` is the one imported.
    """
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    spec = dict(spec, side="dattri" if name == "dattri" else "ours")
    cwd = pythonpath.split(os.pathsep)[0]
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=cwd, env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default=None, help="commit of the 'before' side (none: skipped)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--task", default="digits-lr")
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-test", type=int, default=50)
    args = p.parse_args(argv)
    spec = {"task": {"name": args.task, "n_train": args.n_train, "n_test": args.n_test,
                     "seed": 0, "device": "cpu", "hparams": None},
            "method": "rps", "repeats": args.repeats,
            "hp": {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
                   "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}}
    sides = {"after": str(ROOT), "dattri": str(ROOT)}
    tmp = None
    if args.before:
        tmp = tempfile.TemporaryDirectory()
        archive = subprocess.run(["git", "archive", args.before, "dattri_fn"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp.name], input=archive, check=True)
        sides = {"before": f"{tmp.name}{os.pathsep}{ROOT}", **sides}
    print("load before:", os.getloadavg())
    rows = []
    for r in range(args.rounds):
        for name, path in sides.items():
            res = side(name, spec, path)
            res.update(round=r, side=name)
            rows.append(res)
            total = res.get("prepare_s", 0) + res.get("score_s", 0)
            print(f"round {r} {name:7s} prepare {res.get('prepare_s', float('nan')):.4f} s "
                  f"score {res.get('score_s', float('nan')):.4f} s total {total:.4f} s "
                  f"{res.get('error', '')} ({res.get('library', '?')})", flush=True)
    print("load after:", os.getloadavg())
    for r in range(args.rounds):
        t = {row["side"]: row.get("prepare_s", 0) + row.get("score_s", 0)
             for row in rows if row["round"] == r}
        ratios = [f"after/dattri {t['after'] / t['dattri']:.3f}"]
        if "before" in t:
            ratios += [f"before/dattri {t['before'] / t['dattri']:.3f}",
                       f"after/before {t['after'] / t['before']:.3f}"]
        print(f"round {r}: " + ", ".join(ratios))
    if tmp is not None:
        tmp.cleanup()
    return rows


if __name__ == "__main__":
    main()
