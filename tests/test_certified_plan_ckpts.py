"""A plain MLP's plan over C stacked checkpoints is decided without the autodiff check (stop 26).

certified_plan's certification is structural (module kinds, loss, dtype), so it holds at any
number of checkpoints: over C = 1, 2, 3 checkpoints the decided plan equals the check's, the
gradients and TracIn/TracIn-Cos scores, top-k and self-scores are torch.equal to those with the
check alone, a held plan's later batches take mlp_io at every checkpoint bit for bit (the
engine's one-by-one pass), and data the check refuses or lets through at some checkpoint gives
the same outcome as with the check alone.
"""

import pytest
import torch
import torch.nn.functional as F
from plan_counting import count_plan_decisions, no_certified
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import tracin, tracin_cos
from dattri_fn.transforms import layer_grads, mlp_io
from dattri_fn.transforms.layer_grads import (
    certified_plan,
    check_plan,
    layer_grads_stacked,
    layer_grads_stream,
    layer_plan,
    plan_decisions,
)
from dattri_fn.transforms.layer_grads_paths import _factored


def _model(kind, dtype, bias=True):
    g = torch.Generator().manual_seed(3)
    if kind == "lr":
        m = nn.Linear(6, 4, bias=bias)
    else:
        m = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 5, bias=bias),
                          nn.ReLU(), nn.Linear(5, 4, bias=bias))
    m = m.to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return m


def _data(dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _ckpts(fm, C):
    """C checkpoints: the module's params, then each moved by its own seeded noise."""
    out = [dict(fm.params)]
    for c in range(1, C):
        g = torch.Generator().manual_seed(10 + c)
        out.append({k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                    for k, v in fm.params.items()})
    return out


def _stack(ckpts):
    return {k: torch.stack([c[k] for c in ckpts]) for k in ckpts[0]}


def _same_lg(x, y):
    assert x.layout == y.layout and x.factors.keys() == y.factors.keys()
    assert (x.dense is None) == (y.dense is None)
    assert x.dense is None or torch.equal(x.dense, y.dense)
    for n in x.factors:
        assert all(torch.equal(s, t) for s, t in zip(x.factors[n], y.factors[n], strict=True))


class _Loader:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


CASES = [(k, d, C) for k in ("lr", "mlp") for d in (torch.float32, torch.float64)
         for C in (1, 2, 3)]


@pytest.mark.parametrize("kind,dtype,C", CASES)
def test_decisions_and_gradients_equal_the_checks_over_checkpoints(kind, dtype, C):
    """certified_plan(stacked C) == _check's decisions; gradients of other batches torch.equal."""
    fm = functional_model(_model(kind, dtype), F.cross_entropy)
    plan, stacked = layer_plan(fm), _stack(_ckpts(fm, C))
    for n in (1, 3, 5):
        batch = _data(dtype, n)
        mine = certified_plan(plan, stacked, batch)
        assert mine is not None and mine.checked and not mine.dense
        checked = layer_grads._check(plan, stacked, batch)[0]
        assert plan_decisions(mine) == plan_decisions(checked)
        for m in (1, 4):
            other = _data(dtype, m, seed=m)
            _same_lg(layer_grads_stacked(mine, stacked, other),
                     layer_grads_stacked(checked, stacked, other))


@pytest.mark.parametrize("kind,dtype,C", [c for c in CASES if c[2] > 1])
@pytest.mark.parametrize("method", ["tracin", "tracin_cos"])
def test_tracin_scores_equal_the_checked_plans(monkeypatch, kind, dtype, C, method):
    """TracIn over C checkpoints, prepared state and (), in-memory (one pass) and streamed train,
    top-k and self-scores: torch.equal with and without the certified path; the certified
    path decides each call's plan with no autodiff check."""
    fm = functional_model(_model(kind, dtype), F.cross_entropy)
    ckpts = _ckpts(fm, C)
    lrs = [0.5, 0.25, 0.125][:C]
    make = tracin if method == "tracin" else tracin_cos
    train = [_data(dtype, 5, 1), _data(dtype, 1, 2), _data(dtype, 4, 5)]
    tests = [_data(dtype, 3, 3), _data(dtype, 1, 4)]

    def run():
        m = make(fm, lrs=lrs)
        out = []
        for state in (m.prepare(ckpts, train), ()):
            for test in tests:
                out.append(m.score(ckpts, state, train, test))
                out.append(m.score(ckpts, state, _Loader(train), test))
                top = m.score(ckpts, state, train, test, top_k=2)
                out += [top.values, top.indices]
            out.append(m.self_score(ckpts, state, train))
            out.append(m.self_score(ckpts, state, _Loader(train)))
        return out

    checks = []
    real = layer_grads._check
    with monkeypatch.context() as mp:
        mp.setattr(layer_grads, "_check", lambda *a, **k: checks.append(1) or real(*a, **k))
        new = run()
    assert checks == []
    with monkeypatch.context() as mp:
        no_certified(mp)
        old = run()
    assert len(new) == len(old)
    assert all(torch.equal(a, b) for a, b in zip(new, old, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_held_plan_takes_mlp_io_at_every_checkpoint_bit_for_bit(monkeypatch, dtype):
    """The stream's later batches at C = 3: mlp_io once per checkpoint, LayerGrads torch.equal
    to the engine's _factored (checkpoints one by one)."""
    fm = functional_model(_model("mlp", dtype), F.cross_entropy)
    stacked = _stack(_ckpts(fm, 3))
    plan = check_plan(layer_plan(fm), stacked, _data(dtype, 4))
    apply, _ = layer_grads_stream(plan)
    calls = []
    real = mlp_io.mlp_io
    monkeypatch.setattr(mlp_io, "mlp_io", lambda *a: calls.append(1) or real(*a))
    for n, seed in ((9, 1), (1, 2), (6, 3)):
        batch = _data(dtype, n, seed)
        _same_lg(apply(stacked, batch), _factored(plan, stacked, batch)[0])
    assert len(calls) == 9


def test_each_call_decides_once_over_checkpoints(monkeypatch):
    """TracIn, C = 3: score and self_score each decide their plan once (counted as before)."""
    fm = functional_model(_model("mlp", torch.float64), F.cross_entropy)
    ckpts = _ckpts(fm, 3)
    m = tracin(fm, lrs=[0.1, 0.1, 0.1])
    train, test = [_data(torch.float64, 5, 1), _data(torch.float64, 4, 2)], _data(torch.float64, 3)
    calls = count_plan_decisions(monkeypatch)
    state = m.prepare(ckpts, train)
    m.score(ckpts, state, train, test)
    m.self_score(ckpts, state, train)
    assert len(calls) == 2


def _overflowing_at(c: int, C: int):
    """float32 MLP, C checkpoints; checkpoint c's middle weight times 1e38, so that the last
    layer's inputs (after the ReLU) and so its rows g a^T overflow there, the others tame."""
    fm = functional_model(_model("mlp", torch.float32), F.cross_entropy)
    ckpts = _ckpts(fm, C)
    ckpts[c] = {k: v * (1e38 if k == "2.weight" else 1.0) for k, v in ckpts[c].items()}
    return fm, ckpts


@pytest.mark.parametrize("c", [0, 1, 2])
def test_rows_overflowing_at_one_checkpoint_get_the_checks_outcome(monkeypatch, c):
    """Finite inputs whose rows may overflow at checkpoint c: not certified (the bound covers
    every checkpoint), and the stream's outcome (error or rows) equals the check's."""
    fm, ckpts = _overflowing_at(c, 3)
    stacked = _stack(ckpts)
    batch = _data(torch.float32, 4, 7)
    assert certified_plan(layer_plan(fm), stacked, batch) is None

    def outcome():
        try:
            return "ok", layer_grads_stream(layer_plan(fm))[0](stacked, batch).to_dense()
        except Exception as e:  # noqa: BLE001
            return type(e), str(e)

    new = outcome()
    with monkeypatch.context() as mp:
        no_certified(mp)
        old = outcome()
    assert new[0] == old[0]
    if new[0] == "ok":
        assert torch.equal(new[1].nan_to_num(), old[1].nan_to_num())
    else:
        assert new[1] == old[1]


def test_checkpoints_of_different_counts_get_the_check():
    """A stacked dict whose keys disagree on C is not certified (the check names it)."""
    fm = functional_model(_model("mlp", torch.float64), F.cross_entropy)
    stacked = _stack(_ckpts(fm, 2))
    stacked["0.bias"] = stacked["0.bias"][:1]
    assert certified_plan(layer_plan(fm), stacked, _data(torch.float64, 4)) is None
