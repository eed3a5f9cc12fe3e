"""The plan check from one reference row and the pass's sum identity (layer_grads._gap_sums).

check_plan on the compared examples (3 rows, one checkpoint, no dense parameter) compares
example 0's captured gradient with its own autodiff row (r) and the sum of the captured rows
with the batched pass's parameter gradient (s); each failure mode the three-row check caught
is caught here too, and named by which of (r), (s) sees it.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.transforms import layer_grads as lgm
from dattri_fn.transforms.layer_grads import check_plan, layer_plan
from dattri_fn.transforms.layer_grads_paths import _example_rows, _factored, _factored_and_rows
from dattri_fn.transforms.mlp_io import mlp_chain
from dattri_fn.tree import ravel_batched

DT = torch.float64
TOL = 10 * torch.finfo(DT).eps ** 0.5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _init(module, seed):
    g = _gen(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    return module.double().eval()


def _xy(seed, n, shape=(4,)):
    g = _gen(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _mlp(seed=0):
    # GELU: a model mlp_io does not certify, so its plan takes the check (issue 14)
    m = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    assert mlp_chain(m) is None
    return _init(m, seed)


class _Hidden(nn.Module):
    """Reads ``a``'s weight once more where the capture engine cannot see it (torch functions
    disabled), on examples 1.. only: example 0's own gradient is unaffected."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch._C.DisableTorchFunction():
            extra = torch.tanh(x @ self.a.weight.T)
            keep = (torch.arange(x.shape[0]) > 0).to(x.dtype)[:, None]
        return self.b(h + 0.5 * keep * extra)


class _Centred(nn.Module):
    """Subtracts the batch mean of the INPUT: the examples mix before any captured layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x - x.mean(0, keepdim=True) + 0.5 * x)))


class _Mixing(nn.Module):
    """Subtracts the batch mean between the layers: coupled in the backward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True) + 0.5 * h)


class _SeqFirst(nn.Module):
    """A Linear applied to [T, B, d]: with T = B its row 0 is position 0 of every example."""

    def __init__(self):
        super().__init__()
        self.l, self.h = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.l(x.transpose(0, 1))).mean(0))


class _OneSwitch(nn.Module):
    """Another function on a batch of one (a squeeze-like switch on the batch size)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h * 2 if x.shape[0] == 1 else h)


def _batch_softmax_loss(out, target):
    return F.cross_entropy(out, target)


def _rows(out, target):
    """A batched per-example form that is not one: each row's loss is shifted by the batch's
    mean logit (the examples' losses are coupled)."""
    return F.cross_entropy(out, target, reduction="none") + out.mean() * 0.7


_batch_softmax_loss.per_example = _rows


def _check_warns(fm, batch):
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        return check_plan(layer_plan(fm), fm.params, batch)


def test_one_reference_row_pass_equals_the_separate_calls():
    """ref_at=(0,): factors torch.equal to _factored, the row to _example_rows' row 0, and the
    sums equal the sum of the three autodiff rows at 1e-12."""
    fm = functional_model(_mlp(), F.cross_entropy)
    stacked, head = {k: v[None] for k, v in fm.params.items()}, _xy(1, 3)
    plan = layer_plan(fm)
    (lg, loop, layout, shapes), ref, sums = _factored_and_rows(plan, stacked, head, False, 3,
                                                               ref_at=(0,))
    want = _factored(plan, stacked, head)[0]
    rows = _example_rows(fm, fm.params, head, False)
    assert not loop and shapes is None
    assert all(torch.equal(a, b) for a, b in zip(lg.factors["0"], want.factors["0"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(lg.factors["2"], want.factors["2"], strict=True))
    assert all(torch.equal(ref[k], rows[k][:1]) for k in rows)
    total = ravel_batched(rows).sum(0)  # [P]
    got = torch.cat([v.reshape(-1) for v in sums.values()])
    torch.testing.assert_close(got, total, rtol=0, atol=1e-12)


def test_gap_sums_is_zero_on_a_clean_model_and_nan_propagates():
    """Clean MLP: both errors < 1e-12 (relative); a NaN in the reference row gives NaN."""
    fm = functional_model(_mlp(), F.cross_entropy)
    stacked, head = {k: v[None] for k, v in fm.params.items()}, _xy(2, 3)
    (lg, *_), ref, sums = _factored_and_rows(layer_plan(fm), stacked, head, False, 3, ref_at=(0,))
    err, scale, dtype = lgm._gap_sums(lg, ref, sums, 3)
    assert dtype == DT and err < 1e-12 * scale
    bad = {k: v.clone() for k, v in ref.items()}
    next(iter(bad.values())).view(-1)[0] = float("nan")
    assert math.isnan(lgm._gap_sums(lg, bad, sums, 3)[0])


def test_a_clean_model_stays_captured_and_checks_in_one_engine_call(monkeypatch):
    """No warning, not dense, one autograd.grad call: the shortcut was taken."""
    fm = functional_model(_mlp(), F.cross_entropy)
    calls, real = [], torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = check_plan(layer_plan(fm), fm.params, _xy(3, 3))
    assert not plan.dense and len(calls) == 1


def test_a_use_the_engine_misses_is_caught_by_the_sum_identity():
    """A weight use hidden from the capture on examples 1.. only: (r) holds (example 0 is
    untouched) and (s) fails; the checked plan is dense and its scores equal vmap(grad)'s."""
    fm = functional_model(_init(_Hidden(), 0), F.cross_entropy)
    stacked, head = {k: v[None] for k, v in fm.params.items()}, _xy(4, 3)
    (lg, *_), ref, sums = _factored_and_rows(layer_plan(fm), stacked, head, False, 3, ref_at=(0,))
    rows = lg.to_dense()[0]
    want = ravel_batched(ref)
    assert float((rows[:1] - want).abs().max()) < 1e-12 * float(want.abs().max())  # (r) holds
    err, scale, _ = lgm._gap_sums(lg, ref, sums, 3)
    assert err > TOL * scale  # (s) fails
    plan = _check_warns(fm, head)
    assert plan.dense
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        S = grad_dot(fm).score(fm.params, (), head, head)
    torch.testing.assert_close(S, grad_dot(fm.loss).score(fm.params, (), head, head),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("build, shape, loss", [
    (_Centred, (3, 4), F.cross_entropy),  # mixing before the first captured layer
    (_Mixing, (3, 4), F.cross_entropy),  # coupled in the backward
    (_SeqFirst, (3, 3, 4), F.cross_entropy),  # [T, B, d] with T = B taken as batch-first
    (_OneSwitch, (3, 4), F.cross_entropy),  # a batch of one is another function
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (3, 4),
     _batch_softmax_loss),  # a batched per-example loss that couples the examples
])
def test_each_failure_mode_is_caught_by_the_reference_row(build, shape, loss):
    """Example 0's captured gradient differs from its autodiff row: warned, dense, and the
    scores equal vmap(grad)'s at 1e-12."""
    fm = functional_model(_init(build(), 1), loss)
    g = _gen(5)
    x = torch.randn(*shape, generator=g, dtype=DT)
    batch = (x, torch.randint(0, 3, (shape[0],), generator=g))
    stacked = {k: v[None] for k, v in fm.params.items()}
    (lg, *_), ref, sums = _factored_and_rows(layer_plan(fm), stacked, batch, False, 3, ref_at=(0,))
    rows, want = lg.to_dense()[0], ravel_batched(ref)
    assert float((rows[:1] - want).abs().max()) > TOL * float(want.abs().max())  # (r) fails
    assert _check_warns(fm, batch).dense
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        S = grad_dot(fm).score(fm.params, (), batch, batch)
    torch.testing.assert_close(S, grad_dot(fm.loss).score(fm.params, (), batch, batch),
                               rtol=0, atol=1e-12)


def test_batchnorm_in_train_mode_raises_as_before():
    """BatchNorm1d in train mode cannot run a batch of one: the shortcut fails, the separate
    calls run and raise as the three-row check did (nothing decided)."""
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(_init(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5),
                                                  nn.Linear(5, 3)), 0).train(), F.cross_entropy)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        check_plan(layer_plan(fm), fm.params, _xy(6, 3))


class _CumsumFirst(nn.Module):
    """Reads the batch as time (a cumulative sum over examples) before the first Linear:
    example 0 is untouched, every later example mixes with the ones before it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.cumsum(x, 0))))


def _rows_but_first(out, y):
    """A batched per-example loss right on row 0 only (later rows weighted by their position)."""
    rows = F.cross_entropy(out, y, reduction="none")
    return rows * (1 + torch.arange(rows.shape[0], dtype=rows.dtype))


def _first_right_loss(out, y):
    return F.cross_entropy(out, y)


_first_right_loss.per_example = _rows_but_first


@pytest.mark.parametrize("build, loss", [
    (_CumsumFirst, F.cross_entropy),  # causal mixing along the batch
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), _first_right_loss),
])
def test_a_fault_that_leaves_example_0_alone_is_caught_by_the_last_row(build, loss):
    """Example 0's row matches its autodiff row, the last example's does not (review R2 F1:
    one reference row missed these): warned, dense, scores equal vmap(grad)'s at 1e-12."""
    fm = functional_model(_init(build(), 2), loss)
    batch = _xy(7, 3)
    stacked = {k: v[None] for k, v in fm.params.items()}
    (lg, *_), ref, sums = _factored_and_rows(layer_plan(fm), stacked, batch, False, 3,
                                             ref_at=(0, 2))
    rows, want = lg.to_dense()[0], ravel_batched(ref)
    scale = float(want.abs().max())
    assert float((rows[0] - want[0]).abs().max()) < 1e-12 * scale  # example 0 untouched
    assert float((rows[2] - want[1]).abs().max()) > TOL * scale  # the last one is not
    err, sc, _ = lgm._gap_sums(lg, ref, sums, 3, at=(0, 2))
    assert err > TOL * sc
    assert _check_warns(fm, batch).dense
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        S = grad_dot(fm).score(fm.params, (), batch, batch)
    ref_S = grad_dot(fm.loss).score(fm.params, (), batch, batch)
    torch.testing.assert_close(S, ref_S, rtol=0, atol=1e-12)
