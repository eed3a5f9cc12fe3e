"""Hook-free Linear taps: layer_io against torch.func per-sample gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from dattri_fn.transforms.layers import layer_io, linear_layers, tap_layers
from problems import SeqNet

DT = torch.float64


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.out = nn.Linear(2, 1)

    def forward(self, x):
        return self.out(self.lin(self.lin(x)))


def _problem(kind, seed, n, dim, hidden, classes, T, bias, device):
    """Return (module, loss_fn, batch): MLP on [B, D] or [B, T, D], or SeqNet on [B, T, D]."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "seq_head":
        model = SeqNet(dim, hidden, classes, bias)
        x = torch.randn(n, T, dim, generator=g, dtype=DT)
        y = torch.randint(0, classes, (n,), generator=g)
        loss_fn = F.cross_entropy
    else:
        model = nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.Tanh(),
                              nn.Linear(hidden, classes, bias=bias))
        shape = (n, dim) if kind == "mlp" else (n, T, dim)
        x = torch.randn(*shape, generator=g, dtype=DT)
        y = torch.randn(*shape[:-1], classes, generator=g, dtype=DT)
        loss_fn = lambda out, t: 0.5 * ((out - t) ** 2).sum()
    model = model.double().to(device)
    return model, loss_fn, (x.to(device), y.to(device))


def _torch_func_grads(model, loss_fn, params, batch):
    def loss(p, ex):
        x, y = ex
        return loss_fn(functional_call(model, p, (x[None],)), y[None])

    return vmap(grad(loss), in_dims=(None, 0))(params, batch)


@given(kind=st.sampled_from(["mlp", "mlp_seq", "seq_head"]), seed=st.integers(0, 2**16),
       n=st.integers(1, 5), dim=st.integers(1, 4), hidden=st.integers(1, 4),
       classes=st.integers(2, 3), T=st.integers(1, 3), bias=st.booleans(),
       chunk=st.sampled_from([None, 2]))
def test_layer_io_reproduces_per_sample_grads(device, kind, seed, n, dim, hidden, classes, T,
                                              bias, chunk):
    """dW_i = sum_t g_it a_it^T and db_i = sum_t g_it equal torch.func per-sample grads."""
    model, loss_fn, batch = _problem(kind, seed, n, dim, hidden, classes, T, bias, device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = _torch_func_grads(model, loss_fn, params, batch)
    io = layer_io(model, loss_fn, None, params, batch, chunk_size=chunk)
    assert list(io) == linear_layers(model)
    for layer, (a, g) in io.items():
        assert a.shape[0] == g.shape[0] == n and a.dtype == DT and a.device.type == device.type
        a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
        dW = torch.einsum("bto,bti->boi", g3, a3)
        torch.testing.assert_close(dW, ref[f"{layer}.weight"], atol=1e-10, rtol=0)
        if bias:
            torch.testing.assert_close(g3.sum(1), ref[f"{layer}.bias"], atol=1e-10, rtol=0)


def test_layer_io_shapes_and_params_override(device):
    """a, g keep the per-example token dim; params replace the module's tensors."""
    model, loss_fn, batch = _problem("seq_head", 0, 4, 3, 5, 2, 6, True, device)
    params = {k: 2 * v.detach() for k, v in model.named_parameters() if k.startswith("head")}
    io = layer_io(model, loss_fn, ["emb", "head"], params, batch)
    assert io["emb"][0].shape == (4, 6, 3) and io["emb"][1].shape == (4, 6, 5)
    assert io["head"][0].shape == (4, 5) and io["head"][1].shape == (4, 2)
    full = {k: v.detach() for k, v in model.named_parameters()} | params
    ref = _torch_func_grads(model, loss_fn, full, batch)
    a, g = io["head"]
    torch.testing.assert_close(torch.einsum("bo,bi->boi", g, a), ref["head.weight"],
                               atol=1e-10, rtol=0)


def test_layer_io_example_layouts(device):
    """Tensor (loss_fn(out)), dict (kwargs + "labels") and tuple examples give the same a, g."""
    model, loss_fn, (x, y) = _problem("mlp", 2, 4, 3, 2, 2, 1, True, device)
    params = dict(model.named_parameters())
    ref = layer_io(model, loss_fn, None, params, (x, torch.zeros_like(y)))
    for batch, fn in ((x, lambda out: 0.5 * (out**2).sum()),
                      ({"input": x, "labels": torch.zeros_like(y)}, loss_fn)):
        got = layer_io(model, fn, None, params, batch)
        for layer in ref:
            for u, v in zip(got[layer], ref[layer], strict=True):
                torch.testing.assert_close(u, v, atol=1e-14, rtol=0)


def test_tapped_is_pure_and_unchanged_at_zero_probes(device):
    """tapped(p, 0, x)[0] == module(x); a probe shifts that layer's output by itself."""
    model, _, (x, _) = _problem("mlp", 1, 3, 2, 4, 2, 1, True, device)
    tapped = tap_layers(model, "2")
    p = dict(model.named_parameters())
    out, acts = tapped(p, {"2": torch.zeros(3, 2, dtype=DT, device=device)}, x)
    torch.testing.assert_close(out, model(x), atol=0, rtol=0)
    torch.testing.assert_close(acts["2"], torch.tanh(model[0](x)), atol=0, rtol=0)
    shift = torch.ones(3, 2, dtype=DT, device=device)
    out2, _ = tapped(p, {"2": shift}, x)
    torch.testing.assert_close(out2, model(x) + shift, atol=1e-14, rtol=0)
    assert tapped.layers == ["2"]


def test_linear_layers_names_and_errors():
    """linear_layers lists Linear submodules in module order and validates include."""
    model = SeqNet(2, 3, 2, True)
    assert linear_layers(model) == ["emb", "head"]
    assert linear_layers(model, ["head", "emb"]) == ["emb", "head"]
    assert linear_layers(model, "head") == ["head"]
    with pytest.raises(ValueError, match=r"linear_layers\(include=...\).*unknown \['nope'\]"):
        linear_layers(model, ["nope"])
    with pytest.raises(ValueError, match=r"nn.Linear submodules.*'norm' \(LayerNorm\)"):
        linear_layers(model, ["norm"])
    with pytest.raises(ValueError, match=r"duplicates \['emb'\]"):
        linear_layers(model, ["emb", "emb"])
    with pytest.raises(TypeError, match=r"linear_layers\(module=...\): expected an nn.Module"):
        linear_layers(lambda x: x)
    with pytest.raises(ValueError, match=r"a bare nn.Linear.*nn.Sequential"):
        linear_layers(nn.Linear(2, 2))


def test_layer_io_errors(device):
    """Clear errors for layer names, params, batches, untraceable and re-used modules."""
    model, loss_fn, batch = _problem("mlp", 0, 3, 2, 3, 2, 1, True, device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layer_io\(layers=...\).*unknown \['9'\]"):
        layer_io(model, loss_fn, ["9"], params, batch)
    with pytest.raises(ValueError, match=r"layer_io\(layers=...\).*'1' \(Tanh\)"):
        layer_io(model, loss_fn, ["1"], params, batch)
    with pytest.raises(ValueError, match=r"layer_io\(params=...\).*unknown keys \['w'\]"):
        layer_io(model, loss_fn, None, {**params, "w": params["0.bias"]}, batch)
    with pytest.raises(ValueError, match=r"layer_io\(params=...\).*shapes.*0.bias"):
        layer_io(model, loss_fn, None, {**params, "0.bias": torch.zeros(7, dtype=DT)}, batch)
    with pytest.raises(ValueError, match=r"layer_io\(params=...\): expected finite"):
        layer_io(model, loss_fn, None, {**params, "0.bias": params["0.bias"] * float("nan")},
                 batch)
    bad = (batch[0].clone(), batch[1])
    bad[0][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer_io\(batch=...\): expected finite"):
        layer_io(model, loss_fn, None, params, bad)
    with pytest.raises(TypeError, match=r"layer_io\(batch=...\): expected a Tensor or a tuple"):
        layer_io(model, loss_fn, None, params, [batch[0], "y"])
    with pytest.raises(ValueError, match=r"layer_io\(chunk_size=...\)"):
        layer_io(model, loss_fn, None, params, batch, chunk_size=0)
    assert tap_layers(Twice(), ["out"]).layers == ["out"]


def test_no_trace_branches_and_reused_layers():
    """Without a trace a tensor-valued branch runs as written, and a layer called twice records
    both calls' inputs as two positions [B, 2, in] (its gradient sums over them)."""
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
    for module, shape in ((Branchy(), (3, 2)), (Twice(), (3, 2, 2))):
        tapped = tap_layers(module, ["lin"])
        state = dict(module.named_parameters())
        out, acts = tapped(state, {"lin": torch.zeros(())}, x)
        torch.testing.assert_close(out, module(x))
        assert acts["lin"].shape == shape


def test_per_example_losses_batched_cross_entropy_equals_vmap():
    """F.cross_entropy / classification_loss on [B, C] and class indices: the one-call path
    equals vmap over batches of one (an ignored target's NaN included), gradients too; other
    layouts take vmap."""
    import torch.nn.functional as F

    from dattri_fn.eval.tasks import classification_loss
    from dattri_fn.transforms.layers import per_example_losses

    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -100, 1, 2, 2])
    slow = lambda o, t: torch.func.vmap(lambda a, b: F.cross_entropy(a[None], b[None]))(o, t)
    want = slow(out, y)
    for loss_fn in (F.cross_entropy, classification_loss):
        got = per_example_losses(loss_fn, out, y)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0, equal_nan=True)
        keep = y != -100
        torch.testing.assert_close(
            torch.autograd.grad(got[keep].sum(), out)[0],
            torch.autograd.grad(slow(out, y)[keep].sum(), out)[0], rtol=1e-14, atol=1e-16)
    seq = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 4, (3, 5), generator=g)
    torch.testing.assert_close(per_example_losses(F.cross_entropy, seq, ys), slow(seq, ys),
                               rtol=1e-14, atol=0)
    soft = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1)
    torch.testing.assert_close(per_example_losses(F.cross_entropy, out.detach(), soft),
                               slow(out.detach(), soft), rtol=1e-14, atol=0)
