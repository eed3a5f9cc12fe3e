"""benchmarks.logra_floor_ab: every step runs each round, and the patched settings are restored."""

import importlib

from benchmarks.logra_floor_ab import main, measure


def test_each_step_is_timed_each_round_and_patches_are_undone(capsys):
    """measure(): a positive thread-CPU time per step and round; logra._sliceable/_PASS_SHARE restored."""
    logra_mod = importlib.import_module("dattri_fn.attribute.logra")
    before = (logra_mod._sliceable, logra_mod._PASS_SHARE)
    ts = measure(40, 4, 2)
    assert list(ts) == ["ours", "ours one batch", "ours one batch whole", "ours share64", "floor"]
    assert all(len(v) == 2 and min(v) > 0 for v in ts.values())
    assert (logra_mod._sliceable, logra_mod._PASS_SHARE) == before
    main(["--n", "40", "--width", "4", "--rounds", "1"])
    assert "ours one batch whole   median" in capsys.readouterr().out
