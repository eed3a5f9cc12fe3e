"""keep_heap: glibc serves re-allocated large blocks from the kept heap (no new page faults)."""

import subprocess
import sys
import textwrap

import pytest

from dattri_fn.training.heap import MMAP_THRESHOLD_MAX, keep_heap

# In a child process: the setting is process-wide and permanent, so the test process keeps its own.
_CHILD = textwrap.dedent("""
    import resource, torch
    from dattri_fn.training.heap import keep_heap

    def faults(cycles=2):
        # 12 x 8 MiB live at once: 96 MiB, above glibc's largest dynamic trim threshold (64 MiB),
        # so by default every cycle's blocks are unmapped or trimmed on free and faulted back.
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(cycles):
            xs = [torch.empty(2**21).fill_(1.0) for _ in range(12)]
            del xs
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults(1)
    default = faults()
    applied = keep_heap()
    faults(1)
    print(default, applied, faults())
""")


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


@pytest.mark.slow  # a child process imports torch: 4-8 s on the shared machine
@pytest.mark.skipif(not _glibc(), reason="mallopt semantics are glibc's")
def test_keep_heap_reuses_freed_blocks():
    """Two cycles of 12 live 8 MiB blocks (2048 pages each) fault >= 12 * 2048 pages by default and
    < 2048 after keep_heap(): the freed blocks are reused, not unmapped and faulted back."""
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert int(out[0]) >= 12 * 2048
    assert out[1] == "True"
    assert int(out[2]) < 2048


@pytest.mark.parametrize("bad", [0, MMAP_THRESHOLD_MAX + 1, 1.5, True])
def test_keep_heap_rejects_bad_threshold(bad):
    """A threshold outside glibc's [1, 32 MiB] (or not an int) is refused before any mallopt."""
    with pytest.raises(ValueError, match=r"keep_heap\(mmap_threshold=...\): expected an int in "
                                         r"\[1, 33554432\]"):
        keep_heap(mmap_threshold=bad)
