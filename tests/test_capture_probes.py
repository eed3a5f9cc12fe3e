"""Per-call probes that are the layer outputs themselves (no zero added), the rerun with added
probes after an in-place op on an output, flat records and the summed loss of the capture
passes (dattri_fn/transforms/capture.py, layers.py), float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dattri_fn.transforms.capture import bias_grad, tap, weight_grad
from dattri_fn.transforms.layers import (
    batched_io,
    cross_entropy_rows,
    output_shapes,
    per_example_losses,
    streamed_io,
    summed_losses,
)

DT = torch.float64


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / 2)
    return model


class Mlp(nn.Module):
    """fc1 -> tanh -> fc2 (called twice, a flat layer with two records) -> head."""

    def __init__(self, d=4, h=5, c=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, c)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc2(h)))))


class SeqNet(nn.Module):
    """Embedding -> [B, T, D] Linear with bias (a view output) -> LayerNorm -> pooled head."""

    def __init__(self, V=7, D=4, c=3):
        super().__init__()
        self.emb, self.fc, self.ln = nn.Embedding(V, D), nn.Linear(D, D), nn.LayerNorm(D)
        self.head = nn.Linear(D, c)

    def forward(self, idx):
        return self.head(self.ln(torch.tanh(self.fc(self.emb(idx)))).mean(1))


class ConvNet(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 4 * 4, c)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class InPlace(nn.Module):
    """In-place ops on captured outputs: ``where`` picks which (the first layer's output, which
    has no graph; a later one, which has; a view of either)."""

    def __init__(self, where, d=4, h=5, c=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, c)
        self.where = where

    def forward(self, x):
        h = self.fc1(x)
        if self.where == "first":
            h = F.relu(h, inplace=True)
        elif self.where == "first-view":
            h[:, :2].mul_(3.0)
        h = self.fc2(torch.tanh(h))
        if self.where == "later":
            h.relu_()
        elif self.where == "later-view":
            h[:, 1:].add_(0.5)
        return self.head(torch.tanh(h))


def _data(kind, seed, B):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (B,), generator=g)
    if kind == "seq":
        return torch.randint(0, 7, (B, 5), generator=g), y
    if kind == "conv":
        return torch.randn(B, 2, 4, 4, generator=g, dtype=DT), y
    return torch.randn(B, 4, generator=g, dtype=DT), y


MODELS = {"mlp": (Mlp, ["fc1", "fc2", "head"]),
          "seq": (SeqNet, ["emb", "fc", "ln", "head"]),
          "conv": (ConvNet, ["conv", "fc"])}


def _io(model, layers, x, y, *, shapes):
    """``{layer: (a, g)}`` of one plain pass: ``shapes=False`` probes made per call (the
    outputs themselves), ``True`` probes of the given shapes added to the outputs."""
    tapped = tap(model, layers)
    state = {k: v.detach() for k, v in model.named_parameters()}
    like = state[tapped.specs[tapped.layers[0]].weight]
    sh = output_shapes(tapped, state, (x,), {}, like) if shapes else None
    return tapped, state, batched_io(tapped, F.cross_entropy, state, (x,), {}, y, sh, like)


def _grads(tapped, state, io):
    out = {}
    for n, (a, g) in io.items():
        spec = tapped.specs[n]
        out[spec.weight] = weight_grad(spec, a, g, state[spec.weight].shape)
        if spec.bias is not None:
            out[spec.bias] = bias_grad(spec, g).reshape(-1, *state[spec.bias].shape)
    return out


def _reference(model, keys, x, y):
    """``d loss_i / d theta`` by one autograd call per example.  # {key: [B, *shape]}"""
    params = dict(model.named_parameters())
    rows = []
    for i in range(y.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.autograd.grad(loss, [params[k] for k in keys]))
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(keys)}


def _equal(got, want):
    assert got.keys() == want.keys()
    for n in want:
        for u, v in zip(got[n], want[n], strict=True):
            assert u.shape == v.shape and torch.equal(u, v), n


@pytest.mark.parametrize("kind", list(MODELS))
@given(seed=st.integers(0, 2**16), B=st.integers(1, 6))
def test_output_probes_equal_added_probes(kind, seed, B):
    """g = dL/dz taken at each layer output z itself == g taken at a zero probe added to z,
    bit for bit (Linear, a flat layer called twice, Embedding, a [B, T, D] Linear, LayerNorm,
    Conv2d), and a is the same."""
    cls, layers = MODELS[kind]
    model = _init(cls(), seed)
    x, y = _data(kind, seed, B)
    _, _, own = _io(model, layers, x, y, shapes=False)
    _, _, added = _io(model, layers, x, y, shapes=True)
    _equal(own, added)


def test_probes_are_the_outputs():
    """Without in-place ops, each per-call probe is the call's output (no zero added); a Linear
    output without a graph (a bare Linear, the first layer) gets one from a detached alias of
    its weight that requires grad (no leaf: review R4); a first Conv2d's or LayerNorm's output
    gets an added zero-stride probe (their nodes would hold more)."""
    model = _init(nn.Linear(4, 3), 0)
    x, _ = _data("mlp", 0, 5)
    tapped = tap(model, [""])
    state = {k: v.detach() for k, v in model.named_parameters()}
    with torch.enable_grad():
        run = tapped.probed(state, x)
    p = run.probes[""][0]
    assert p is run.output and p.grad_fn is not None and not state["weight"].requires_grad
    model = _init(Mlp(), 1)
    tapped = tap(model, ["fc1", "fc2"])
    state = {k: v.detach() for k, v in model.named_parameters()}
    with torch.enable_grad():
        run = tapped.probed(state, x)
    assert [len(run.probes[n]) for n in ("fc1", "fc2")] == [1, 2]
    assert all(p.grad_fn is not None and p.stride() != (0, 0) for n in ("fc1", "fc2")
               for p in run.probes[n])
    model = _init(ConvNet(), 2)
    tapped = tap(model, ["conv", "fc"])
    state = {k: v.detach() for k, v in model.named_parameters()}
    with torch.enable_grad():
        run = tapped.probed(state, _data("conv", 2, 3)[0])
    assert run.probes["conv"][0].stride() == (0, 0, 0, 0)
    assert run.probes["fc"][0].stride() != (0, 0)
    model = _init(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3)), 3)
    tapped = tap(model, ["0", "1"])
    state = {k: v.detach() for k, v in model.named_parameters()}
    with torch.enable_grad():
        run = tapped.probed(state, x)
    assert run.probes["0"][0].stride() == (0, 0) and run.probes["1"][0].stride() != (0, 0)


class _Frozen(nn.Module):
    """A first layer run under torch.no_grad (a frozen part), then two trained layers; with an
    in-place op after the second when ``inplace`` (which makes the pass rerun)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.l1, self.l2, self.head, self.inplace = (nn.Linear(4, 5), nn.Linear(5, 5),
                                                     nn.Linear(5, 3), inplace)

    def forward(self, x):
        with torch.no_grad():
            h = self.l1(x)
        h = self.l2(torch.tanh(h))
        h = h.relu_() if self.inplace else h.relu()
        return self.head(h)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_layer_under_no_grad_gets_no_gradient(inplace):
    """Review R4 F1: the frozen layer's per-example gradient is 0 (it was 0.28-0.35 off when its
    graph-less output was made a leaf), the others equal per-example autograd (1e-10); with an
    in-place op the rerun's probes are made with grad enabled (it raised)."""
    model = _init(_Frozen(inplace), 7)
    x, y = _data("mlp", 7, 6)
    layers = ["l1", "l2", "head"]
    tapped, state, own = _io(model, layers, x, y, shapes=False)
    got = _grads(tapped, state, own)
    trained = [k for k in got if not k.startswith("l1.")]
    ref = _reference(model, trained, x, y)
    for k in trained:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    assert float(got["l1.weight"].abs().max()) == 0.0 == float(got["l1.bias"].abs().max())


@pytest.mark.parametrize("where", ["first", "first-view", "later", "later-view"])
def test_in_place_on_an_output_reruns_with_added_probes(where):
    """An in-place op on a captured output (or a view of it) would make dL/dout the modified
    tensor's gradient: the pass reruns with zero probes added, and every layer's per-example
    gradient equals per-example autograd (1e-10) and the added-probe pass bit for bit."""
    model = _init(InPlace(where), 3)
    x, y = _data("mlp", 3, 6)
    layers = ["fc1", "fc2", "head"]
    tapped, state, own = _io(model, layers, x, y, shapes=False)
    _, _, added = _io(model, layers, x, y, shapes=True)
    _equal(own, added)
    ref = _reference(model, list(_grads(tapped, state, own)), x, y)
    for k, v in _grads(tapped, state, own).items():
        torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-12, msg=k)
    with torch.enable_grad():
        run = tapped.probed(state, x)
    # every output has a graph (the first layer's through its weight's alias), so an in-place
    # op on any of them makes the pass rerun: every probe is then an added one
    assert all(p.stride() == (0,) * p.ndim for n in layers for p in run.probes[n])


@pytest.mark.parametrize("where", ["first", "later", None])
def test_streamed_io_takes_the_same_pairs(where):
    """streamed_io with per-call probes gives each layer the (a, g) of batched_io, bit for bit,
    with and without an in-place op on an output."""
    model = _init(InPlace(where) if where else Mlp(), 4)
    x, y = _data("mlp", 4, 5)
    layers = ["fc1", "fc2", "head"]
    tapped, state, want = _io(model, layers, x, y, shapes=False)
    got = {}
    like = state["fc1.weight"]
    streamed_io(tapped, F.cross_entropy, state, (x,), {}, y, None, like,
                lambda n, a, g: got.__setitem__(n, (a, g)))
    _equal(got, want)


def test_flat_layer_input_is_the_call_input():
    """A flat layer's a is its call's input itself ([B, in], same storage); a flat layer called
    twice gets [B, 2, in] (the two inputs in call order)."""
    model = _init(Mlp(), 5)
    x, y = _data("mlp", 5, 4)
    tapped = tap(model, ["fc1", "fc2"])
    state = {k: v.detach() for k, v in model.named_parameters()}
    with torch.enable_grad():
        run = tapped.probed(state, x)
    assert run.acts["fc1"] is x
    h = torch.tanh(F.linear(x, state["fc1.weight"], state["fc1.bias"]))
    h2 = torch.tanh(F.linear(h, state["fc2.weight"], state["fc2.bias"]))
    assert run.acts["fc2"].shape == (4, 2, 5)
    torch.testing.assert_close(run.acts["fc2"], torch.stack([h, h2], 1), rtol=0, atol=0)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 40), C=st.integers(2, 9),
       ignored=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_summed_losses_gradient_is_the_rows_sum_gradient(seed, B, C, ignored, dtype):
    """d/dz summed_losses == d/dz sum_i cross_entropy_rows(z, y)_i bit for bit, with ignored
    targets (-100) too; the value is the rows' sum where no target is ignored."""
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(B, C, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    if ignored:
        y[::3] = -100
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    for loss_fn in (F.cross_entropy, _ce_with_rows):
        v1 = summed_losses(loss_fn, z1, y)
        v2 = per_example_losses(loss_fn, z2, y).sum()
        assert torch.equal(torch.autograd.grad(v1, z1)[0], torch.autograd.grad(v2, z2)[0])
        if not ignored:
            torch.testing.assert_close(v1, v2, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                       atol=0)


def _ce_with_rows(out, target):
    return F.cross_entropy(out, target)


_ce_with_rows.per_example = cross_entropy_rows


def test_summed_losses_of_other_losses_is_the_rows_sum():
    """Any other loss: summed_losses == per_example_losses(...).sum() exactly."""
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 3, generator=g, dtype=DT)
    mse = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    assert torch.equal(summed_losses(mse, out, target), per_example_losses(mse, out, target).sum())


class Watched(nn.Module):
    """fc1 -> tanh -> fc2 -> tanh -> head; records whether fc2's output is still alive when
    the backward reaches the model output."""

    def __init__(self, d=4, h=5, c=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, c)
        self.alive = []

    def forward(self, x):
        import weakref

        h = self.fc2(torch.tanh(self.fc1(x)))
        ref = weakref.ref(h)
        out = self.head(torch.tanh(h))
        out.register_hook(lambda g: self.alive.append(ref() is not None))
        return out


@pytest.mark.parametrize("streamed", [False, True])
def test_probes_are_not_held_through_the_backward(streamed):
    """The pass takes gradients at the probes' autograd edges: a layer output that the graph
    does not save (fc2's, tanh saves its result) is freed before the backward starts."""
    model = _init(Watched(), 6)
    x, y = _data("mlp", 6, 4)
    tapped = tap(model, ["fc1", "fc2", "head"])
    state = {k: v.detach() for k, v in model.named_parameters()}
    if streamed:
        streamed_io(tapped, F.cross_entropy, state, (x,), {}, y, None, state["fc1.weight"],
                    lambda n, a, g: None)
    else:
        batched_io(tapped, F.cross_entropy, state, (x,), {}, y, None, state["fc1.weight"])
    assert model.alive == [False]
