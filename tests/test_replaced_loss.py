"""A FunctionalModel whose ``loss`` was replaced (``fm._replace(loss=...)``, issue 14) is
attributed over that loss: the per-layer capture (which differentiates ``module`` with
``loss_fn``) is skipped with one warning, and the scores equal the dense ``vmap(grad)`` of the
replaced loss given as a plain function. The model as built keeps the capture, unwarned."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dattri_fn.transforms.layer_grads_plan as plan_mod
from dattri_fn import functional_model
from dattri_fn.attribute import grad_cos, grad_dot, influence, tracin, trak
from dattri_fn.attribute.outputs import classification_margin_loss
from dattri_fn.model import bridged
from dattri_fn.transforms.layer_grads import layer_plan


def _setup(loss_fn=F.cross_entropy):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    fm = functional_model(net, loss_fn)
    return fm, (x, y), (x[:4], y[:4])


@pytest.fixture
def plans(monkeypatch):
    """Counts the capture plans built (the fast path taken)."""
    calls = []
    real = plan_mod._plan_of
    monkeypatch.setattr(plan_mod, "_plan_of", lambda *a: calls.append(1) or real(*a))
    return calls


def _scores(make, loss, params, train, test):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = make(loss)
        S = m.score(params, m.prepare(params, train), train, test)
    return S, [str(i.message) for i in w]


def _replaced(fm):
    base = fm.loss
    return fm._replace(loss=lambda p, ex: 2 * base(p, ex))


def test_bridged_identity():
    fm, _, _ = _setup()
    assert bridged(fm)
    assert not bridged(_replaced(fm))
    assert not bridged(fm._replace(loss_fn=F.mse_loss))
    assert bridged(fm._replace(fixed=dict(fm.fixed)))  # dropout_masks does this
    assert bridged(fm._replace(params={k: v + 1 for k, v in fm.params.items()}))


METHODS = {
    "grad_dot": (grad_dot, 4.0),
    "grad_cos": (grad_cos, 1.0),
    "tracin": (lambda f: tracin(f, lrs=[0.5]), 4.0),
    # damping does not double with the loss: no fixed ratio to the model as built
    "influence": (lambda f: influence(f, curvature="hessian", damping=10.0), None),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_replaced_loss_scores_its_loss(name, plans):
    make, factor = METHODS[name]
    fm, train, test = _setup()
    fm2 = _replaced(fm)
    S0, w0 = _scores(make, fm, fm.params, train, test)
    assert not [m for m in w0 if "(replaced with" in m] and plans, "the model as built: capture, no warning"
    plans.clear()
    S2, w2 = _scores(make, fm2, fm.params, train, test)
    assert sum("(replaced with" in m for m in w2) == 1 and not plans
    dense, wd = _scores(make, fm2.loss, fm.params, train, test)
    assert not [m for m in wd if "(replaced with" in m]
    torch.testing.assert_close(S2, dense, rtol=1e-12, atol=1e-12)
    if factor is not None:  # 2x loss: gradients 2x
        torch.testing.assert_close(S2, factor * S0, rtol=1e-10, atol=1e-12)
    else:
        assert not torch.allclose(S2, S0)


def test_trak_margin_replaced(plans):
    fm, train, test = _setup(classification_margin_loss)
    fm2 = _replaced(fm)
    make = lambda f: trak(f, proj_dim=8, seed=1)
    S0, w0 = _scores(make, fm, fm.params, train, test)
    assert not [m for m in w0 if "(replaced with" in m] and plans
    plans.clear()
    S2, w2 = _scores(make, fm2, fm.params, train, test)
    assert sum("(replaced with" in m for m in w2) == 1 and not plans
    dense, _ = _scores(make, fm2.loss, fm.params, train, test)
    torch.testing.assert_close(S2, dense, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(S2, S0)


def test_layer_plan_none_for_replaced():
    fm, _, _ = _setup()
    assert layer_plan(fm) is not None
    with pytest.warns(UserWarning, match=r"layer_plan\(model=...\).*replaced with _replace"):
        assert layer_plan(_replaced(fm)) is None


def _reweighted(fm):
    base = fm.loss
    return fm._replace(loss=lambda p, ex: torch.where(ex[1] == 0, 1.0, 5.0) * base(p, ex))


@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_influence_hessian_of_a_reweighted_loss_is_that_losses(solver):
    """A class-reweighted loss equals the built one on class-0 rows, so a value check on the
    first examples cannot tell them apart: the batched/factored Hessian paths must not be taken
    (review RG H1); scores equal influence over the plain replaced function."""
    fm, train, test = _setup()
    train[1][:3] = 0
    fm2 = _reweighted(fm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _run(influence(fm2, solver=solver, damping=0.1), fm.params, train, test)
    ref = _run(influence(fm2.loss, solver=solver, damping=0.1), fm.params, train, test)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_training_steps_and_magic_use_the_replaced_loss():
    """make_step / magic on a replaced loss train on it (review RG H2: they ran module with
    loss_fn): the same parameters and metagradients as with the plain function."""
    from dattri_fn.attribute.magic import magic
    from dattri_fn.training import make_step, sgd

    fm, train, test = _setup()
    base = fm.loss
    fm2 = fm._replace(loss=lambda p, ex: 2 * base(p, ex))
    w = torch.ones(12, dtype=torch.float64)
    opt = sgd(0.1)
    got, _ = make_step(fm2, opt)(fm.params, opt.init(fm.params), train, w)
    ref, _ = make_step(fm2.loss, opt)(fm.params, opt.init(fm.params), train, w)
    assert all(torch.allclose(got[k], ref[k], rtol=0, atol=1e-15) for k in ref)
    S = [_run(magic(f, sgd(0.1), epochs=2, batch_size=4, seed=0), fm.params, train, test)
         for f in (fm2, fm2.loss)]
    assert torch.allclose(S[0], S[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["gn", "ekfac"])
def test_source_refuses_a_replaced_loss_where_it_needs_the_module(curvature):
    from dattri_fn.attribute.source import source

    fm, _, _ = _setup()
    fm2 = _reweighted(fm)
    with pytest.raises(ValueError, match=r"source\(loss=\.\.\.\): expected a FunctionalModel whose "
                       r"loss is functional_model's own .* got a replaced loss"):
        source(fm2, curvature=curvature)


def _run(method, params, train, test):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return method.score(params, method.prepare(params, train), train, test)
