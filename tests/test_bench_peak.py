"""benchmarks.peak: the live-tensor high-water mark is exact on known allocation patterns."""

from __future__ import annotations

import pytest
import torch

from benchmarks.peak import measure_peak, tensor_peak

MIB = 2**20


def _bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


def _x_then_y(x: int, y: int) -> int:
    a = _bytes(x)
    del a
    b = _bytes(y)
    return b.numel()


def test_sequential_peak_is_the_larger():
    """Allocate x, free it, allocate y: peak = max(x, y) bytes exactly, either order."""
    for x, y in ((3 * MIB, 5 * MIB + 17), (7 * MIB + 3, 2 * MIB)):
        result, peak = tensor_peak(lambda x=x, y=y: _x_then_y(x, y))
        assert result == y
        assert peak == max(x, y)


def test_overlapping_peak_is_the_sum():
    """x alive while y is allocated, then both freed and z allocated: peak = max(x + y, z)."""
    def step():
        a, b = _bytes(3 * MIB), _bytes(MIB + 5)
        del a, b
        return _bytes(4 * MIB).numel()

    assert tensor_peak(step)[1] == max(3 * MIB + MIB + 5, 4 * MIB)


def test_freeing_older_tensors_does_not_lower_the_peak():
    """A tensor allocated before the step and freed in it is not subtracted: peak = y."""
    held = [_bytes(6 * MIB)]

    def step():
        held.clear()  # frees 6 MiB the allocator counted before the step
        return _bytes(2 * MIB).numel()

    assert tensor_peak(step)[1] == 2 * MIB


def test_an_op_counts_its_output_and_temporaries():
    """(a + a) * a on float64 [n]: the sum's n * 8 bytes alive with the product's: peak = 2 n * 8."""
    a = torch.ones(100_000, dtype=torch.float64)
    _, peak = tensor_peak(lambda: (a + a) * a)
    assert peak == 2 * 100_000 * 8


def _pattern_setup(x: int, y: int):
    warm = _bytes(1)  # the first allocation pages in the allocator; not part of the step
    del warm

    def step():
        return _x_then_y(x, y)

    step.once = step
    return step


@pytest.mark.slow
def test_spawned_measure_agrees_with_in_process():
    """measure_peak(tensors=True) in a spawned process reports max(x, y) / 2**20 MiB exactly."""
    x, y = 3 * MIB, 2 * MIB + 1024
    both = measure_peak(_pattern_setup, x, y, timeout=120, tensors=True)
    assert both["result"] == y and both["tensor_peak_mib"] == max(x, y) / MIB
    assert both["peak_mib"] >= 0.0


def test_pair_ratio_uses_tensor_peaks_and_keeps_rss():
    """mem ratio = ours / dattri tensor peak (1 / 4); the RSS ratio (10 / 20) is its own column."""
    from benchmarks import run

    ours = {"method": "rps", "side": "ours", "prepare_s": 0.0, "score_s": 1.0, "peak_mib": 10.0,
            "tensor_peak_mib": 0.5}
    theirs = {**ours, "side": "dattri", "peak_mib": 20.0, "tensor_peak_mib": 2.0}
    pair = run.pair_record("rps", ours, theirs, None)
    assert pair["peak_ratio"] == 0.25 and pair["rss_ratio"] == 0.5
    row = run.against_table([pair]).splitlines()[-1]
    assert "| 0.50 | 2.00 | 0.25 | 10.0 | 20.0 | 0.50 |" in row
