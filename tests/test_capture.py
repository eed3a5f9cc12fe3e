"""The per-layer capture engine against per-example autograd, for every layer kind (float64)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
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


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: a Linear with a transposed ``[in, out]`` weight."""

    def __init__(self, nf, nx, gen):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, generator=gen, dtype=torch.float64) / 3)
        self.bias = nn.Parameter(torch.randn(nf, generator=gen, dtype=torch.float64) / 3)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Mlp(nn.Module):
    def __init__(self, d, h, c, bias, gen):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h, bias=bias), nn.Linear(h, c, bias=not bias)
        _init(self, gen)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Shared(nn.Module):
    """One Linear called twice, and a loop whose length is a keyword argument."""

    def __init__(self, d, c, bias, gen):
        super().__init__()
        self.lin, self.head = nn.Linear(d, d, bias=bias), nn.Linear(d, c)
        _init(self, gen)

    def forward(self, x, *, depth=2):
        for _ in range(depth):
            x = torch.tanh(self.lin(x))
        if x.abs().max() > 1e6:  # data-dependent control flow: fine without a trace
            x = x * 0
        return self.head(x)


class Seq(nn.Module):
    """Embedding (padding_idx 0) -> Conv1D on [B, T, D] -> Linear on [B, T, D] -> mean pool."""

    def __init__(self, V, D, c, gen):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.proj = Conv1D(D, D, gen)
        self.out = nn.Linear(D, c)
        _init(self, gen)

    def forward(self, idx, attention_mask=None):
        h = torch.tanh(self.proj(self.emb(idx)))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.out(h).mean(1)


class Cnn(nn.Module):
    def __init__(self, conv, fc):
        super().__init__()
        self.conv, self.fc = conv, fc

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _init(module, gen):
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64) / 3


def _cnn(c, bias, stride, padding, dilation, gen, x):
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation,
                     bias=bias).double()
    with torch.no_grad():
        flat = conv(x).flatten(1).shape[1]
    m = Cnn(conv, nn.Linear(flat, c).double())
    _init(m, gen)
    return m


def _loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _captured(module, layers, args, y, kwargs=None):
    """Per-example gradients of the selected layers' params from one batched backward."""
    kwargs = kwargs or {}
    state = {k: v.detach() for k, v in module.named_parameters()}
    tapped = tap(module, layers)
    zeros = {n: torch.zeros((), dtype=torch.float64) for n in tapped.layers}
    _, acts = tapped(state, zeros, *args, **kwargs)
    shapes = probe_shapes(tapped, acts)
    probes = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}

    def total(pr):
        out, acts = tapped(state, pr, *args, **kwargs)
        return _loss(out, y).sum(), acts

    g, acts = torch.func.grad(total, has_aux=True)(probes)
    out = {}
    for n, spec in tapped.specs.items():
        out[spec.weight] = weight_grad(spec, acts[n], g[n], state[spec.weight].shape)
        if spec.bias is not None:
            out[spec.bias] = bias_grad(spec, g[n])
    return out


def _reference(module, keys, args, y, kwargs=None):
    """``d loss_i / d theta`` by one autograd call per example."""
    kwargs = kwargs or {}
    params = dict(module.named_parameters())
    rows = []
    for i in range(y.shape[0]):
        a_i = [a[i:i + 1] for a in args]
        kw_i = {k: v[i:i + 1] for k, v in kwargs.items()}
        loss = _loss(module(*a_i, **kw_i), y[i:i + 1]).sum()
        rows.append(torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True))
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(keys)}


def _assert_match(got, ref):
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 5), bias=st.booleans(),
       d=st.integers(1, 4), h=st.integers(1, 4))
def test_linear_layers(seed, B, bias, d, h):
    """MLP, bias or not, a batch of one included: sum_t g a^T == per-example autograd."""
    gen = torch.Generator().manual_seed(seed)
    m = Mlp(d, h, 3, bias, gen).double().eval()
    x, y = torch.randn(B, d, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    got = _captured(m, ["fc1", "fc2"], (x,), y)
    _assert_match(got, _reference(m, list(got), (x,), y))


@given(seed=st.integers(0, 2**16), B=st.integers(1, 4), bias=st.booleans(),
       depth=st.integers(1, 3))
def test_shared_layer_and_control_flow(seed, B, bias, depth):
    """A Linear called ``depth`` times (sum over its calls), a Python loop set by a keyword and a
    tensor-valued branch: no trace, the same gradients as autograd."""
    gen = torch.Generator().manual_seed(seed)
    m = Shared(3, 2, bias, gen).double().eval()
    x, y = torch.randn(B, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (B,), generator=gen)
    wrapped = _Depth(m, depth)
    got = _captured(wrapped, ["inner.lin", "inner.head"], (x,), y)
    _assert_match(got, _reference(wrapped, list(got), (x,), y))


class _Depth(nn.Module):
    def __init__(self, inner, depth):
        super().__init__()
        self.inner, self.depth = inner, depth

    def forward(self, x):
        return self.inner(x, depth=self.depth)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 4), T=st.integers(1, 4),
       masked=st.booleans())
def test_sequence_embedding_conv1d(seed, B, T, masked):
    """Embedding with padding_idx (no gradient for index 0), HF Conv1D (transposed weight) and
    Linear on [B, T, D] inputs with an attention-mask keyword: summed over positions."""
    gen = torch.Generator().manual_seed(seed)
    m = Seq(6, 3, 2, gen).double().eval()
    idx = torch.randint(0, 6, (B, T), generator=gen)
    y = torch.randint(0, 2, (B,), generator=gen)
    kw = {"attention_mask": torch.randint(0, 2, (B, T), generator=gen).double()} if masked else {}
    got = _captured(m, list(layer_specs(m)), (idx,), y, kw)
    _assert_match(got, _reference(m, list(got), (idx,), y, kw))


@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), bias=st.booleans(),
       stride=st.integers(1, 2), padding=st.sampled_from([0, 1, "same"]),
       dilation=st.integers(1, 2))
def test_conv2d(seed, B, bias, stride, padding, dilation):
    """Conv2d (unfolded patches) with stride, padding ('same' too) and dilation."""
    if padding == "same" and stride != 1:
        padding = 1
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 6, 6, generator=gen, dtype=torch.float64)
    m = _cnn(2, bias, stride, padding, dilation, gen, x).eval()
    y = torch.randint(0, 2, (B,), generator=gen)
    got = _captured(m, ["conv", "fc"], (x,), y)
    _assert_match(got, _reference(m, list(got), (x,), y))


def test_bare_linear_root():
    """The root module itself can be the layer (name '')."""
    gen = torch.Generator().manual_seed(0)
    m = nn.Linear(3, 2).double()
    _init(m, gen)
    x, y = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    got = _captured(m, [""], (x,), y)
    _assert_match(got, _reference(m, list(got), (x,), y))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.unused = nn.Embedding(5, 3), nn.Linear(3, 3), nn.Linear(2, 2)
        self.grouped = nn.Conv2d(2, 2, 1, groups=2)

    def forward(self, idx):
        h = self.emb(idx)
        h = self.fc(h) + F.linear(h, self.fc.weight.t())  # the weight read by another op
        return F.linear(h, self.emb.weight)  # tied output layer


def test_problems_are_named_not_wrong():
    """Uses the engine cannot factor are listed per layer by check() and raise CaptureError in
    tapped; a layer with only supported uses is captured."""
    m = Tied().double()
    state = {k: v.detach() for k, v in m.named_parameters()}
    idx = torch.tensor([[1, 2], [3, 4]])
    tapped = tap(m, ["emb", "fc", "unused"])
    problems = check(tapped, state, idx)
    assert set(problems) == {"emb", "fc", "unused"}
    assert "linear" in problems["emb"] and "t" in problems["fc"]
    assert "not called" in problems["unused"]
    with pytest.raises(CaptureError, match="fc"):
        tapped(state, {n: torch.zeros((), dtype=torch.float64) for n in tapped.layers}, idx)


def test_grouped_conv_and_seq_first_input_are_problems():
    """groups > 1 and a Linear applied to a [T, B, D] tensor are refused, not mis-factored."""
    grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    state = dict(grouped.named_parameters())
    assert "groups" in check(tap(grouped, ["0"]), state, x)["0"]

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x.transpose(0, 1)).transpose(0, 1).sum(1)

    m = SeqFirst().double()
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    assert "batch-first" in check(tap(m, ["lin"]), dict(m.named_parameters()), x)["lin"]


def test_layer_specs_and_bad_names():
    """Every supported kind is listed in module order; an unknown name is refused by name."""
    gen = torch.Generator().manual_seed(0)
    m = Seq(6, 3, 2, gen)
    specs = layer_specs(m)
    assert [(n, s.kind) for n, s in specs.items()] == [
        ("emb", "embedding"), ("proj", "conv1d"), ("out", "linear")]
    assert specs["proj"].out_features == 3 and specs["emb"].bias is None
    with pytest.raises(ValueError, match=r"tap\(layers=...\): expected names of capturable"):
        tap(m, ["nope"])


class TiedHead(nn.Module):
    """An embedding whose weight is also the output layer's (one tensor, two names)."""

    def __init__(self, gen):
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(5, 3), nn.Linear(3, 3), nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight
        _init(self, gen)

    def forward(self, idx):
        return self.out(torch.tanh(self.fc(self.emb(idx))))


def test_state_values_are_used_with_and_without_tied_tensors():
    """tapped(state) runs the model at state's tensors: out == module(x) evaluated at state, for a
    model without tied tensors and for one whose tied alias is given under either name alone."""
    gen = torch.Generator().manual_seed(3)
    m = Mlp(3, 4, 2, True, gen).double().eval()
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    other = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in
             m.named_parameters()}
    out, _ = tap(m, ["fc1", "fc2"])(other, {n: torch.zeros((), dtype=torch.float64)
                                            for n in ("fc1", "fc2")}, x)
    torch.testing.assert_close(out, torch.func.functional_call(m, other, (x,)), rtol=0, atol=0)
    t = TiedHead(gen).double().eval()
    idx = torch.tensor([[1, 2], [3, 4]])
    W = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    base = {k: v.detach() for k, v in t.named_parameters()}  # "emb.weight" only (deduplicated)
    want = F.linear(torch.tanh(t.fc(F.embedding(idx, W))), W)
    tapped = tap(t, ["fc"])
    zero = {"fc": torch.zeros((), dtype=torch.float64)}
    for key in ("emb.weight", "out.weight"):
        state = {k: v for k, v in base.items() if k != "emb.weight"} | {key: W}
        out, _ = tapped(state, zero, idx)
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_one_call_sequence_layer_input_is_not_copied():
    """A layer called once on [B, T, in] captures a view of its input (engineer A's peak-memory
    request): a shares the input's storage, and g is unchanged."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(3, 2).double()
    _init(lin, gen)
    model = nn.Sequential(lin)
    x = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64)
    tapped = tap(model, ["0"])
    state = {k: v.detach() for k, v in model.named_parameters()}
    _, acts = tapped(state, {"0": torch.zeros((), dtype=torch.float64)}, x)
    assert acts["0"].data_ptr() == x.data_ptr() and torch.equal(acts["0"], x)


def test_call_kinds_keep_their_old_import_path():
    """The call kinds moved to capture_kinds are the same objects under capture."""
    from dattri_fn.transforms import capture, capture_kinds

    for name in ("_CALLS", "_PER_CALL", "_arg", "_linear_inspect", "_conv2d_probe"):
        assert getattr(capture, name) is getattr(capture_kinds, name)


def test_split_modules_keep_their_old_import_path():
    """The mode and the specs moved out of capture are the same objects under capture."""
    from dattri_fn.transforms import capture, capture_mode, capture_specs

    for mod, names in ((capture_mode, ("_Capture", "_Record", "_acts", "_batch_rows", "_benign", "_keyed",
                                       "_name")),
                       (capture_specs, ("CaptureError", "LayerSpec", "KINDS", "layer_specs", "weight_grad",
                                        "bias_grad", "probe_shapes", "_spec", "_tokens"))):
        for name in names:
            assert getattr(capture, name) is getattr(mod, name), name
