"""Peak resident memory of one step, in a fresh spawned process: ``measure_peak(fn, *args)``.

The setup ``step = fn(*args)`` runs first (not measured), then the kernel's peak mark is reset
through ``/proc/self/clear_refs``, ``VmRSS`` is read, ``step()`` runs and ``VmHWM`` is read: the
increment is the step's own peak over the process's size just before it, measured the same way
for every side of a comparison (interpreter, torch import and inputs excluded).
"""

from __future__ import annotations

import multiprocessing
import re
import resource


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


def _peak_child(conn, fn, args) -> None:
    try:
        step = fn(*args)
        reset = _reset_peak_rss()
        before = _vm_kib("VmRSS")
        result = step()
        # VmHWM, not ru_maxrss: ru_maxrss also holds the RSS of the parent image that spawn
        # exec'd over (kept in the kernel's signal->maxrss), which clear_refs never resets.
        peak = _vm_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send(("ok", (result, (peak - before) / 1024.0, reset)))
    except BaseException as exc:  # hand any failure back instead of a silent exit
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def measure_peak(fn, *args, timeout: float | None = None) -> dict:
    """Return ``{"result", "peak_mib", "peak_reset"}``, ``{"error"}`` or ``{"timeout": True}``.

    ``fn`` must be a module-level function, ``args`` and the step's result picklable, and the
    caller's ``__main__`` importable (a script or ``-m`` module), as for any ``spawn``. Let the
    setup warm up the code the step runs: a first call pages in library code, which counts as
    RSS. ``peak_reset`` is False where /proc/self/clear_refs cannot be written (the peak then
    also covers the setup: an upper bound). A child still running after ``timeout`` s is killed.
    """
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_child, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()
    try:
        if timeout is not None and not recv.poll(timeout):
            proc.kill()
            return {"timeout": True}
        status, payload = recv.recv()
    except EOFError:
        status, payload = "error", f"the child exited with code {proc.join() or proc.exitcode}"
    finally:
        proc.join()
    if status != "ok":
        return {"error": payload}
    result, peak_mib, reset = payload
    return {"result": result, "peak_mib": peak_mib, "peak_reset": reset}
