"""FactGraSS's scores on the bundled tasks in several checkouts: how far each tree's float32 scores
move from the first tree's, and (digits tasks) their LDS.

    OMP_NUM_THREADS=1 python -m benchmarks.factgrass_taskbits --tree base=/tmp/base --tree now=. \
        [--task digits-lr --task digits-mlp ...] [--lds]

FactGraSS is built as ``g_against`` builds it (:func:`benchmarks.factgrass_ab._ours`: ``d = 64``,
blowup 4, the task's first model, batches of 256). Printed per task and tree: the largest
score difference to the first tree's relative to its largest score (0: ``torch.equal``), and with
``--lds`` the LDS against the task's cached ground truth (``.cache/dattri_fn``, as
``benchmarks.run``; computed there first where missing, minutes).
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.factgrass_taskbits",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=TREE (repeatable)")
    p.add_argument("--task", action="append", default=None)
    p.add_argument("--lds", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from benchmarks.capture_method_ab import _load
    from benchmarks.factgrass_ab import _ours
    from benchmarks.run import DEFAULT_SIZES, task_and_models

    pkgs = [(n, _load(n, t)) for n, t in (s.split("=", 1) for s in args.tree)]
    for name in args.task or ["digits-lr", "digits-mlp", "digits-cnn", "text-lm"]:
        task, models = task_and_models(name, 1)
        got = []
        for tree, pkg in pkgs:
            prepare, score = _ours(pkg, task, models, 256)
            got.append((tree, score(prepare())))
        ref = got[0][1]
        line = [f"{name} ({str(ref.dtype)[6:]}, {list(ref.shape)})"]
        for tree, s in got:
            rel = float((s - ref).abs().max() / ref.abs().max())
            line.append(f"{tree}: {'equal' if torch.equal(s, ref) else f'{rel:.2e}'}")
        if args.lds and name.startswith("digits"):
            from dattri_fn.eval.metrics import lds
            from dattri_fn.eval.retrain import lds_ground_truth

            gt = lds_ground_truth(task, DEFAULT_SIZES[name][2], cache_dir=".cache/dattri_fn",
                                  seed=0, progress=False)
            for tree, s in got:
                line.append(f"LDS {tree} {float(lds(s, gt.subsets, gt.targets.to(s.dtype)).mean):.4f}")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
