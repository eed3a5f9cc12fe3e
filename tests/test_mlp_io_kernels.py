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


_MODULE_HOOKS = {
    "forward": lambda m: m.register_forward_hook(lambda mod, i, o: None),
    "forward_pre": lambda m: m.register_forward_pre_hook(lambda mod, i: None),
    "full_backward": lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
    "full_backward_pre": lambda m: m.register_full_backward_pre_hook(lambda mod, go: None),
    "backward (legacy)": lambda m: m.register_backward_hook(lambda mod, gi, go: None),
}
_GLOBAL_HOOKS = {
    "forward": lambda: nn.modules.module.register_module_forward_hook(lambda m, i, o: None),
    "forward always_call": lambda: nn.modules.module.register_module_forward_hook(
        lambda m, i, o: None, always_call=True),
    "forward_pre": lambda: nn.modules.module.register_module_forward_pre_hook(lambda m, i: None),
    "full_backward": lambda: nn.modules.module.register_module_full_backward_hook(
        lambda m, gi, go: None),
    "full_backward_pre": lambda: nn.modules.module.register_module_full_backward_pre_hook(
        lambda m, go: None),
    "backward (legacy)": lambda: nn.modules.module.register_module_backward_hook(
        lambda m, gi, go: None),
}


@pytest.mark.parametrize("where", [None, 0, 1, 2])  # the Sequential, its Linear, Tanh, Linear
@pytest.mark.parametrize("kind", list(_MODULE_HOOKS))
def test_a_module_hook_of_any_kind_declines(kind, where):
    """Every hook kind on the container or any child: None; removed again: the values."""
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    x, y = _data(0, 8, 13, 7, torch.float32)
    handle = _MODULE_HOOKS[kind](m if where is None else m[where])
    assert mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, _layers(m)) is None
    handle.remove()
    assert mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, _layers(m)) is not None


@pytest.mark.parametrize("kind", list(_GLOBAL_HOOKS))
def test_a_global_module_hook_of_any_kind_declines(kind, monkeypatch):
    # (torch refuses a legacy global backward hook after a full one, even removed: reset its flag)
    monkeypatch.setattr(nn.modules.module, "_global_is_full_backward_hook", None)
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    x, y = _data(0, 8, 13, 7, torch.float32)
    handle = _GLOBAL_HOOKS[kind]()
    try:
        assert mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, _layers(m)) is None
    finally:
        handle.remove()
    assert mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, _layers(m)) is not None
