"""Methods that differentiate ``module`` with ``loss_fn`` by design refuse a FunctionalModel
whose ``loss`` was replaced (issue 14), naming the function and argument; influence's default
curvature is then the Hessian of the replaced loss."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.app.recipes import gauss_newton as recipe_gn
from dattri_fn.attribute import factgrass, influence, logra
from dattri_fn.model import bridged
from dattri_fn.operators import gauss_newton
from dattri_fn.transforms.layer_grads import per_sample_layer_grads


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    fm = functional_model(net, F.cross_entropy)
    base = fm.loss
    return fm, fm._replace(loss=lambda p, ex: 2 * base(p, ex)), (x, y)


REFUSALS = {
    "logra": lambda m: logra(m, proj_dim=2),
    "factgrass": lambda m: factgrass(m, proj_dim=4),
    "gauss_newton": gauss_newton,
    "influence": lambda m: influence(m, curvature="gauss_newton"),
    "influence-kfac": lambda m: influence(m, solver="kfac"),
    "per_sample_layer_grads": lambda m: per_sample_layer_grads(m, m.params, (torch.zeros(
        2, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.long))),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refused_with_a_named_error(name):
    fm, fm2, _ = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"\(\w+=\.\.\.\): expected.*replaced loss"):
            REFUSALS[name](fm2)
        REFUSALS[name](fm)  # the model as built: accepted


def test_influence_default_curvature_is_the_replaced_losss_hessian():
    fm, fm2, train = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = influence(fm2, damping=10.0)
        ref = influence(fm2.loss, curvature="hessian", damping=10.0)
        S = [m.score(fm.params, m.prepare(fm.params, train), train, train) for m in (got, ref)]
    torch.testing.assert_close(S[0], S[1], rtol=1e-12, atol=1e-12)


def test_recipe_gauss_newton_builds_a_bridge():
    fm, _, train = _setup()
    mse = lambda o, t: 3 * F.cross_entropy(o, t)  # another loss_fn than fm's
    ref = functional_model(fm.module, mse)
    assert bridged(ref)
    P = sum(v.numel() for v in fm.params.values())
    v = torch.randn(P, dtype=torch.float64)
    got = recipe_gn(fm, mse)(fm.params, [train])(v)
    want = gauss_newton(ref)(ref.params, [train])(v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
