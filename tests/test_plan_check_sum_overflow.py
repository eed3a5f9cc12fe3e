"""The plan check's non-finite refusal is decided from per-example rows only (review R5 F2).

With three compared examples the check takes the reference rows of the first and last example
and the pass's summed parameter gradient (layer_grads_gap._gap_sums). When those rows are finite
but the sum is not, either the middle example's own gradient is not finite (refused, naming the
batch) or only the float32 sum of finite rows overflows: then each example's own row decides
(layer_grads_gap._gap), and the check is exactly as strict (a wrong captured row still fails).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.transforms import layer_grads as lgmod
from dattri_fn.transforms.grad import per_sample_grad
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stream, layer_plan

C = 1.2e19  # float32: each example's weight gradient 2 C^2 = 2.9e38 is finite, 3 of them sum to inf


def _model():
    net = nn.Sequential(nn.Linear(1, 1)).eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
    return functional_model(net, F.mse_loss)


def _batch(cs):
    x = torch.tensor(cs, dtype=torch.float32)[:, None]
    return x, -x


def _check(fm, batch):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plan = check_plan(layer_plan(fm), fm.params, batch)
    return plan, [str(m.message) for m in w]


def test_the_data_overflows_only_in_the_sum():
    fm, batch = _model(), _batch([C, C, C])
    G = per_sample_grad(fm.loss, fm.params, batch)
    assert torch.isfinite(G).all() and not torch.isfinite(G.sum(0)).all()


def test_finite_rows_whose_sum_overflows_are_checked_row_by_row():
    """Refused before as 'NaN or inf in autodiff's gradient' (false: each row is finite)."""
    fm, batch = _model(), _batch([C, C, C])
    plan, warned = _check(fm, batch)
    assert not plan.dense and not warned
    apply, _ = layer_grads_stream(plan)
    rows = apply({k: v[None] for k, v in fm.params.items()}, batch).to_dense()[0]
    torch.testing.assert_close(rows, per_sample_grad(fm.loss, fm.params, batch),
                               rtol=1e-6, atol=0)


def test_the_row_by_row_comparison_still_catches_a_wrong_captured_row(monkeypatch):
    """The middle captured row halved (what the sum identity alone would have shown): the
    per-row comparison sees it; the plan goes dense with the mismatch warning."""
    real = lgmod._factored_and_rows

    def broken(*a, **kw):
        (lg, *rest), ref, sums = real(*a, **kw)
        return (lg.scale(torch.tensor([[1.0, 0.5, 1.0]])), *rest), ref, sums

    monkeypatch.setattr(lgmod, "_factored_and_rows", broken)
    fm, batch = _model(), _batch([C, C, C])
    plan, warned = _check(fm, batch)
    assert plan.dense
    assert any("do not match vmap(grad)" in m for m in warned), warned


def test_a_middle_example_whose_own_gradient_overflows_is_refused():
    """Rows 0 and 2 tame, example 1's own gradient inf: the refusal stands, by name."""
    fm = _model()
    with pytest.raises(ValueError, match=r"layer_grads\(batch=\.\.\.\): expected examples whose "
                                         r"per-example gradients are finite"):
        _check(fm, _batch([1e3, 1e20, 1e3]))
