"""Every method against dattri 0.3.0 in ONE process: time interleaved, exact tensor peaks.

    OMP_NUM_THREADS=1 python -m benchmarks.g_against --task digits-mlp [--methods rps,trak]

``benchmarks.run --against dattri`` measures each side in its own process at a different moment
(a load swing moves its time ratio) and its resident-size peak has ~1 MiB resolution. Here both
sides' runners are the ones that command builds (:func:`benchmarks.run.runner_for`: our recipe,
or our configuration matched to dattri's quantity where ``run`` uses one; ``trak-noproj`` is TRAK
on raw gradients on both sides), built in one process on the same task and models, warmed up
once, then:

* time: ``prepare + score`` alternates ours / dattri for ``--repeats`` rounds (fewer, at least 1,
  when a round takes long: about ``--budget`` seconds per method); the main thread's CPU time
  (one thread: all of the work) and the wall time, each side's median and the median of the
  per-round ratios;
* memory: one more ``prepare + score`` per side under :func:`benchmarks.peak.tensor_peak` (the
  exact high-water mark of the bytes of CPU tensors the run allocates; the same allocator counts
  both sides), twice alternated (once for a side whose run takes over 2 s); a second value that
  differs from the first is printed too.

A side whose run takes longer than ``--profile-limit`` seconds is not profiled: the profiler
keeps every operator event until the run ends (dattri's RPS on digits-mlp, a 40 CPU-s run, grew
the process past 17 GiB); its memory cells are left empty.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (torch imports it)

import torch  # noqa: E402

from benchmarks.against_dattri import COUNTERPARTS, MATCHED  # noqa: E402
from benchmarks.peak import tensor_peak  # noqa: E402
from benchmarks.run import (  # noqa: E402
    DEFAULT_SIZES,
    EXTRA_PAIRS,
    load_models,
    load_task,
    runner_for,
    train_states,
)


def _once(runner) -> tuple[float, float]:
    """Return (main-thread CPU s, wall s) of one ``prepare + score``."""
    c0, t0 = time.thread_time(), time.perf_counter()
    runner.score(runner.prepare())
    return time.thread_time() - c0, time.perf_counter() - t0


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def compare(name: str, task, models, hp: dict, repeats: int, budget: float,
            profile_limit: float) -> dict:
    """Return one method's row: times, ratios and tensor peaks (MiB) of both sides."""
    side = "matched" if name in MATCHED or name in EXTRA_PAIRS.values() else "ours"
    row: dict = {"method": name, "ours_side": side}
    try:
        runners = {"ours": runner_for(side, name, task, models, hp),
                   "dattri": runner_for("dattri", name, task, models, hp)}
        for r in runners.values():  # warm-up: pages in library code, first-call set-ups
            _once(r)
    except Exception as err:  # a side that fails is a row with its error
        return {**row, "error": f"{type(err).__name__}: {err}"[:160]}
    cpu = {"ours": [], "dattri": []}
    wall = {"ours": [], "dattri": []}
    rounds = 1  # the first timed round sets how many fit in the budget
    while len(cpu["ours"]) < rounds:
        for k, r in runners.items():
            c, w = _once(r)
            cpu[k].append(c)
            wall[k].append(w)
        if len(cpu["ours"]) == 1:
            per_round = wall["ours"][0] + wall["dattri"][0]
            rounds = max(1, min(repeats, int(budget / max(per_round, 1e-9))))
    row.update(rounds=rounds, load=os.getloadavg()[0],
               **{f"{k}_cpu_s": _med(cpu[k]) for k in cpu},
               **{f"{k}_wall_s": _med(wall[k]) for k in wall},
               cpu_ratio=_med([a / b for a, b in zip(cpu["ours"], cpu["dattri"], strict=True)]),
               wall_ratio=_med([a / b for a, b in zip(wall["ours"], wall["dattri"], strict=True)]))
    peaks: dict = {"ours": [], "dattri": []}
    for again in range(2):
        for k, r in runners.items():
            if _med(wall[k]) <= (profile_limit if again == 0 else min(profile_limit, 2.0)):
                peaks[k].append(tensor_peak(lambda r=r: r.score(r.prepare()))[1] / 2**20)
    for k, v in peaks.items():
        row[f"{k}_tensor_mib"] = v[0] if v else None
        row[f"{k}_tensor_mib_again"] = v[1] if len(v) > 1 and v[1] != v[0] else None
    o, d = row["ours_tensor_mib"], row["dattri_tensor_mib"]
    row["mem_ratio"] = o / d if o is not None and d else None
    return row


def _cell(x, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(rows: list[dict]) -> str:
    """Markdown: per method, both sides' CPU time, the CPU and wall ratios, tensor peaks, ratio."""
    head = ["method", "rounds", "ours CPU s", "dattri CPU s", "CPU ratio", "wall ratio",
            "ours tensor MiB", "dattri tensor MiB", "mem ratio", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        again = "; ".join(f"{k} 2nd run {_cell(r.get(f'{k}_tensor_mib_again'), '.3f')}"
                          for k in ("ours", "dattri") if r.get(f"{k}_tensor_mib_again") is not None)
        notes = "; ".join(x for x in (r.get("error", ""), "matched config" if r["ours_side"] ==
                                      "matched" else "", again) if x)
        lines.append("| " + " | ".join([
            r["method"], str(r.get("rounds", "—")), _cell(r.get("ours_cpu_s"), ".4f"),
            _cell(r.get("dattri_cpu_s"), ".4f"), _cell(r.get("cpu_ratio"), ".3f"),
            _cell(r.get("wall_ratio"), ".3f"), _cell(r.get("ours_tensor_mib"), ".3f"),
            _cell(r.get("dattri_tensor_mib"), ".3f"), _cell(r.get("mem_ratio"), ".3f"),
            notes]) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-mlp", choices=tuple(DEFAULT_SIZES))
    p.add_argument("--methods", default="all",
                   help="'all' (every method with a dattri counterpart, and trak-noproj) or a list")
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per method")
    p.add_argument("--profile-limit", type=float, default=10.0,
                   help="no tensor peak for a side whose run takes longer (seconds)")
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")  # dattri warns per batch
    names = list(COUNTERPARTS) + ["trak-noproj"] if args.methods == "all" else [
        m.strip() for m in args.methods.split(",") if m.strip()]
    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, args.models))
    hp = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
          "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}
    rows = []
    for name in names:
        rows.append(compare(name, task, models, hp, args.repeats, args.budget, args.profile_limit))
        print(f"  {name}: {rows[-1]}", flush=True)
    print(f"\n{args.task}: n_train={n_train}, n_test={n_test}, {args.models} models, "
          f"threads={torch.get_num_threads()}, load {os.getloadavg()[0]:.2f} at the end\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
