"""mlp_io's kernel-level shortcuts (stop 25): no nll_loss_forward (the summed backward never reads
its total_weight), the first activation after a Linear applied in place, a cached 0-d one.
Values are pinned torch.equal to the engine by tests/test_mlp_io.py; here: the label errors the
forward raised are still raised (the backward checks the labels), and no input is written."""

import pytest
import torch
import torch.nn.functional as F
from test_mlp_io import _data, _engine, _layers, _mlp, _state
from torch import nn

from dattri_fn.transforms.mlp_io import mlp_io


@pytest.mark.parametrize("bad", [7, 9, -1, -5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_label_out_of_range_raises_the_engines_error(bad, dtype):
    m = _mlp(0, [nn.Tanh], True, dtype)
    x, y = _data(0, 6, 13, 7, dtype)
    y[4] = bad
    with pytest.raises(IndexError) as ref:
        _engine(m, F.cross_entropy, _state(m), x, y, _layers(m))
    with pytest.raises(IndexError) as got:
        mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, _layers(m))
    assert str(got.value) == str(ref.value) == f"Target {bad} is out of bounds."


@pytest.mark.parametrize("acts", [[nn.Tanh], [nn.ReLU], [nn.Sigmoid, nn.Tanh], [nn.ReLU, nn.Sigmoid]])
def test_nothing_passed_in_is_written_and_repeated_calls_agree(acts):
    """x, the state and labels are left as they were; a second call (the cached one) gives the
    same values; two activations in a row keep the first's output for its backward."""
    m = _mlp(3, acts, True, torch.float64, (13, 9, 6, 7))
    x, y = _data(3, 11, 13, 7, torch.float64)
    st = _state(m)
    before = (x.clone(), y.clone(), {k: v.clone() for k, v in st.items()})
    first = mlp_io(m, F.cross_entropy, st, (x,), {}, y, _layers(m))
    again = mlp_io(m, F.cross_entropy, st, (x,), {}, y, _layers(m))
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])
    assert all(torch.equal(st[k], v) for k, v in before[2].items())
    ref = _engine(m, F.cross_entropy, st, x, y, _layers(m))
    for n in _layers(m):
        for i in (0, 1):
            assert torch.equal(first[n][i], ref[n][i]) and torch.equal(again[n][i], ref[n][i])
