"""LoGra against EK-FAC influence and TRAK on a bundled task: LDS, time and peak memory.

    OMP_NUM_THREADS=1 python -m benchmarks.logra --task digits-mlp
    OMP_NUM_THREADS=1 python -m benchmarks.logra --task text-lm --n-train 128 --n-test 16 --subsets 32

Every row is measured in this run, on the same trained model and the same LDS ground truth
(cached by :mod:`dattri_fn.eval.retrain`). ``logra k`` projects each layer's input and output
gradient to ``k`` dimensions (``k^2`` features per layer); ``logra full`` does not project and
equals EK-FAC influence on the same layers (a check printed as the correlation with ``if-ekfac``).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.peak import measure_peak
from benchmarks.run import DEFAULT_SIZES, load_models, load_task, train_states


def _setup(spec: dict):
    """Build one method in a spawned process, warm it up on 64 rows; return the timed step."""
    import warnings

    from dattri_fn.app.recipes import recipe
    from dattri_fn.attribute import logra
    from dattri_fn.model import functional_model

    warnings.filterwarnings("ignore")
    task = load_task(spec["task"])
    model = load_models(task, spec["states"])[0]
    name, k = spec["method"], spec["k"]
    if name.startswith("logra"):
        fm = functional_model(model, task.loss_fn)  # LoGra keeps the captured layers' params
        train = [(task.x_train[i:i + 256], task.y_train[i:i + 256])
                 for i in range(0, task.n_train, 256)]
        method = logra(fm, proj_dim=k, damping=spec["damping"])
        params, test = fm.params, (task.x_test, task.y_test)
    else:
        r = recipe(name, task, [model])
        method, params, train, test = r.method, r.params, r.train, r.test
    warm = [(train[0][0][:64], train[0][1][:64])]
    method.score(params, method.prepare(params, warm), warm, (test[0][:2], test[1][:2]))

    def step() -> dict:
        t0 = time.perf_counter()
        state = method.prepare(params, train)
        t1 = time.perf_counter()
        scores = method.score(params, state, train, test)
        t2 = time.perf_counter()
        return {"prepare_s": t1 - t0, "score_s": t2 - t1,
                "scores": scores.detach().to(torch.float64).numpy()}

    return step


def main(argv=None) -> None:
    from dattri_fn.eval.metrics import lds
    from dattri_fn.eval.retrain import lds_ground_truth

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--subsets", type=int)
    p.add_argument("--ks", default="4,8,16,full")
    args = p.parse_args(argv)
    n_train, n_test, m = DEFAULT_SIZES.get(args.task, (256, 32, 32))
    spec = {"name": args.task, "n_train": args.n_train or n_train,
            "n_test": args.n_test or n_test, "seed": 0, "device": "cpu"}
    task = load_task(spec)
    gt = lds_ground_truth(task, args.subsets or m, seed=0, progress=False)
    states = train_states(task, 1)
    wd = float(task.hparams.get("weight_decay", 0.0))
    runs = [("if-ekfac", None, None), ("trak", None, None)]
    for k in args.ks.split(","):
        kk = None if k == "full" else int(k)
        runs += [(f"logra {k}", kk, None), (f"logra {k} damping=wd", kk, wd + 1e-3)]
    rows, ref = [], None
    for label, k, damping in runs:
        out = measure_peak(_setup, {"task": spec, "states": states, "method": label.split()[0],
                                  "k": k, "damping": damping})
        if "error" in out:
            rows.append(f"| {label} | — | — | — | — | {out['error'][:80]} |")
            continue
        res = out["result"]
        S = torch.from_numpy(res["scores"])
        q = lds(S, gt.subsets, gt.targets.to(S.dtype))
        if label == "if-ekfac":
            ref = S
        corr = "" if ref is None or label == "if-ekfac" else \
            f"{float(torch.corrcoef(torch.stack([S.flatten(), ref.flatten()]))[0, 1]):.4f}"
        rows.append(f"| {label} | {float(q.mean):.3f} [{float(q.ci95[0]):.3f}, "
                    f"{float(q.ci95[1]):.3f}] | {res['prepare_s'] + res['score_s']:.2f} | "
                    f"{out['peak_mib']:.0f} | {corr} | |")
    print(f"\n### LoGra on {args.task}: n_train={spec['n_train']}, n_test={spec['n_test']}, "
          f"LDS over m={args.subsets or m} half-subsets\n")
    print("| method | LDS [95% CI] | time s | peak MiB | corr with if-ekfac | error |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
