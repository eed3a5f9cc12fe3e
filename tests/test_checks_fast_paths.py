"""Stop 27 (issues 14, 18): the checks' fast paths keep every refusal, and the K-FAC layer
selection reads the module's tied keys once per call."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dattri_fn._checks import all_finite, batch_leaves, batch_size, batch_to, check_params, is_batch
from dattri_fn.operators import kfac_layers


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_all_finite_with_and_without_autograd(grad, bad):
    x = torch.randn(5, 3)
    if bad is not None:
        x[2, 1] = bad
    x.requires_grad_(grad)
    assert all_finite(x) is (bad is None)
    big = torch.full((4,), 3e38)  # a sum that overflows: the elementwise test decides
    assert all_finite(big) is True


def test_all_finite_reads_a_plain_tensor_without_detach():
    x = torch.randn(8, 4)
    with _Ops() as ops:
        assert all_finite(x)
    assert "detach" not in ops.names


def test_refusals_still_name_key_and_row():
    with pytest.raises(ValueError, match=r"f\(params=...\): expected finite values, got NaN or "
                       r"inf at key 'b'"):
        check_params("f", "params", {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
    x = torch.ones(4, 2)
    x[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"g\(data=...\): expected finite values, got NaN or inf "
                       r"in row 3 of the batch"):
        batch_size("g", "data", (x, torch.zeros(4, dtype=torch.long)))


def test_batch_to_and_leaves_keep_their_contracts():
    x, y = torch.ones(3, 2), torch.zeros(3, dtype=torch.long)
    t = (x, y)
    assert batch_to(t, torch.device("cpu")) is t  # a tuple cannot change: handed back
    lst = [x, y]
    moved = batch_to(lst, torch.device("cpu"))
    assert moved is not lst and moved[0] is x  # a list: a new list, as before
    d = {"x": x}
    assert batch_to(d, torch.device("cpu")) is not d
    assert batch_to(x, "cpu") is x
    assert is_batch(t) and is_batch(lst) and is_batch(d) and not is_batch([]) and not is_batch(())
    assert not is_batch((x, 1))
    assert batch_leaves(t) == [x, y] and batch_leaves(d) == [x]


def test_kfac_tap_reads_tied_keys_once_per_selection(monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5),
                              torch.nn.Tanh(), torch.nn.Linear(5, 2))
    params = {k: v.detach() for k, v in net.named_parameters()}
    calls = []
    real = kfac_layers._tied_uses
    monkeypatch.setattr(kfac_layers, "_tied_uses", lambda m, keys: calls.append(keys) or real(m, keys))
    tapped = kfac_layers.kfac_tap(net, params)
    assert list(tapped.layers) == ["0", "2", "4"]
    # one for the params (_select_parts), one for the selected layers (_capture_layers): not one
    # per layer
    assert len(calls) == 2
