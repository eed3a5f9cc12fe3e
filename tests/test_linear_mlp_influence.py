"""influence(curvature="hessian") through operators.linear_mlp: a reused activation object and
the user's batch_rows (review R3, stop 22: F1 and F7)."""

import pytest
import torch
import torch.nn.functional as F
from test_linear_mlp import _shared_relu_case
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.attribute.influence_config import influence_config
from dattri_fn.attribute.influence_inverse import affine_hessian
from dattri_fn.operators import linear_mlp
from dattri_fn.operators.linear_mlp import MLPHessian


def _shared_relu():
    """test_linear_mlp's reused-ReLU model and train batches, and 5 test points."""
    m, train = _shared_relu_case()
    g = torch.Generator().manual_seed(7)
    return m, train, (0.5 * torch.rand(5, 3, generator=g, dtype=torch.float64),
                      torch.randint(0, 3, (5,), generator=g))


def _cfg(fm, **kw):
    args = dict(solver="cg", damping=2.0, curvature="hessian", target=None, model=None, l2=0.0,
                chunk_size=None, batch_rows=None, relatif=None, per_layer=False,
                solver_options={})
    return influence_config(fm, **{**args, **kw})


@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_influence_with_a_reused_relu_equals_autodiff(solver):
    """CG/LiSSA scores through the R-operator (a ReLU object used twice) == the same method on
    the plain loss (autodiff's double backward), float64, to 1e-10 (were 0.997 off)."""
    m, train, test = _shared_relu()
    fm = functional_model(m, F.cross_entropy)
    opts = (dict(scale=20.0, depth=40, batch_size=16, seed=5) if solver == "lissa"
            else dict(max_iter=300, rtol=1e-12))
    assert isinstance(affine_hessian(_cfg(fm, solver=solver, solver_options=opts), fm.params,
                                     train), MLPHessian)
    scores = {}
    for loss in (fm, fm.loss):
        meth = influence(loss, solver=solver, damping=2.0, curvature="hessian", **opts)
        scores[loss is fm] = meth.score(fm.params, meth.prepare(fm.params, train), train, test)
    torch.testing.assert_close(scores[True], scores[False], rtol=1e-10,
                               atol=1e-10 * float(scores[False].abs().max()))
    assert scores[True].abs().max() > 0


def test_influence_batch_rows_bounds_the_r_operator_steps(monkeypatch):
    """batch_rows=5: every R-operator product step holds <= 5 examples (it was 64 whatever the
    user asked), and the scores equal batch_rows=None's to 1e-10 (a sum in other steps)."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    fm = functional_model(m, F.cross_entropy)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(23, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (23,),
                                                                                generator=g)
    train, test = [(x[:12], y[:12]), (x[12:], y[12:])], (x[:3], y[:3])
    steps, inner = [], linear_mlp._product

    def product(layers, params, f, V):
        steps.append(f["p"].shape[0])
        return inner(layers, params, f, V)

    monkeypatch.setattr(linear_mlp, "_product", product)
    scores = {}
    for rows in (5, None):
        steps.clear()
        meth = influence(fm, solver="cg", damping=0.5, curvature="hessian", batch_rows=rows,
                         max_iter=200, rtol=1e-12)
        scores[rows] = meth.score(fm.params, meth.prepare(fm.params, train), train, test)
        assert steps and max(steps) == (5 if rows else 23)
    torch.testing.assert_close(scores[5], scores[None], rtol=1e-10,
                               atol=1e-10 * float(scores[None].abs().max()))
