"""Review findings on the capture engine (dattri_fn/transforms/capture*.py), float64: one forward
per batch after an in-place op on a captured output was seen (R4 F4), a named error for a layer
called under torch.inference_mode (R4 F5), and a batch-shared lookup feeding a selected layer
(R1 F6)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.transforms.capture import bias_grad, tap, weight_grad
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


def _streamed(tapped, state, x, y):
    got = {}

    def step(n, a, g):
        pair = got.setdefault(n, [None, None])
        if a is not None:
            pair[0] = a
        if g is not None:
            pair[1] = g

    streamed_io(tapped, F.cross_entropy, state, (x,), {}, y, None, x, step, None)
    return got


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
