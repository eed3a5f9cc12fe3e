"""Keep freed CPU memory in the process heap (glibc ``mallopt``) for loops that re-allocate the
same large tensors: MAGIC's reverse pass.

torch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (dynamic,
at most 32 MiB) by a fresh ``mmap``, and returns the heap's free top to the OS once it exceeds
the trim threshold; either way the next allocation of that size touches new pages, which the
kernel zero-fills on first touch. A reverse step of MAGIC on text-lm (``k = 16`` targets)
allocates and frees tensors of 8-25 MiB hundreds of times: by default 16-37 thousand minor page
faults and 60-115 ms of system time per step (~10% of it), plus the cache misses of touching
new pages. With blocks up to 32 MiB served from the heap and the heap never trimmed, the faults
and the system time go to ~0 (``benchmarks/RESULTS.md``, issue 20, stop 22). The arithmetic is
unchanged: results are the same bits.

The cost: the process keeps its peak heap mapped (its resident size does not shrink after a
large computation), and the setting is process-wide and permanent (glibc cannot go back to its
dynamic threshold). Hence an explicit call, never a side effect of a method.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (malloc.h) and glibc's cap on the mmap threshold on 64-bit builds
# (HEAP_MAX_SIZE / 2).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_heap(*, mmap_threshold: int = MMAP_THRESHOLD_MAX) -> bool:
    """Serve allocations up to ``mmap_threshold`` bytes from the heap and never trim it; return
    whether it was applied (False off glibc Linux, where nothing is changed).

    Process-wide and permanent (module docstring). Sets the mmap threshold first: a fixed trim
    threshold alone would also fix the mmap threshold at its 128 KiB start, which made the
    text-lm reverse step ~3x slower.

    Raises:
        ValueError: ``mmap_threshold`` not an int in ``[1, 32 MiB]``.
    """
    if (isinstance(mmap_threshold, bool) or not isinstance(mmap_threshold, int)
            or not 1 <= mmap_threshold <= MMAP_THRESHOLD_MAX):
        raise ValueError(f"keep_heap(mmap_threshold=...): expected an int in [1, "
                         f"{MMAP_THRESHOLD_MAX}] (glibc's cap), got {mmap_threshold!r}.")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only: musl's mallopt is a no-op
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    # -1 is SIZE_MAX to glibc: trimming off.
    return mallopt(M_TRIM_THRESHOLD, -1) == 1


__all__ = ["keep_heap"]
