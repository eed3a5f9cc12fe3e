"""benchmarks.record_cost: every mode runs the same loop and leaves no store behind."""

import pytest

from benchmarks import record_cost as bench


@pytest.mark.slow
def test_record_cost_rows(tmp_path):
    """4 steps, one repeat: a row per mode with a positive time; the stores are removed."""
    rows = bench.main(["--steps", "4", "--repeats", "1", "--shards", "2", "--proj-dim", "16",
                       "--root", str(tmp_path)])
    assert [r["mode"] for r in rows] == ["loop only", "grads only", "one store per step", "append 2"]
    assert all(r["s_per_step"] > 0 for r in rows)
    assert list(tmp_path.iterdir()) == []
