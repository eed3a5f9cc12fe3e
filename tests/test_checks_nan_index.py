"""``_checks.batch_size`` refuses a NaN/inf input naming its first row (one reduction on the
failure path): ``example first + i`` where the caller gives the batch's offset (``count_rows``
over a list of batches does), else ``row i of the batch`` (stop 25, engineer F2)."""

import pytest
import torch

from dattri_fn._checks import batch_size, count_rows

F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_first_bad_row_of_a_batch_is_named(dtype, bad):
    x = torch.randn(6, 2, 3, dtype=dtype)
    x[4, 1, 2] = bad
    x[5, 0, 0] = bad
    y = torch.arange(6)
    with pytest.raises(ValueError, match=r"^f\(train=\.\.\.\): expected finite values, got NaN "
                                         r"or inf in row 4 of the batch\.$"):
        batch_size("f", "train", (x, y))
    with pytest.raises(ValueError, match=r"got NaN or inf in example 14\.$"):
        batch_size("f", "train", {"y": y, "x": x}, first=10)


def test_the_first_row_across_leaves_and_batches():
    """The first leaf holding a bad value is named (in leaf order); count_rows gives the global
    index over a list of batches."""
    a, b = torch.randn(4, 3), torch.randn(4)
    b[1] = float("nan")
    with pytest.raises(ValueError, match=r"row 1 of the batch"):
        batch_size("f", "train", (a, b))
    x = torch.randn(7, 3)
    x[5, 0] = float("nan")
    shards = [(x[:3],), (x[3:6],), (x[6:],)]
    with pytest.raises(ValueError, match=r"^f\(train=\.\.\.\): .* in example 5\.$"):
        count_rows("f", "train", shards)
    assert count_rows("f", "train", [(x[:3],), (x[6:],)]) == 4


def test_collect_names_the_example_across_shards():
    """pipeline.collect passes each shard's offset: a NaN in the third shard is named by its
    index over the whole data set (the lead, from engineer F2's patch)."""
    from dattri_fn.attribute.pipeline import collect

    shards = [(torch.randn(2, 3), torch.arange(2)) for _ in range(3)]
    shards[2][0][1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^g\(train=\.\.\.\): .*NaN or inf in example 5\.$"):
        collect(lambda b: b[0], shards, func="g", arg="train")
