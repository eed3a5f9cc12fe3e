"""The nn.Module bridge: selection, buffers, multi-input/dict batches, checkpoint loading."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, hvp, load_params, per_sample_grad


def _loop_grads(model, names, examples, loss_of):
    rows = []
    for ex in examples:
        model.zero_grad()
        loss_of(model, ex).backward()
        rows.append(torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names]))
    return torch.stack(rows)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_per_sample_grads_with_buffers_and_subset():
    """BatchNorm (eval) buffers are used; grads over the selected layer equal autograd's."""
    net = _net()
    net.train()
    net(torch.randn(32, 4, dtype=torch.float64))  # populate running stats
    net.eval()
    fm = functional_model(net, F.cross_entropy, params="3")
    assert list(fm.params) == ["3.weight", "3.bias"]
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    G = per_sample_grad(fm.loss, fm.params, (x, y))
    ref = _loop_grads(net, list(fm.params), [(x[i:i + 1], y[i:i + 1]) for i in range(5)],
                      lambda m, ex: F.cross_entropy(m(ex[0]), ex[1]))
    torch.testing.assert_close(G, ref, rtol=0, atol=1e-12)


def test_predicate_selection_and_hvp_runs():
    """A predicate selects parameters; hvp over the bridge gives a P x P-consistent operator."""
    net = _net().eval()
    fm = functional_model(net, F.cross_entropy, params=lambda n: n.endswith("weight"))
    assert list(fm.params) == ["0.weight", "1.weight", "3.weight"]
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    op = hvp(fm.loss, fm.params, (x, y))
    H = op.dense()
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-10)


class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, u, v):
        return self.a(u) + self.b(v)


def test_multi_input_tuple_and_dict_examples():
    """(u, v, y) tuples and {'u','v','labels'} dicts give the same per-sample grads as autograd."""
    torch.manual_seed(1)
    net = TwoInput().double()
    u, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    fm = functional_model(net, F.cross_entropy)
    G = per_sample_grad(fm.loss, fm.params, (u, v, y))
    Gd = per_sample_grad(fm.loss, fm.params, {"u": u, "v": v, "labels": y})
    ref = _loop_grads(net, list(fm.params), [(u[i:i + 1], v[i:i + 1], y[i:i + 1]) for i in range(4)],
                      lambda m, ex: F.cross_entropy(m(ex[0], ex[1]), ex[2]))
    torch.testing.assert_close(G, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(Gd, ref, rtol=0, atol=1e-12)
    out = fm.forward(fm.params, (u[0], v[0], y[0]))
    torch.testing.assert_close(out, net(u[:1], v[:1])[0])


def test_bad_keys_and_unknown_names():
    """Unknown selections and params dicts with wrong keys raise naming the keys."""
    net = _net().eval()
    with pytest.raises(ValueError, match=r"functional_model\(params=...\): .*unknown \['9'\]"):
        functional_model(net, F.cross_entropy, params=["9"])
    fm = functional_model(net, F.cross_entropy, params="3")
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 3, (2,))
    bad = {"3.weight": fm.params["3.weight"], "0.bias": fm.params["3.bias"]}
    with pytest.raises(ValueError, match=r"missing \['3.bias'\], unexpected \['0.bias'\]"):
        per_sample_grad(fm.loss, bad, (x, y))
    with pytest.raises(TypeError, match=r"functional_model\(module=...\)"):
        functional_model(lambda x: x, F.cross_entropy)


def test_training_mode_warns():
    """A module with BatchNorm in training mode warns: per-example grads need eval()."""
    with pytest.warns(UserWarning, match="module.eval"):
        functional_model(_net().train(), F.cross_entropy)


def test_load_params(tmp_path):
    """A saved state dict loads for exactly the selected keys; missing keys/shapes are named."""
    net = _net().eval()
    fm = functional_model(net, F.cross_entropy, params="3")
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path)
    loaded = load_params(path, fm.params)
    assert list(loaded) == list(fm.params)
    torch.testing.assert_close(loaded["3.bias"], fm.params["3.bias"])
    with pytest.raises(ValueError, match=r"load_params\(source=...\): .*missing \['3.bias'\]"):
        load_params({"3.weight": fm.params["3.weight"]}, fm.params)
    with pytest.raises(ValueError, match=r"shape mismatch at \['3.bias'\]"):
        load_params({"3.weight": fm.params["3.weight"], "3.bias": torch.zeros(7)}, fm.params)
    with pytest.raises(ValueError, match=r"expected finite values"):
        load_params({k: v * float("nan") for k, v in fm.params.items()}, fm.params)


def test_load_checkpoints_for_an_ensemble(tmp_path):
    """Paths and state dicts load to the selected keys; a bad one is named by position."""
    from dattri_fn import load_checkpoints

    net = _net().eval()
    fm = functional_model(net, F.cross_entropy, params="3")
    torch.save(net.state_dict(), tmp_path / "a.pt")
    ckpts = load_checkpoints([tmp_path / "a.pt", net.state_dict()], fm.params)
    assert len(ckpts) == 2 and all(list(c) == list(fm.params) for c in ckpts)
    with pytest.raises(ValueError, match=r"load_checkpoints\(sources\[1\]=...\): .*missing"):
        load_checkpoints([net.state_dict(), {"3.weight": fm.params["3.weight"]}], fm.params)
    with pytest.raises(TypeError, match=r"load_checkpoints\(sources=...\)"):
        load_checkpoints(str(tmp_path / "a.pt"), fm.params)
