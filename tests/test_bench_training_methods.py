"""benchmarks.training_methods runs end to end on a tiny setting (both optimizers)."""

import math

import pytest

from benchmarks import training_methods


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_methods_benchmark_smoke(optimizer, capsys):
    """Every row has finite LDS under both ground truths and a time; the table is printed."""
    rows = training_methods.main(["--n-train", "40", "--n-test", "4", "--subsets", "6",
                                  "--epochs", "2", "--every", "1", "--proj-dim", "16", "--hidden", "4",
                                  "--optimizer", optimizer])
    names = [r["method"] for r in rows]
    assert names[:2] == ["magic", "source (gn, L=3)"]
    assert ("less" in names) == (optimizer == "adamw")
    assert any(n.startswith("dvemb") for n in names) == (optimizer == "sgd")
    assert ("source (ekfac, L=3)" in names) == (optimizer == "sgd")
    for r in rows:
        assert all(math.isfinite(r[k][0]) for k in ("std", "fixed")) and r["seconds"] >= 0
    assert "| method | LDS std" in capsys.readouterr().out
