"""The plan check: its comparison (_gap), one engine call for its pass and reference rows, prepare's plan."""

import math

import pytest
import torch
import torch.nn.functional as F
from plan_counting import no_certified
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.transforms import layer_grads as lgm
from dattri_fn.transforms.layer_grads import check_plan, layer_plan, plan_decisions
from dattri_fn.transforms.layer_grads_paths import _example_rows, _factored
from dattri_fn.tree import ravel_batched

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class _Scaled(nn.Module):
    """A Linear, a free scale (a dense parameter next to the captured layers) and a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3, bias=False)
        self.s = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * self.s)


def _model(seed, kind):
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)) if kind == "mlp" else _Scaled()
    g = _gen(seed)
    for p in m.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    return m.double().eval()


def _xy(seed, n):
    g = _gen(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("kind", ["mlp", "scaled"])
def test_gap_equals_the_raveled_rows_maxima(kind):
    """_gap(lg, ref) == (max |to_dense - ravel(ref)|, max |ravel(ref)|) exactly, < 1e-12 here."""
    fm = functional_model(_model(0, kind), F.cross_entropy)
    stacked, head = {k: v[None] for k, v in fm.params.items()}, _xy(1, 3)
    plan = check_plan(layer_plan(fm), fm.params, head)
    lg = _factored(plan, stacked, head)[0]
    ref = _example_rows(fm, fm.params, head, False)
    err, scale, dtype = lgm._gap(lg, ref, 3)
    dense, flat = lg.select(0).rows(0, 3).to_dense()[0], ravel_batched(ref)  # [3, P], [3, P]
    assert err == float((dense - flat).abs().max()) and scale == float(flat.abs().max())
    assert dtype == DT and err < 1e-12 < scale


def test_gap_reports_a_nan_and_only_the_first_rows():
    """A NaN in any reference block gives err = NaN (torch's max, not Python's); rows past k unread."""
    fm = functional_model(_model(0, "mlp"), F.cross_entropy)
    stacked, head = {k: v[None] for k, v in fm.params.items()}, _xy(1, 4)
    lg = _factored(check_plan(layer_plan(fm), fm.params, head), stacked, head)[0]
    ref = _example_rows(fm, fm.params, head, False)
    last = list(ref)[-1]
    bad = {**ref, last: ref[last].clone()}
    bad[last][1].view(-1)[0] = float("nan")
    assert math.isnan(lgm._gap(lg, bad, 4)[0])
    far = {k: v.clone() for k, v in ref.items()}
    for v in far.values():
        v[3] += 1.0  # example 3 is past k = 3
    assert lgm._gap(lg, far, 3)[0] < 1e-12
    assert lgm._gap(lg, far, 4)[0] == pytest.approx(1.0, abs=1e-12)


def test_prepare_keeps_no_probe_shapes_and_decides_as_check_plan():
    """prepare's decisions == plan_decisions(check_plan(...)) on the same 3 rows; shapes dropped there."""
    fm = functional_model(_model(2, "scaled"), F.cross_entropy)
    train = [_xy(3, 5), _xy(4, 5)]
    state = grad_dot(fm).prepare(fm.params, train)
    want = check_plan(layer_plan(fm), fm.params, (train[0][0][:3], train[0][1][:3]))
    assert state.train == plan_decisions(want) and want.shapes != ()
    bare = lgm._check(layer_plan(fm), {k: v[None] for k, v in fm.params.items()},
                      (train[0][0][:3], train[0][1][:3]), keep_shapes=False)[0]
    assert bare.shapes == () and plan_decisions(bare) == state.train


@pytest.mark.parametrize("kind", ["mlp", "conv1d"])
def test_one_engine_call_equals_the_two_separate_calls(kind):
    """_factored_and_rows == (_factored, _example_rows) torch.equal: the two graphs share no leaf."""
    if kind == "mlp":
        fm, head = functional_model(_model(0, "mlp"), F.cross_entropy), _xy(1, 3)
    else:
        pytest.importorskip("transformers")
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)  # Conv1D draws its init from the global generator; overwritten below
        m = nn.Sequential(Conv1D(5, 4), nn.Tanh(), nn.Linear(5, 3)).double().eval()
        g = _gen(4)
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
        fm, head = functional_model(m, F.cross_entropy), _xy(5, 3)
    plan = layer_plan(fm)
    stacked = {k: v[None] for k, v in fm.params.items()}
    assert lgm._one_call_ok(plan, stacked)
    (lg, loop, layout, shapes), ref = lgm._factored_and_rows(plan, stacked, head, False)
    lg2, loop2, layout2, shapes2 = _factored(plan, stacked, head)
    ref2 = _example_rows(fm, fm.params, head, False)
    assert (loop, layout, shapes) == (loop2, layout2, shapes2)
    assert torch.equal(lg.to_dense(), lg2.to_dense())
    assert list(ref) == list(ref2) and all(torch.equal(ref[k], ref2[k]) for k in ref)


def test_one_engine_call_not_taken_with_dense_params_or_checkpoints(monkeypatch):
    """Dense parameters (vmap over examples) or C = 2 keep the separate calls; decisions equal."""
    # a plain MLP at C = 2 is decided without the check since stop 26: make it run the check
    no_certified(monkeypatch)
    calls, real = [], lgm._check
    monkeypatch.setattr(lgm, "_check", lambda *a, **k: calls.append(1) or real(*a, **k))
    fm = functional_model(_model(0, "scaled"), F.cross_entropy)
    plan = check_plan(layer_plan(fm), fm.params, _xy(1, 3))  # s (x * s): vmap(grad), silently
    assert plan.autodiff == ("s",)
    assert not lgm._one_call_ok(plan, {k: v[None] for k, v in fm.params.items()})
    fm2 = functional_model(_model(0, "mlp"), F.cross_entropy)
    two = {k: torch.stack([v, v + 0.1]) for k, v in fm2.params.items()}
    assert not lgm._one_call_ok(layer_plan(fm2), two)
    checked = check_plan(layer_plan(fm2), two, _xy(1, 3))
    assert checked.checked and not checked.dense and checked.layers == layer_plan(fm2).layers
    assert len(calls) == 2


def test_check_takes_one_engine_call_and_falls_back_on_any_error(monkeypatch):
    """check_plan on 3 rows calls autograd once (no separate reference rows); a failing shortcut
    leaves the same checked plan from the two calls."""
    # the check itself: a plain MLP's plan is decided without it (issue 14, stop 25)
    no_certified(monkeypatch)
    fm = functional_model(_model(0, "mlp"), F.cross_entropy)
    head = _xy(1, 3)
    calls, real = [], torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    one = check_plan(layer_plan(fm), fm.params, head)
    assert len(calls) == 1
    monkeypatch.setattr(lgm, "_factored_and_rows", lambda *a, **k: 1 / 0)
    calls.clear()
    two = check_plan(layer_plan(fm), fm.params, head)
    assert len(calls) == 2 and plan_decisions(one) == plan_decisions(two) and not one.dense
