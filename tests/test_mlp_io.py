"""mlp_io: a plain softmax cross-entropy MLP's (a, g) equal the capture engine's bit for bit, and
LoGra's scores through it equal those through the engine; anything else is left to the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import dattri_fn.attribute.logra_rows as logra_rows
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.attribute.logra import logra
from dattri_fn.eval.tasks import classification_loss
from dattri_fn.model import functional_model
from dattri_fn.transforms import capture
from dattri_fn.transforms.layers import batched_io
from dattri_fn.transforms.mlp_io import mlp_chain, mlp_io


def _mlp(seed: int, acts: list, bias: bool, dtype, sizes=(13, 9, 7)) -> nn.Module:
    torch.manual_seed(seed)
    if not acts and len(sizes) == 2:
        return nn.Linear(*sizes, bias=bias).to(dtype)
    mods = [nn.Linear(sizes[0], sizes[1], bias=bias)]
    for i in range(1, len(sizes) - 1):
        mods += [a() for a in acts] + [nn.Linear(sizes[i], sizes[i + 1], bias=bias)]
    return nn.Sequential(*mods).to(dtype)


def _data(seed: int, B: int, width: int, classes: int, dtype):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(B, width, generator=g, dtype=dtype),
            torch.randint(0, classes, (B,), generator=g))


def _state(m: nn.Module) -> dict:
    return {k: v.detach() for k, v in m.named_parameters()}


def _layers(m: nn.Module) -> tuple:
    return tuple(n for n, c in m.named_modules() if type(c) is nn.Linear)


def _engine(m, loss, state, x, y, layers):
    return batched_io(capture.tap(m, layers), loss, state, (x,), {}, y, None, x)


_SHAPES = [([], (13, 7))] + [(acts, sizes) for acts in ([], [nn.Tanh], [nn.ReLU], [nn.Sigmoid, nn.Tanh])
                             for sizes in ((13, 9, 7), (13, 9, 6, 7))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("acts", "sizes"), _SHAPES)
def test_equals_the_engine_bit_for_bit(dtype, acts, sizes):
    """a_l and g_l = dL/dz_l of L = CE(z_L, y, sum) are torch.equal to the capture engine's."""
    for seed, (B, bias, loss) in enumerate([(1, True, classification_loss), (7, False, F.cross_entropy),
                                            (64, True, F.cross_entropy), (300, True, classification_loss)]):
        m = _mlp(seed, acts, bias, dtype, sizes)
        x, y = _data(seed, B, sizes[0], sizes[-1], dtype)
        if seed == 2:
            y[::3] = -100  # ignored targets: zero rows on both paths
        layers = _layers(m)
        ref = _engine(m, loss, _state(m), x, y, layers)
        got = mlp_io(m, loss, _state(m), (x,), {}, y, layers)
        assert list(got) == list(layers)
        for n in layers:
            assert torch.equal(got[n][0], ref[n][0]) and torch.equal(got[n][1], ref[n][1])


def test_a_subset_of_layers_and_a_column_major_hidden_input():
    """Only the named layers are returned, equal to the engine's for that subset; a hidden
    activation of width 1 with B = 1 (column-major strides) takes autograd's other mm order."""
    m = _mlp(0, [nn.Tanh], True, torch.float64, (5, 4, 3, 2))
    x, y = _data(0, 11, 5, 2, torch.float64)
    for layers in (("2",), ("0", "4"), ("4",)):
        ref = _engine(m, F.cross_entropy, _state(m), x, y, layers)
        got = mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, layers)
        assert list(got) == list(layers)
        assert all(torch.equal(got[n][1], ref[n][1]) and torch.equal(got[n][0], ref[n][0])
                   for n in layers)
    m = _mlp(1, [nn.Tanh], True, torch.float32, (5, 1, 3))
    x, y = _data(1, 1, 5, 3, torch.float32)
    ref = _engine(m, F.cross_entropy, _state(m), x, y, ("0", "2"))
    got = mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, ("0", "2"))
    assert all(torch.equal(got[n][1], ref[n][1]) for n in ("0", "2"))


def _hooked():
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    m[1].register_forward_hook(lambda mod, i, o: o * 2)
    return m


def _shared():
    lin = nn.Linear(9, 9)
    return nn.Sequential(nn.Linear(13, 9), lin, nn.Tanh(), lin, nn.Linear(9, 7))


def _plain_tensor_weight():
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    w = m[2].weight.detach().clone()
    del m[2].weight
    m[2].weight = w  # a plain attribute now, not the Parameter slot
    return m


def _bare_without_bias_slot():
    m = nn.Linear(13, 7)
    del m.bias  # no bias slot at all (review R3 F4: the bare-Linear branch took it)
    return m


def _shared_weight():
    m = nn.Sequential(nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 9))
    m[2].weight = m[0].weight
    return m


def _pre_hooked_linear():
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    m[0].register_forward_pre_hook(lambda mod, i: None)
    return m


@pytest.mark.parametrize("make", [
    _hooked,
    _plain_tensor_weight,
    _bare_without_bias_slot,
    _shared_weight,
    _pre_hooked_linear,
    lambda: nn.Sequential(nn.Linear(13, 9), nn.ReLU(inplace=True), nn.Linear(9, 7)),
    lambda: nn.Sequential(nn.Linear(13, 9), nn.Tanh()),
    lambda: nn.Sequential(nn.Tanh(), nn.Linear(13, 7)),
    lambda: nn.Sequential(nn.Linear(13, 9), nn.GELU(), nn.Linear(9, 7)),
    _shared,
])
def test_other_structures_are_left_to_the_engine(make):
    """Hooks, in-place or unknown activations, an activation at either end, a reused Linear or
    weight, a weight that is no longer the Linear's Parameter slot: None."""
    assert mlp_chain(make()) is None


def test_other_calls_are_left_to_the_engine():
    """Another loss, label dtype, input rank or dtype mix, kwargs, vmap, inference_mode: None."""
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    st, layers = _state(m), _layers(m)
    x, y = _data(0, 8, 13, 7, torch.float32)
    assert mlp_io(m, F.cross_entropy, st, (x,), {}, y, layers) is not None
    assert mlp_io(m, lambda o, t: F.cross_entropy(o, t), st, (x,), {}, y, layers) is None
    assert mlp_io(m, F.cross_entropy, st, (x,), {}, y.int(), layers) is None
    assert mlp_io(m, F.cross_entropy, st, (x[:, None],), {}, y, layers) is None
    assert mlp_io(m, F.cross_entropy, st, (x.double(),), {}, y, layers) is None
    assert mlp_io(m, F.cross_entropy, st, (x,), {"scale": 1}, y, layers) is None
    assert mlp_io(m, F.cross_entropy, st, (x,), {}, y, ("9",)) is None
    with torch.inference_mode():
        assert mlp_io(m, F.cross_entropy, st, (x,), {}, y, layers) is None
    seen = []
    torch.func.vmap(lambda r: seen.append(mlp_io(m, F.cross_entropy, st, (r[None],), {}, y[:1],
                                                 layers)) or r)(x)
    assert seen == [None]


def _accepted(monkeypatch, run):
    """``(run(), [whether each mlp_io call in it returned values])``."""
    seen = []
    real = logra_rows.mlp_io

    def spy(*a):
        out = real(*a)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(logra_rows, "mlp_io", spy)
    got = run()
    monkeypatch.setattr(logra_rows, "mlp_io", real)
    return got, seen


def _logra_scores(m, batches, test, **kw):
    fm = functional_model(m, classification_loss)
    method = logra(fm, **{"proj_dim": 3, **kw})
    state = method.prepare(fm.params, batches)
    return (method.score(fm.params, state, batches, test),
            method.self_score(fm.params, state, batches))


@pytest.mark.parametrize("kw", [{}, {"chunk_size": 5}, {"proj_dim": None}])
def test_logra_scores_equal_the_engine_path(monkeypatch, kw):
    """LoGra's scores and self-scores through mlp_io are torch.equal to the capture engine's."""
    m = _mlp(3, [nn.Tanh], True, torch.float32, (13, 9, 7))
    data = [_data(s, 16, 13, 7, torch.float32) for s in range(3)]
    test = _data(9, 6, 13, 7, torch.float32)
    fast = _accepted(monkeypatch, lambda: _logra_scores(m, data, test, **kw))
    assert fast[1] and all(fast[1])  # every pass (chunk) took mlp_io, none the engine
    fast = fast[0]
    monkeypatch.setattr(logra_rows, "mlp_io", lambda *a: None)
    slow = _logra_scores(m, data, test, **kw)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("context", [lambda: torch.autocast("cpu", dtype=torch.bfloat16), _PassThrough,
                                     _Dispatch, lambda: torch.device("cpu")])
def test_autocast_and_modes_are_left_to_the_engine(context):
    """Autocast or a torch-function/dispatch mode recasts or sees the engine's ops, not ours: None."""
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    x, y = _data(0, 8, 13, 7, torch.float32)
    with context():
        assert mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, _layers(m)) is None
    assert mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, _layers(m)) is not None


def test_logra_under_autocast_equals_the_engine_path(monkeypatch):
    """bf16 autocast: LoGra's scores and self-scores are torch.equal to the engine path's (mlp_io off)."""
    m = _mlp(3, [nn.Tanh], True, torch.float32, (13, 9, 7))
    data = [_data(s, 16, 13, 7, torch.float32) for s in range(3)]
    test = _data(9, 6, 13, 7, torch.float32)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _logra_scores(m, data, test)

    got, seen = _accepted(monkeypatch, run)
    assert seen and not any(seen)
    monkeypatch.setattr(logra_rows, "mlp_io", lambda *a: None)
    ref = run()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_an_input_that_requires_grad_is_read_detached():
    """A batch input that requires grad (a leaf kept for saliency, an augmentation's output):
    a and g torch.equal to the engine's and, as the engine's (its probes read the input
    detached), free of the caller's graph; Grad-Dot's scores and self-scores through mlp_io do
    not require grad (review RB F1, stop 25: mlp_io handed back the input itself as layer 1's
    a, and Grad-Dot's scores carried a graph into it)."""
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    x, y = _data(1, 7, 13, 7, torch.float32)
    layers = _layers(m)
    ref = _engine(m, F.cross_entropy, _state(m), x, y, layers)
    x.requires_grad_()
    got = mlp_io(m, F.cross_entropy, _state(m), (x,), {}, y, layers)
    for n in layers:
        assert torch.equal(got[n][0], ref[n][0]) and torch.equal(got[n][1], ref[n][1])
        assert not (got[n][0].requires_grad or got[n][1].requires_grad)
    fm = functional_model(m, F.cross_entropy)
    xt, yt = _data(2, 4, 13, 7, torch.float32)
    method = grad_dot(fm)
    ref = [method.score(dict(fm.params), method.prepare(dict(fm.params), [(x.detach(), y)]),
                        [(x.detach(), y)], (xt, yt)),
           method.self_score(dict(fm.params), None, [(x.detach(), y)])]
    xt.requires_grad_()
    state = method.prepare(dict(fm.params), [(x, y)])
    got = [method.score(dict(fm.params), state, [(x, y)], (xt, yt)),
           method.self_score(dict(fm.params), state, [(x, y)])]
    for r, s in zip(ref, got, strict=True):
        assert torch.equal(s, r) and not s.requires_grad
