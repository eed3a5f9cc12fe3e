"""Peak memory of one step: resident size (``measure_peak``) and live tensor bytes (``tensor_peak``).

``measure_peak(fn, *args)``: in a fresh spawned process the setup ``step = fn(*args)`` runs first
(not measured), then the kernel's peak mark is reset through ``/proc/self/clear_refs``, ``VmRSS``
is read, ``step()`` runs and ``VmHWM`` is read: the increment is the step's own peak over the
process's size just before it, measured the same way for every side of a comparison
(interpreter, torch import and inputs excluded). Its resolution is coarse: glibc arenas, page
granularity and freed-but-kept heap move it by ~1 MiB from run to run.

``tensor_peak(step)``: the high-water mark of the bytes held by CPU tensors that ``step()``
allocates, exact to the byte. torch's CPU allocator reports every allocation and free (with the
running total of live bytes, kept under its own lock) to the profiler when ``profile_memory`` is
on; the peak is the largest running total during the step minus the total when it began. Frees of
tensors allocated before the step are not reported (the allocator never saw their size), so the
step's peak is over the bytes it allocated itself, never lowered by dropping older tensors. It
counts what goes through torch's allocator on the threads the profiler covers (with one thread,
every tensor both sides allocate); memory that BLAS, numpy or Python objects allocate directly
is not counted (``measure_peak`` still sees it).
"""

from __future__ import annotations

import multiprocessing
import re
import resource
from collections.abc import Callable
from typing import Any

import torch


def _vm_kib(field: str) -> int:
    """Return a ``Vm*`` line of /proc/self/status (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M).group(1))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); return False where it is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _allocations(events) -> list:
    """Return the allocation records (``alloc_size``: + allocation, - free) of an event tree,
    as ``(start_time_ns, record)`` in time order."""
    kind = torch._C._profiler._EventType.Allocation
    found, stack = [], list(events)
    while stack:
        e = stack.pop()
        if e.tag == kind:
            found.append((e.start_time_ns, e.extra_fields))
        stack.extend(e.children)
    return sorted(found, key=lambda te: te[0])


def tensor_peak(step: Callable[[], Any]) -> tuple[Any, int]:
    """Return ``(step(), peak)``: ``peak`` the most bytes of CPU tensors allocated by ``step()``
    alive at once (see the module doc).

    A sentinel tensor allocated first reads the allocator's running total at the start; it is
    freed before ``step()`` runs, so it adds nothing.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sentinel = torch.empty(64, dtype=torch.uint8)
        where = sentinel.data_ptr()
        del sentinel
        result = step()
    allocs = _allocations(prof.profiler.kineto_results.experimental_event_tree())
    cpu = [a for _, a in allocs if a.device.type == "cpu"]
    start = next(a.total_allocated - a.alloc_size for a in cpu if a.ptr == where and a.alloc_size > 0)
    return result, max([start, *(a.total_allocated for a in cpu)]) - start


def _peak_child(conn, fn, args, tensors: bool = False) -> None:
    try:
        step = fn(*args)
        reset = _reset_peak_rss()
        before = _vm_kib("VmRSS")
        result = step()
        # VmHWM, not ru_maxrss: ru_maxrss also holds the RSS of the parent image that spawn
        # exec'd over (kept in the kernel's signal->maxrss), which clear_refs never resets.
        peak = _vm_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        extra = {}
        if tensors:  # after the RSS mark: the profiler's own buffers must not count there
            extra["tensor_peak_mib"] = tensor_peak(getattr(step, "once", step))[1] / 2**20
        conn.send(("ok", (result, (peak - before) / 1024.0, reset, extra)))
    except BaseException as exc:  # hand any failure back instead of a silent exit
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _spawned(target, fn, args, timeout: float | None, *extra) -> tuple[str, Any]:
    """Run ``target(conn, fn, args, *extra)`` in a spawned process; return what it sent."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(send, fn, args, *extra), daemon=True)
    proc.start()
    send.close()
    try:
        if timeout is not None and not recv.poll(timeout):
            proc.kill()
            return "timeout", None
        return recv.recv()
    except EOFError:
        return "error", f"the child exited with code {proc.join() or proc.exitcode}"
    finally:
        proc.join()


def measure_peak(fn, *args, timeout: float | None = None, tensors: bool = False) -> dict:
    """Return ``{"result", "peak_mib", "peak_reset"}``, ``{"error"}`` or ``{"timeout": True}``.

    ``fn`` must be a module-level function, ``args`` and the step's result picklable, and the
    caller's ``__main__`` importable (a script or ``-m`` module), as for any ``spawn``. Let the
    setup warm up the code the step runs: a first call pages in library code, which counts as
    RSS. ``peak_reset`` is False where /proc/self/clear_refs cannot be written (the peak then
    also covers the setup: an upper bound). A child still running after ``timeout`` s is killed.
    ``tensors=True`` adds ``"tensor_peak_mib"``: the step runs once more, after the RSS mark was
    read, under :func:`tensor_peak` (``step.once`` instead where the step has that attribute, e.g.
    one run of a step that repeats itself for timing).
    """
    status, payload = _spawned(_peak_child, fn, args, timeout, tensors)
    if status == "timeout":
        return {"timeout": True}
    if status != "ok":
        return {"error": payload}
    result, peak_mib, reset, extra = payload
    return {"result": result, "peak_mib": peak_mib, "peak_reset": reset, **extra}
