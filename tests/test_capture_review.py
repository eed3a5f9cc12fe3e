"""Review findings on the capture engine (dattri_fn/transforms/capture*.py), float64: one forward
per batch after an in-place op on a captured output was seen (R4 F4), a named error for a layer
called under torch.inference_mode (R4 F5), and a batch-shared lookup feeding a selected layer
(R1 F6)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.transforms.capture import CaptureError, bias_grad, check, tap, weight_grad
from dattri_fn.transforms.layers import batched_io, output_shapes, streamed_io

DT = torch.float64


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / 2)
    return model


class Counted(nn.Module):
    """fc1 -> tanh -> fc2 -> (relu_ in place when ``inplace``) -> head; counts its forwards."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.inplace, self.forwards = inplace, 0

    def forward(self, x):
        self.forwards += 1
        h = self.fc2(torch.tanh(self.fc1(x)))
        h = h.relu_() if self.inplace else h.relu()
        return self.head(h)


def _batch(seed: int, B: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, generator=g, dtype=DT), torch.randint(0, 3, (B,), generator=g)


def _state(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _reference(model, keys, x, y):
    """``d loss_i / d theta`` by one autograd call per example.  # {key: [B, *shape]}"""
    params = dict(model.named_parameters())
    rows = []
    for i in range(y.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.autograd.grad(loss, [params[k] for k in keys]))
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(keys)}


def _grads(tapped, state, io):
    out = {}
    for n, (a, g) in io.items():
        spec = tapped.specs[n]
        out[spec.weight] = weight_grad(spec, a, g, state[spec.weight].shape)
        out[spec.bias] = bias_grad(spec, g)
    return out


LAYERS = ["fc1", "fc2", "head"]


@pytest.mark.parametrize("inplace", [False, True])
def test_in_place_costs_two_forwards_once_per_tap(inplace):
    """Forwards over 3 batches = 3 + [in-place]: the rerun with added probes happens on the first
    batch only; each batch's (a, g) equal a fresh tap's (which reruns) and the given-shape
    additive pass bit for bit, and per-example autograd at 1e-10."""
    model = _init(Counted(inplace), 0)
    tapped, state = tap(model, LAYERS), _state(model)
    got = []
    for seed in range(3):
        x, y = _batch(seed)
        got.append(batched_io(tapped, F.cross_entropy, state, (x,), {}, y, None, x))
    assert model.forwards == 3 + inplace
    for seed, io in enumerate(got):
        x, y = _batch(seed)
        fresh = tap(model, LAYERS)
        shapes = output_shapes(fresh, state, (x,), {}, x)
        for want in (batched_io(fresh, F.cross_entropy, state, (x,), {}, y, None, x),
                     batched_io(fresh, F.cross_entropy, state, (x,), {}, y, shapes, x)):
            assert want.keys() == io.keys()
            for n in want:
                assert all(torch.equal(u, v) for u, v in zip(io[n], want[n], strict=True)), n
        ref = _reference(model, [k for n in LAYERS for k in (f"{n}.weight", f"{n}.bias")], x, y)
        for k, v in _grads(tapped, state, io).items():
            torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-12, msg=k)


def _streamed(tapped, state, x, y, loss=F.cross_entropy):
    got = {}

    def step(n, a, g):
        pair = got.setdefault(n, [None, None])
        if a is not None:
            pair[0] = a
        if g is not None:
            pair[1] = g

    streamed_io(tapped, loss, state, (x,), {}, y, None, x, step, None)
    return {n: tuple(pair) for n, pair in got.items()}


def test_the_memory_is_per_tap_and_streamed_io_uses_it():
    """A tap that saw an in-place op adds probes from the start in streamed_io too (one forward,
    the same pairs as batched_io); a new tap of the same module reruns once again (nothing
    kept per module), and a tap of another model keeps the outputs themselves as probes."""
    model = _init(Counted(True), 1)
    tapped, state = tap(model, LAYERS), _state(model)
    x, y = _batch(4)
    want = batched_io(tapped, F.cross_entropy, state, (x,), {}, y, None, x)
    assert model.forwards == 2
    got = _streamed(tapped, state, x, y)
    assert model.forwards == 3
    for n in LAYERS:
        assert all(torch.equal(u, v) for u, v in zip(got[n], want[n], strict=True)), n
    batched_io(tap(model, LAYERS), F.cross_entropy, state, (x,), {}, y, None, x)
    assert model.forwards == 5
    plain = _init(Counted(False), 1)
    with torch.enable_grad():
        run = tap(plain, LAYERS).probed(_state(plain), x)
    assert plain.forwards == 1
    assert all(p.stride() != (0, 0) for n in ("fc2", "head") for p in run.probes[n])


class Inference(nn.Module):
    """l1 under torch.inference_mode (its output an inference tensor), then l2."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.inference_mode():
            h = self.l1(x)
        return self.l2(torch.tanh(h.clone()))


INFERENCE = r"tap\(module=\.\.\.\): expected the selected layers called where autograd can record them, " \
            r"got layer 'l1' called under torch\.inference_mode\(\)\. Run a frozen part under torch\.no_grad"


@pytest.mark.parametrize("path", ["batched", "streamed", "probed", "tapped", "check"])
def test_a_layer_under_inference_mode_is_named(path):
    """Review R4 F5: an inference tensor has no gradient and torch.func cannot run one, so every
    engine path raises a ValueError naming the layer (it raised 'not possible to get the
    gradient edge' or nothing)."""
    model = _init(Inference(), 2)
    tapped, state = tap(model, ["l1", "l2"]), _state(model)
    x, y = _batch(2)
    runs = {"batched": lambda: batched_io(tapped, F.cross_entropy, state, (x,), {}, y, None, x),
            "streamed": lambda: _streamed(tapped, state, x, y),
            "probed": lambda: tapped.probed(state, x),
            "tapped": lambda: tapped(state, {"l1": torch.zeros(5, 5, dtype=DT),
                                             "l2": torch.zeros(5, 3, dtype=DT)}, x),
            "check": lambda: check(tapped, state, x)}
    with pytest.raises(ValueError, match=INFERENCE):
        runs[path]()
    # the layer after it is captured as ever
    assert check(tap(model, ["l2"]), state, x) == {}


class LookupIntoLinear(nn.Module):
    """A batch-shared [1, T] position lookup fed through a selected Linear (``proj``) before it
    meets the batch; with ``twice``, ``proj`` is also applied to the batch-first tokens."""

    def __init__(self, twice: bool):
        super().__init__()
        self.tok, self.pos = nn.Embedding(7, 4), nn.Embedding(5, 4)
        self.proj, self.head, self.twice = nn.Linear(4, 4), nn.Linear(4, 3), twice

    def forward(self, idx):
        h = self.tok(idx)
        if self.twice:
            h = self.proj(h)
        p = self.proj(self.pos(torch.arange(idx.shape[1])[None]))  # [1, T, d] into proj
        return self.head(torch.tanh(h + p)).mean(1)


@pytest.mark.parametrize("twice", [False, True])
def test_a_pending_lookup_into_a_selected_layer_names_both(twice):
    """Review R1 F6: the lookup's use by proj's call goes through proj's capture, so proj is named
    for its real reason (a [1, 5, 4] input, not batch-first), not 'not called', and is still
    named when it is also called on batch-first tokens (its record missed this call)."""
    model = _init(LookupIntoLinear(twice), 5)
    state = _state(model)
    idx = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(5))
    pos = ("its indices are not batch-first (B = 4) and its output [1, 5, 4] reaches linear, not an "
           "add, subtract or multiply with the batch")
    proj = "an input [1, 5, 4] that is not batch-first (B = 4)"
    tapped = tap(model, ["tok", "pos", "proj", "head"])
    assert check(tapped, state, idx) == {"pos": pos, "proj": proj}
    assert check(tap(model, ["tok", "proj", "head"]), state, idx) == {"proj": proj}
    with pytest.raises(CaptureError, match=r"pos: its indices .*; proj: an input \[1, 5, 4\] that is not"):
        tapped(state, {n: torch.zeros((), dtype=DT) for n in tapped.layers}, idx)
    with pytest.raises(CaptureError) as err:
        tapped.probed(state, idx)
    assert err.value.problems == {"pos": pos, "proj": proj}


class Conv1D(nn.Module):
    """Hugging Face's Conv1D: ``addmm(b, x.view(-1, in), W)`` with ``W`` ``[in, out]``."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.zeros(nx, nf)), nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], -1)


class FirstLayers(nn.Module):
    """First selected calls of kinds that keep the added zero probe: an Embedding with
    padding_idx, a bias-free Linear on a transposed [B, T, D] input, a Conv1D."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(7, 4, padding_idx=0), nn.Linear(4, 4, bias=False)
        self.conv1d, self.head = Conv1D(4, 4), nn.Linear(4, 3)

    def forward(self, idx):
        h = self.emb(idx).transpose(1, 2).transpose(1, 2)
        h = torch.tanh(self.lin(h.transpose(0, 1).contiguous().transpose(0, 1)))
        return self.head(torch.tanh(self.conv1d(h)).mean(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layers", [["emb", "lin", "conv1d", "head"], ["lin"], ["conv1d", "head"]])
def test_first_layers_own_probes_equal_added_probes(dtype, layers):
    """First selected outputs without a graph that are not a flat Linear's (an Embedding, a Linear
    on a transposed [B, T, D] input, which matmul folds another way once the weight requires
    grad: 5.6e-17 off, a Conv1D) keep the added zero probe, and the per-call pass gives the (a, g)
    of the given-shape additive pass bit for bit; the state's weights stay untouched."""
    model = _init(FirstLayers(), 6).to(dtype)
    idx = torch.randint(0, 7, (5, 6), generator=torch.Generator().manual_seed(6))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(7))
    state = _state(model)
    tapped = tap(model, layers)
    like = state["head.weight"]
    own = batched_io(tapped, F.cross_entropy, state, (idx,), {}, y, None, like)
    shapes = output_shapes(tapped, state, (idx,), {}, like)
    added = batched_io(tapped, F.cross_entropy, state, (idx,), {}, y, shapes, like)
    with torch.enable_grad():
        run = tapped.probed(state, idx)
    first = run.probes[layers[0]][0]  # only a flat Linear is given its weight's alias
    assert first.stride() == (0,) * first.ndim
    for n in layers:
        assert all(torch.equal(u, v) for u, v in zip(own[n], added[n], strict=True)), n
    assert all(not v.requires_grad and v.grad is None for v in state.values())


@pytest.mark.parametrize("stream", [False, True])
def test_an_in_place_loss_on_the_aliased_output(stream):
    """Review R4 F2 with the first output graphed by its weight's alias: a loss that divides the
    logits in place (the model output is that layer's output) still gives each example's
    gradient of l_i = CE(z_i / 2) exactly (gradients are taken at the edge held before the
    loss, or by a hook registered before it), batched and streamed."""
    model = _init(nn.Sequential(nn.Linear(4, 3)), 0)
    x, y = _batch(0)
    tapped, state = tap(model, ["0"]), _state(model)
    loss = lambda out, t: F.cross_entropy(out.div_(2.0), t)
    io = (_streamed(tapped, state, x, y, loss) if stream
          else batched_io(tapped, loss, state, (x,), {}, y, None, x))
    params = dict(model.named_parameters())
    ref = torch.stack([torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]) / 2.0, y[i:i + 1]),
                                           params["0.weight"])[0] for i in range(y.shape[0])])
    torch.testing.assert_close(_grads(tapped, state, io)["0.weight"], ref, rtol=1e-12, atol=1e-14)


def test_a_tensor_shared_in_two_roles_names_each_layers_own_role():
    """LayerNorm weight = Linear bias (review R4 nit): each layer's problem names its own role."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.ln, self.fc1 = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)
            self.ln.weight = self.fc0.bias

        def forward(self, x):
            return self.fc1(self.ln(self.fc0(x)))

    model = _init(Shared(), 0)
    state = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert tap(model, ["fc0", "ln", "fc1"]).check(state, x) == {
        "fc0": "shares its bias with layer ln (its weight)",
        "ln": "shares its weight with layer fc0 (its bias)"}


def test_a_tied_members_misuse_names_the_member_it_comes_from():
    """A tied head's bias read by another op (review R5 F3): the head's problem is its own, the
    Embedding (no bias) is named as tied to it, not with the head's reason as if its own."""

    class TiedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.head = nn.Embedding(6, 4), nn.Linear(4, 6)
            self.head.weight = self.tok.weight

        def forward(self, ids):
            return self.head(self.tok(ids)) + self.head.bias

    model = _init(TiedBias(), 0)
    state = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    problems = tap(model, ["tok", "head"], tied=True).check(state, ids)
    assert problems == {"head": "its tensors are used by add",
                        "tok": "tied to layer 'head' (its tensors are used by add)"}
