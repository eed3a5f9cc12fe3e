"""A checked plan of a plain softmax cross-entropy MLP applied through mlp_io (stop 24).

layer_grads_stream's apply takes a held checked plan's flat Linear factors from
transforms.mlp_io (the ATen kernels autograd runs) instead of the capture engine's pass: the
LayerGrads must be torch.equal to the engine's (_factored) in float32 and float64, at one or
several checkpoints (one mlp_io pass each, stop 26), and every other case (losses wanted, a
non-plain model) must take the engine.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.transforms import layer_grads, mlp_io
from dattri_fn.transforms.grad import per_sample_grad
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stream, layer_plan
from dattri_fn.transforms.layer_grads_paths import _factored


def _mlp(dtype, act=nn.Tanh):
    g = torch.Generator().manual_seed(1)
    m = nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 3)).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return m


def _data(dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _spy(monkeypatch):
    calls = []
    real = mlp_io.mlp_io
    monkeypatch.setattr(mlp_io, "mlp_io", lambda *a: calls.append(1) or real(*a))
    return calls


def _moved(params):
    """Params away from the module's weights: each scaled by 1.1 and shifted by 0.05."""
    return {k: 1.1 * v + 0.05 for k, v in params.items()}


def _same(x, y):
    assert x.layout == y.layout and x.factors.keys() == y.factors.keys()
    assert torch.equal(x.dense, y.dense)
    for n in x.factors:
        assert all(torch.equal(s, t) for s, t in zip(x.factors[n], y.factors[n], strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_a_held_plain_mlp_plan_takes_mlp_io_bit_for_bit(monkeypatch, dtype, act):
    """At params that are NOT the module's own weights (checkpoints passed functionally), so a
    shortcut reading the module's weights fails (review R5 F1)."""
    fm = functional_model(_mlp(dtype, act), F.cross_entropy)
    params = _moved(fm.params)
    stacked = {k: v[None] for k, v in params.items()}
    plan = check_plan(layer_plan(fm), params, _data(dtype, 4, 0))
    apply, _ = layer_grads_stream(plan)
    calls = _spy(monkeypatch)
    for n, seed in ((9, 1), (1, 2), (33, 3)):
        batch = _data(dtype, n, seed)
        _same(apply(stacked, batch), _factored(plan, stacked, batch)[0])
    assert len(calls) == 3


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_mlp_io_rows_are_autodiffs_at_params_other_than_the_modules(monkeypatch, act):
    """float64: the held plan's rows (through mlp_io) equal vmap(grad) at the params given,
    which differ from the module's weights (a shortcut reading the module fails at ~1e-1)."""
    fm = functional_model(_mlp(torch.float64, act), F.cross_entropy)
    params = _moved(fm.params)
    plan = check_plan(layer_plan(fm), params, _data(torch.float64, 4, 0))
    apply, _ = layer_grads_stream(plan)
    calls = _spy(monkeypatch)
    batch = _data(torch.float64, 9, 5)
    rows = apply({k: v[None] for k, v in params.items()}, batch).to_dense()[0]
    assert calls == [1]
    torch.testing.assert_close(rows, per_sample_grad(fm.loss, params, batch),
                               rtol=1e-12, atol=1e-12)


def test_other_cases_take_the_engine(monkeypatch):
    """losses wanted (TRAK), a LayerNorm in the chain: mlp_io is not asked or declines; two
    checkpoints take mlp_io once each (stop 26); the values are the engine's."""
    fm = functional_model(_mlp(torch.float64), F.cross_entropy)
    plan = check_plan(layer_plan(fm), fm.params, _data(torch.float64, 4, 0))
    apply, _ = layer_grads_stream(plan)
    calls = _spy(monkeypatch)
    batch = _data(torch.float64, 6, 1)
    one = {k: v[None] for k, v in fm.params.items()}
    apply(one, batch, losses=[])
    assert not calls
    two = {k: torch.stack([v, 2 * v]) for k, v in fm.params.items()}
    _same(apply(two, batch), _factored(plan, two, batch)[0])
    assert len(calls) == 2
    ln = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)).double().eval()
    fm2 = functional_model(ln, F.cross_entropy)
    plan2 = check_plan(layer_plan(fm2), fm2.params, _data(torch.float64, 4, 0))
    apply2, _ = layer_grads_stream(plan2)
    s2 = {k: v[None] for k, v in fm2.params.items()}
    _same(apply2(s2, batch), _factored(plan2, s2, batch)[0])
    assert layer_grads._plain_mlp(plan2, s2, batch) is None
