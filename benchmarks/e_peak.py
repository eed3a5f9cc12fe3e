"""Peak-memory increment of LoGra / FactGraSS prepare + score against dattri 0.3.0 (one thread).

    OMP_NUM_THREADS=1 python -m benchmarks.e_peak --task digits-mlp --runs 3

Each side's ``prepare + score`` runs in its own spawned process under
:func:`benchmarks.peak.measure_peak` (setup and a warm-up call not measured), sides alternated
``--runs`` times; the table gives each side's RSS increments (MiB; ~1 MiB resolution) and the
exact peak of the bytes its tensors hold (``tensors=True``), with the ratios of the medians.
Run it from another checkout's root with that tree on ``PYTHONPATH`` (``python
/path/to/benchmarks/e_peak.py``) for a before column.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TQDM_DISABLE", "1")


def _setup(task_name: str, side: str, method: str):
    import warnings

    import torch

    from benchmarks.run import DEFAULT_SIZES, load_models, load_task, runner_for, train_states

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    n_train, n_test, _ = DEFAULT_SIZES[task_name]
    task = load_task({"name": task_name, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, 1))
    hp = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
          "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}
    r = runner_for(side, method, task, models, hp)
    r.score(r.prepare())  # warm-up: library code paged in before the mark

    def step():
        r.score(r.prepare())
        return None

    return step


def main(argv=None) -> None:
    from benchmarks.peak import measure_peak

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--methods", default="logra,factgrass")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    print(f"{args.task}, {args.runs} runs per side, load {os.getloadavg()[0]:.2f}\n")
    print("| method | ours RSS MiB | dattri RSS MiB | RSS ratio | ours tensor MiB | dattri tensor MiB "
          "| tensor ratio |")
    print("|---|---|---|---|---|---|---|")
    for m in args.methods.split(","):
        rss, ten = {"ours": [], "dattri": []}, {"ours": [], "dattri": []}
        for _ in range(args.runs):
            for side in rss:
                got = measure_peak(_setup, args.task, side, m, tensors=True)
                rss[side].append(got["peak_mib"])
                ten[side].append(got["tensor_peak_mib"])
        fmt = lambda v: "/".join(f"{x:.2f}" for x in v)  # noqa: E731
        ratio = lambda d: statistics.median(d["ours"]) / max(statistics.median(d["dattri"]), 1e-9)  # noqa: E731
        print(f"| {m} | {fmt(rss['ours'])} | {fmt(rss['dattri'])} | {ratio(rss):.2f} | "
              f"{fmt(ten['ours'])} | {fmt(ten['dattri'])} | {ratio(ten):.2f} |")


if __name__ == "__main__":
    main()
