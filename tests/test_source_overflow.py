"""SOURCE with an overflowing or NaN training example (issue 20, stop 26).

A float32 training input scaled by 1e20 and labelled away from its argmax has a per-example
gradient ~1e20 (squared norm ~1e40 > 3.4e38): the segment's curvature (gn), its decay (hessian)
or its EK-FAC factors go non-finite. prepare refuses it naming source.prepare(train=...) and the
example's index over the whole training set (batches counted in order), at the first, a middle and
the last batch; a NaN input is named by its index too. Clean data prepares as before.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.source import source
from dattri_fn.model import functional_model
from dattri_fn.training import (
    GradSpec,
    batch_order,
    finish_record,
    make_step,
    record_step,
    sgd,
    start_record,
    take,
)

N, B = 16, 4  # training examples, rows per training batch (4 batches)


def _problem(kind="linear"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = (nn.Linear(4, 3) if kind == "linear" else
           nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    return functional_model(net, F.cross_entropy), net, x, y


def _record(fm, data, tmp):
    opt = sgd(0.1)
    step = make_step(fm, opt)
    params, state = fm.params, opt.init(fm.params)
    rec = start_record("sgd", checkpoint_every=2, grads=GradSpec(fm.loss, str(tmp), None))
    for rows in batch_order(N, batch_size=4, epochs=2, seed=0):
        batch = take(data, rows)
        rec = record_step(rec, rows, lr=0.1, params=params, opt_state=state, batch=batch)
        params, state = step(params, state, batch, torch.ones(len(rows)))
    return finish_record(rec, params=params, opt_state=state)


def _scaled(net, x, y, k, scale=1e20):
    """Example k times ``scale`` and relabelled to its least likely class (a gradient ~scale)."""
    x, y = x.clone(), y.clone()
    x[k] *= scale
    with torch.no_grad():
        y[k] = net(x[k:k + 1]).argmin()
    return x, y


def _batches(x, y):
    return [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)]


# (model, source options): a Linear model's Hessian of a saturated example is 0 (its state stays
# finite and its scores right: nothing to refuse), so "hessian" runs on the ReLU MLP, whose mixed
# second derivatives ~1e20 make exp(-c lambda) overflow
_CASES = [("linear", dict(curvature="gn")), ("linear", dict(curvature="ekfac")),
          ("linear", dict(curvature="ekfac", pooled=True)), ("mlp", dict(curvature="gn")),
          ("mlp", dict(curvature="hessian"))]


def _id(case):
    return "-".join([case[0], *map(str, case[1].values())])


@pytest.mark.parametrize("case", _CASES, ids=_id)
@pytest.mark.parametrize("k", [0, 7, 15])  # first, a middle, the last batch
def test_an_overflowing_example_is_named_by_its_index(tmp_path, case, k):
    fm, net, x, y = _problem(case[0])
    rec = _record(fm, (x, y), tmp_path)
    bad = _scaled(net, x, y, k)
    m = source(fm, segments=2, **case[1])
    want = (r"^source\.prepare\(train=\.\.\.\): expected examples whose per-example gradients "
            r"are finite, with a squared norm finite in float32 \(<= 3\.4e\+38\), got a gradient "
            rf"of example {k} whose squared norm is [0-9.]+e\+(39|40|41) at the checkpoint of step")
    with pytest.raises(ValueError, match=want):
        m.prepare(rec, _batches(*bad))
    with pytest.raises(ValueError, match=want):  # one batch: the same index
        m.prepare(rec, bad)


def test_an_example_whose_curvature_alone_overflows_is_named(tmp_path):
    """ReLU MLP, example 6 x1e20 with every hidden unit off: its gradient is finite (~0.1), but
    the factored Gauss-Newton's a a^T ~1e40 (times g = 0) is NaN: the segment computed on each
    batch, then on each example of the failing batch alone, names example 6."""
    fm, net, x, y = _problem("mlp")
    rec = _record(fm, (x, y), tmp_path)
    bad = _scaled(net, x, y, 6)
    with pytest.raises(ValueError, match=r"^source\.prepare\(train=\.\.\.\): expected examples "
                                         r"each of which gives SOURCE's segments a finite "
                                         r"curvature, got example 6, whose own curvature alone"):
        source(fm, segments=2).prepare(rec, _batches(*bad))


def test_the_survey_mlp_names_example_2(tmp_path):
    """benchmarks/overflow_survey.py's case: a ReLU MLP, example 2 x1e20 (was
    source(feature_fn=...) at score time: the prepared state was NaN)."""
    fm, net, x, y = _problem("mlp")
    rec = _record(fm, (x, y), tmp_path)
    with pytest.raises(ValueError, match=r"^source\.prepare\(train=\.\.\.\): .* example 2 "):
        source(fm, segments=2).prepare(rec, _scaled(net, x, y, 2))


@pytest.mark.parametrize("k", [1, 10])
def test_a_nan_input_is_named_by_its_index_over_the_batches(tmp_path, k):
    fm, _, x, y = _problem()
    rec = _record(fm, (x, y), tmp_path)
    x = x.clone()
    x[k, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"^source\.prepare\(train=\.\.\.\): expected finite "
                                         rf"values, got NaN or inf in example {k}\.$"):
        source(fm, segments=2).prepare(rec, _batches(x, y))


@pytest.mark.parametrize("case", _CASES, ids=_id)
def test_clean_data_prepares_and_scores_finite(tmp_path, case):
    """The check passes tame data: finite scores, batches or one batch alike."""
    fm, _, x, y = _problem(case[0])
    rec = _record(fm, (x, y), tmp_path)
    m = source(fm, segments=2, **case[1])
    s1 = m.score(rec, m.prepare(rec, _batches(x, y)), _batches(x, y), (x[:3], y[:3]))
    s2 = m.score(rec, m.prepare(rec, (x, y)), (x, y), (x[:3], y[:3]))
    assert bool(torch.isfinite(s1).all())
    torch.testing.assert_close(s1, s2)
