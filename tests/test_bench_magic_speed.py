"""benchmarks.magic_speed on a tiny run: the settings it times give the same weights bit for bit."""

import pytest
import torch

from benchmarks import magic_speed


@pytest.mark.slow  # imports the eval stack (sklearn data) on first use
def test_per_step_settings_agree_bit_for_bit(capsys):
    """digits-lr, 40 examples, the last 2 steps: every (checkpoint_every, chunk_size) row's weights
    equal the first row's exactly (max diff 0.0) and each row has one positive time per round."""
    torch.manual_seed(0)
    out = magic_speed.main(["--task", "digits-lr", "--n-train", "40", "--n-test", "3",
                            "--steps", "2", "--chunks", "2", "--rounds", "1"])
    assert set(out["diff"].values()) == {0.0} and len(out["diff"]) == 3
    assert all(len(v) == 1 and v[0] > 0 for v in out["ms"].values())
    assert "| 1 | 2 |" in capsys.readouterr().out


def test_full_times_either_recipe():
    """--recipe picks what --full times (default the 3-run ensemble); another name is refused."""
    assert magic_speed.parse_args(["--full"]).recipe == "magic-ens"
    assert magic_speed.parse_args(["--full", "--recipe", "magic"]).recipe == "magic"
    with pytest.raises(SystemExit):
        magic_speed.parse_args(["--full", "--recipe", "trak"])
