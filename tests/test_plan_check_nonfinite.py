"""The plan check with non-finite gradients (review R4 F4, stop 24).

An infinite captured row used to pass the check: the sum identity's error and scale were both
inf (inf <= tol * inf), and the comparison of the worse part picked the finite row error. Now a
non-finite captured row against finite autodiff rows is a mismatch (warned, dense), and
non-finite autodiff rows (the examples' own gradients overflow) are refused by name.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.transforms import layer_grads_paths as paths
from dattri_fn.transforms.layer_grads import check_plan, layer_plan
from dattri_fn.transforms.layer_grads_gap import _gap_sums
from dattri_fn.transforms.layer_grads_paths import _factored_and_rows
from dattri_fn.transforms.mlp_io import mlp_chain

DT = torch.float64


def _mlp():
    g = torch.Generator().manual_seed(3)
    # GELU: a model mlp_io does not certify, so its plan takes the check (issue 14), which is
    # what these tests break and must see
    m = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    for p in m.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    assert mlp_chain(m) is None
    return m.double().eval()


def _xy(n, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _inf_row(monkeypatch, row):
    """The capture returns example ``row``'s output gradient as inf at one entry."""
    real = paths._assemble

    def assemble(plan, raw, rest, lead):
        lg, layout = real(plan, raw, rest, lead)
        factors = {}
        for n, (a, g) in lg.factors.items():
            g = g.clone()
            g[:, row, 0] = float("inf")
            factors[n] = (a, g)
        return lg._replace(factors=factors), layout

    monkeypatch.setattr(paths, "_assemble", assemble)


@pytest.mark.parametrize("row", [1, 0, 2])
def test_an_infinite_captured_row_is_a_mismatch(monkeypatch, row):
    """Example ``row``'s captured gradient inf (the middle one: compared only through the sum):
    warned as not finite and dense; _gap_sums' error is NaN, never a finite pick."""
    fm = functional_model(_mlp(), F.cross_entropy)
    batch = _xy(3)
    _inf_row(monkeypatch, row)
    stacked = {k: v[None] for k, v in fm.params.items()}
    (lg, *_), ref, sums = _factored_and_rows(layer_plan(fm), stacked, batch, False, 3,
                                             ref_at=(0, 2))
    assert math.isnan(_gap_sums(lg, ref, sums, 3, at=(0, 2))[0])
    with pytest.warns(RuntimeWarning, match="not finite"):
        plan = check_plan(layer_plan(fm), fm.params, batch)
    assert plan.dense


def test_prepare_with_an_infinite_middle_row_scores_exactly(monkeypatch):
    """grad_dot's prepare sees the middle example's inf capture: dense state, finite scores ==
    plain vmap(grad) Grad-Dot (1e-12), where the accepted plan gave non-finite scores."""
    fm = functional_model(_mlp(), F.cross_entropy)
    train, test = _xy(8, 6), _xy(4, 7)
    _inf_row(monkeypatch, 1)
    method = grad_dot(fm)
    with pytest.warns(RuntimeWarning, match="not finite"):
        state = method.prepare(fm.params, train)
    assert state.train.dense
    S = method.score(fm.params, state, train, test)
    torch.testing.assert_close(S, grad_dot(fm.loss).score(fm.params, (), train, test),
                               rtol=0, atol=1e-12)


def test_examples_whose_own_gradients_overflow_are_refused_by_name():
    """float32, inputs ~1e30 into a Linear with weights ~1e-20 and a squared-error loss: the
    loss (~1e20) is finite but every gradient 2 (W a - y) a^T (~1e40) overflows in autodiff as
    in the capture, so no answer is right: the check raises naming the batch (prepare: train)
    and warns nothing (it used to pass the plan: inf <= tol * inf)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[0].weight.mul_(1e-20)
        net[0].bias.zero_()
    fm = functional_model(net, F.mse_loss)
    x, y = 1e30 * torch.randn(6, 4), torch.randn(6, 3)
    assert torch.isfinite(fm.loss(fm.params, (x[0], y[0])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not made dense
        with pytest.raises(ValueError, match=r"layer_grads\(batch=\.\.\.\): expected examples "
                                             r"whose per-example gradients are finite"):
            check_plan(layer_plan(fm), fm.params, (x, y))
        with pytest.raises(ValueError, match=r"grad_dot\(train=\.\.\.\): expected examples "
                                             r"whose per-example gradients are finite"):
            grad_dot(fm).prepare(fm.params, (x, y))


def test_finite_gradients_pass_as_before():
    fm = functional_model(_mlp(), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_plan(layer_plan(fm), fm.params, _xy(3)).dense
