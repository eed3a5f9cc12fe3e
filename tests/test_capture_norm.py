"""The capture engine's LayerNorm kind and broadcast (shared-index) embeddings against
per-example autodiff, float64 at 1e-10 (dattri_fn/transforms/capture_norm.py)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dattri_fn.transforms.capture import (
    CaptureError,
    bias_grad,
    check,
    layer_specs,
    probe_shapes,
    tap,
    weight_grad,
)

DT = torch.float64


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


class NormNet(nn.Module):
    """tok + pos (arange or [1, T] ids) -> LayerNorm -> fc -> the same LayerNorm -> head."""

    def __init__(self, V=7, T=5, D=4, C=3, bias=True, ids="row", shape=None):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln = nn.LayerNorm(D, bias=bias)
        self.ln2 = nn.LayerNorm(shape or D)
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, C)
        self.ids = ids

    def forward(self, idx):
        T = idx.shape[1]
        pos = torch.arange(T) if self.ids == "flat" else torch.arange(T)[None]
        h = self.tok(idx) + self.pos(pos)
        h = self.ln(torch.tanh(self.fc(self.ln(h))) + h)  # one LayerNorm used twice
        return self.head(self.ln2(h))


def _data(seed, n, T=5, V=7, C=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T), generator=g), torch.randint(0, C, (n, T), generator=g)


def _loss_rows(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)


def _reference(model, keys, x, y):
    """vmap(grad) of the one-example loss w.r.t. ``keys``.  # {key: [n, *shape]}"""
    state = {k: v.detach() for k, v in model.named_parameters()}

    def one(r, xi, yi):
        out = torch.func.functional_call(model, {**state, **r}, (xi[None],))
        return _loss_rows(out, yi[None]).sum()

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(
        {k: state[k] for k in keys}, x, y)


def _captured(model, layers, x, y, how="probed"):
    """Per-example grads of the layers' weights and biases from ONE batched capture pass."""
    tapped = tap(model, layers)
    state = {k: v.detach() for k, v in model.named_parameters()}
    if how == "probed":  # one probe per call, plain autograd
        run = tapped.probed(state, x)
        value = _loss_rows(run.output, y).sum()
        flat = [p for n in tapped.layers for p in run.probes[n]]
        grads = iter(torch.autograd.grad(value, flat))
        g = run.fold({n: [next(grads) for _ in run.probes[n]] for n in tapped.layers})
        acts = run.acts
    else:  # probe_shapes + torch.func.grad
        with torch.no_grad():
            _, acts = tapped(state, {n: torch.zeros((), dtype=DT) for n in tapped.layers}, x)
        probes = {n: torch.zeros(s, dtype=DT) for n, s in probe_shapes(tapped, acts).items()}

        def total(pr):
            out, acts = tapped(state, pr, x)
            return _loss_rows(out, y).sum(), acts

        g, acts = torch.func.grad(total, has_aux=True)(probes)
    out = {}
    for n, spec in tapped.specs.items():
        out[spec.weight] = weight_grad(spec, acts[n], g[n], state[spec.weight].shape)
        if spec.bias is not None:
            out[spec.bias] = bias_grad(spec, g[n]).reshape(-1, *state[spec.bias].shape)
    return out


def _close(got, ref):
    for k, r in ref.items():
        torch.testing.assert_close(got[k], r, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("how", ["probed", "func"])
@pytest.mark.parametrize("bias, ids", [(True, "row"), (False, "flat")])
def test_layer_norm_twice_and_broadcast_position_embedding(how, bias, ids):
    """LayerNorm on [B, T, D] called twice (affine; bias=False), a second one over (T, D), and a
    position Embedding read with shared ids ([1, T] or [T]) broadcast against [B, T, D]:
    dW = sum_t g_t * xhat_t, db = sum_t g_t, dE[v] = sum_{t: pos_t = v} g_t equal vmap(grad)."""
    model = _init(NormNet(bias=bias, ids=ids, shape=(5, 4)), 0)
    x, y = _data(1, 6)
    layers = ["tok", "pos", "ln", "ln2", "fc", "head"]
    keys = [k for k, _ in model.named_parameters()]
    _close(_captured(model, layers, x, y, how), _reference(model, keys, x, y))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 6), T=st.integers(2, 6), flat=st.booleans())
def test_layer_norm_flat_input_property(seed, n, T, flat):
    """LayerNorm on [B, D] (flat) or [B, T, D], drawn sizes: captured dW, db equal vmap(grad)."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.ln, self.head = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.ln(self.lin(x))))

    model = _init(Flat(), seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((n, 3) if flat else (n, T, 3), generator=g, dtype=DT)
    y = torch.randn((n, 2) if flat else (n, T, 2), generator=g, dtype=DT)
    state = {k: v.detach() for k, v in model.named_parameters()}

    def rows(out, t):
        return (out - t).square().flatten(1).sum(1)

    tapped = tap(model, ["ln"])
    run = tapped.probed(state, x)
    (gp,) = torch.autograd.grad(rows(run.output, y).sum(), run.probes["ln"])
    gl = run.fold({"ln": [gp]})["ln"]
    spec = tapped.specs["ln"]

    def one(r, xi, yi):
        return rows(torch.func.functional_call(model, {**state, **r}, (xi[None],)), yi[None]).sum()

    ref = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(
        {"ln.weight": state["ln.weight"], "ln.bias": state["ln.bias"]}, x, y)
    torch.testing.assert_close(weight_grad(spec, run.acts["ln"], gl, (4,)), ref["ln.weight"],
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bias_grad(spec, gl), ref["ln.bias"], rtol=1e-10, atol=1e-12)


def test_layer_specs_lists_layer_norms_only_when_asked():
    """layer_specs(norms=False) (every consumer that assumes sum_t g_t a_t^T) leaves LayerNorms
    out; norms=True adds the affine ones (kind 'layernorm', D = the normalised size)."""
    model = NormNet(shape=(5, 4))
    model.plain = nn.LayerNorm(4, elementwise_affine=False)
    assert "ln" not in layer_specs(model)
    specs = layer_specs(model, norms=True)
    assert specs["ln"].kind == "layernorm" and specs["ln"].out_features == 4
    assert specs["ln2"].out_features == 20 and specs["ln2"].bias == "ln2.bias"
    assert "plain" not in specs


class Misuse(nn.Module):
    """LayerNorm uses the capture cannot represent, picked by ``how``."""

    def __init__(self, how):
        super().__init__()
        self.ln, self.other, self.head = nn.LayerNorm(4), nn.LayerNorm(4), nn.Linear(4, 2)
        self.how = how

    def forward(self, x):
        if self.how == "weight-read":  # its scale also read by a mul
            h = self.ln(x) * self.ln.weight
        elif self.how == "mixed":  # one LayerNorm's weight with another's bias
            h = F.layer_norm(x, (4,), self.ln.weight, self.other.bias)
        elif self.how == "seq-first":  # [T, B, D] with T != B
            h = self.ln(x.transpose(0, 1)).transpose(0, 1)
        else:  # unbatched: one [D] vector
            h = x + self.ln(x[0, 0])
        return self.head(self.other(h)).sum(1)


@pytest.mark.parametrize("how, why", [
    ("weight-read", r"ln: its tensors are used by (__mul__|mul)"),
    ("mixed", r"ln: shares a layer_norm call with layer\(s\)"),
    ("seq-first", r"ln: an input \[5, 3, 4\] that is not batch-first"),
    ("unbatched", r"ln: an unbatched input \[4\]"),
])
def test_check_names_layer_norms_the_capture_cannot_represent(how, why):
    """A LayerNorm whose weight is read by another op, mixed with another's bias, applied to a
    sequence-first or an unbatched input is a named problem (check lists it, tapped raises)."""
    model = _init(Misuse(how), 0)
    state = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    tapped = tap(model, ["ln", "other"])
    problems = check(tapped, state, x)
    assert "ln" in problems
    with pytest.raises(CaptureError, match=why):
        tapped.probed(state, x)


class BadBroadcast(nn.Module):
    """A shared position lookup used in ways that are not one copy per example."""

    def __init__(self, how):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 2)
        self.how = how

    def forward(self, idx):
        T = idx.shape[1]
        if self.how == "flat-as-positions":  # [T] ids with T == B: look batch-first
            return self.head(self.tok(idx) + self.pos(torch.arange(T))).sum(1)
        p = self.pos(torch.arange(T)[None])
        if self.how == "cat":
            h = torch.cat([self.tok(idx), p.expand(idx.shape[0], -1, -1)], 1)
        elif self.how == "matmul":
            h = self.tok(idx) @ p.transpose(1, 2) @ p
        else:  # "sum": reduced over positions before it meets the batch
            h = self.tok(idx) + p.sum(1, keepdim=True)
        return self.head(h).sum(1)


@pytest.mark.parametrize("how, why", [
    ("cat", r"pos: its indices are not batch-first .* reaches (Tensor.)?expand"),
    ("matmul", r"pos: its indices are not batch-first .* reaches"),
    ("sum", r"pos: its indices are not batch-first .* reaches (Tensor.)?sum"),
    ("flat-as-positions", r"pos: its flat indices \[5\] are broadcast as positions"),
])
def test_unsafe_broadcasts_are_named_problems(how, why):
    """A shared lookup that is concatenated, multiplied as a matrix, reduced, or [T] ids with
    T == B (which look like one row per example) is a named problem, never silently captured."""
    model = _init(BadBroadcast(how), 0)
    state = {k: v.detach() for k, v in model.named_parameters()}
    x, _ = _data(0, 5)
    tapped = tap(model, ["tok", "pos", "head"])
    assert set(check(tapped, state, x)) == {"pos"}
    with pytest.raises(CaptureError, match=why):
        tapped.probed(state, x)


def test_broadcast_with_a_batch_of_one_and_a_padding_index():
    """B = 1 ([1, T] ids are then batch-first) and a padding_idx on the shared lookup (its row
    gets no gradient): captured grads equal vmap(grad)."""
    model = NormNet(ids="row")
    model.pos = nn.Embedding(5, 4, padding_idx=2)
    model = _init(model, 3)
    for n in (1, 4):
        x, y = _data(2, n)
        ref = _reference(model, ["pos.weight", "tok.weight"], x, y)
        got = _captured(model, ["pos", "tok"], x, y)
        assert float(got["pos.weight"][:, 2].abs().max()) == 0.0
        _close(got, ref)
