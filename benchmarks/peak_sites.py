"""What is alive at a method's exact tensor peak, by allocation site (the stack that made it).

    OMP_NUM_THREADS=1 python -m benchmarks.peak_sites --task digits-lr --method trak [--side ours]

The runner is :func:`benchmarks.run.runner_for`'s (as in ``benchmarks.g_against``), warmed up once;
one ``prepare + score`` then runs under the profiler with ``profile_memory`` and Python stacks.
The CPU allocations and frees are replayed in time order: the moment the live bytes peak (over
the bytes at the start, as :func:`benchmarks.peak.tensor_peak` counts them) is found, and the
tensors alive then are listed, largest first, each with the innermost frames of this repository
(or of the code that called torch) that allocated it. The sum is the tensor peak.
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (torch imports it)

import torch  # noqa: E402

from benchmarks.run import DEFAULT_SIZES, load_models, load_task, runner_for, train_states  # noqa: E402

_OURS = ("dattri_fn", "benchmarks", "dattri/")


def _site(event, frames: int = 4) -> str:
    """The innermost ``frames`` Python frames above an allocation (ours first, else any)."""
    names, p = [], event.parent
    while p is not None:
        names.append(p.name)
        p = p.parent
    python = [n for n in names if ".py(" in n]
    ours = [n for n in python if any(k in n for k in _OURS)]
    return " < ".join((ours or python or names)[:frames])


def live_at_peak(step) -> tuple[int, list[tuple[int, str]]]:
    """Return ``(peak bytes, [(bytes, site)] of the tensors alive at the peak)`` of ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    kind = torch._C._profiler._EventType.Allocation
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        sentinel = torch.empty(64, dtype=torch.uint8)  # reads the running total at the start
        where = sentinel.data_ptr()
        del sentinel
        step()
    found, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == kind:
            found.append(e)
        stack.extend(e.children)
    found = sorted((e for e in found if e.extra_fields.device.type == "cpu"),
                   key=lambda e: e.start_time_ns)
    start = next(e.extra_fields.total_allocated - e.extra_fields.alloc_size for e in found
                 if e.extra_fields.ptr == where and e.extra_fields.alloc_size > 0)
    live, peak, at = {}, 0, {}
    for e in found:
        f = e.extra_fields
        if f.alloc_size > 0:
            live[f.ptr] = e
        else:
            live.pop(f.ptr, None)
        if f.total_allocated - start > peak:
            peak, at = f.total_allocated - start, dict(live)
    rows = sorted(((e.extra_fields.alloc_size, _site(e)) for e in at.values()), reverse=True)
    return peak, rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-lr", choices=tuple(DEFAULT_SIZES))
    p.add_argument("--method", default="trak")
    p.add_argument("--side", default="ours", help="ours, matched, dattri or defaults")
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    n_train, n_test, _ = DEFAULT_SIZES[args.task]
    task = load_task({"name": args.task, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, args.models))
    hp = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
          "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}
    r = runner_for(args.side, args.method, task, models, hp)
    r.score(r.prepare())  # warm-up: first-call set-ups (a projector's packed signs) not counted
    peak, rows = live_at_peak(lambda: r.score(r.prepare()))
    print(f"{args.task} {args.method} ({args.side}): tensor peak {peak / 2**20:.3f} MiB")
    for size, site in rows[:args.top]:
        print(f"{size / 2**20:8.3f} MiB  {site}")
    rest = rows[args.top:]
    if rest:
        print(f"{sum(s for s, _ in rest) / 2**20:8.3f} MiB  in {len(rest)} smaller tensors")


if __name__ == "__main__":
    main()
