"""benchmarks.magic on toy sizes: rows scored against the three ground truths, the scan step."""

import pytest

from benchmarks import magic as bench
from benchmarks import run


@pytest.mark.slow
def test_magic_benchmark_smoke(tmp_path, capsys):
    """A tiny run prints an LDS in [-1, 1] under each protocol for magic, magic-ens and magic@gt
    (two spawned methods, no scan)."""
    out = bench.main(["--n-train", "70", "--n-test", "4", "--subsets", "5", "--r", "2",
                      "--models", "2", "--methods", "", "--scan", "",
                      "--cache-dir", str(tmp_path), "--quiet"])
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"magic", "magic-ens", "magic@gt"}
    for row in rows.values():
        for label in ("std r=1", "std r=2", "fixed"):
            assert -1.0 <= row[label][0] <= 1.0, (row["method"], label)
    assert "| magic-ens |" in capsys.readouterr().out


def test_scan_step_counts_steps_and_checkpoints():
    """scan_setup's step (in process): T = epochs * ceil(n / 64) steps, ceil(T / c) + 1 states."""
    args = bench._runner_args(bench.parse_args(["--n-train", "70", "--n-test", "3"]))
    step = bench.scan_setup({"task": run.task_spec(args), "epochs": 2, "every": 3})
    res = step()
    assert res["T"] == 4 and res["checkpoints"] == 3 and res["score_s"] > 0
