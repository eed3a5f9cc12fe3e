"""metagradient raises glibc's malloc thresholds by glibc's own rule: the reverse pass's freed
temporaries stay in the heap instead of being faulted back in (stop 27, digits-cnn ~0.7x a step)."""

import os
import subprocess
import sys
import textwrap

import pytest

# In a child process: the thresholds are process-wide and only rise.
_CHILD = textwrap.dedent("""
    import ctypes, sys, torch

    libc = ctypes.CDLL(None)
    libc.sbrk.restype = ctypes.c_void_p

    def from_heap(nbytes):
        # glibc maps a block above its mmap threshold far from the heap; below it, the block is
        # carved from the heap, under the program break.
        x = torch.empty(nbytes, dtype=torch.uint8)
        return x.data_ptr() < libc.sbrk(0)

    if sys.argv[1] == "metagradient":
        from dattri_fn.attribute.metagradient import metagradient
        from dattri_fn.training import make_step, sgd, train
        from dattri_fn.training.run import batch_order

        x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
        loss = lambda p, ex: (ex[0] @ p["w"] - ex[1]) ** 2
        p0 = {"w": torch.zeros(2, dtype=torch.float64)}
        opt = sgd(0.1)
        step = make_step(loss, opt)
        order = batch_order(8, batch_size=4, epochs=1, seed=0)
        traj = train(step, p0, opt.init(p0), (x, y), order)
        metagradient(step, traj, (x, y), order, {"w": torch.ones(1, 2, dtype=torch.float64)})
    print(from_heap(4 * 2**20), from_heap(16 * 2**20), from_heap(31 * 2**20))
""")


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


def _child(arg: str) -> list[str]:
    # glibc's tunables and another allocator preloaded would decide the thresholds instead
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True,
                          timeout=120, check=True, env=env).stdout.split()


@pytest.mark.slow  # two child processes import torch: 8-16 s on the shared machine
@pytest.mark.skipif(not _glibc(), reason="the thresholds' adaptation is glibc's")
def test_metagradient_serves_blocks_up_to_31_mib_from_the_heap():
    """In a fresh process 4, 16 and 31 MiB tensors are mapped on their own (each freed one goes
    back to the kernel); after one small metagradient() all three come from the heap (the
    call removed: mapped again)."""
    if _child("none") != ["False", "False", "False"]:
        pytest.skip("this process's allocator maps none of the blocks apart (not glibc's defaults)")
    assert _child("metagradient") == ["True", "True", "True"]
