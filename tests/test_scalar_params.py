"""A 0-d parameter (a temperature, CLIP's ``logit_scale``) next to captured layers (review R5, stop
22): its per-example rows are ``[C, B]`` / ``[b]``, which ``flatten(lead)`` refused, so the layer
plan went dense with a warning blaming the layout and K-FAC/EK-FAC's score blamed the test data."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.attribute.influence import influence
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan

DT = torch.float64


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x))) * self.scale


def _problem():
    torch.manual_seed(0)
    fm = functional_model(_Scaled().double(), F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g))
    test = (torch.randn(3, 3, generator=g, dtype=DT), torch.randint(0, 2, (3,), generator=g))
    return fm, train, test


def test_the_plan_keeps_its_layers_and_the_rows_equal_vmap_grad():
    """check_plan: not dense, no warning; rows == vmap(grad) at 1e-12; Grad-Dot == G G_t^T."""
    fm, train, test = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = check_plan(layer_plan(fm), fm.params, train)
        rows = layer_grads_stacked(plan, {k: v[None] for k, v in fm.params.items()}, train).to_dense()[0]
        m = grad_dot(fm)
        S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    assert not plan.dense
    G, Gt = per_sample_grad(fm.loss, fm.params, train), per_sample_grad(fm.loss, fm.params, test)
    torch.testing.assert_close(rows, G, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, G @ Gt.T, rtol=1e-12, atol=1e-12)


def test_kfac_and_ekfac_score_with_the_scalar_in_the_diagonal_block():
    """score / self_score == g_i^T C^-1 g_j with the state's own inverse (1e-12)."""
    fm, train, test = _problem()
    G, Gt = per_sample_grad(fm.loss, fm.params, train), per_sample_grad(fm.loss, fm.params, test)
    for solver in ("kfac", "ekfac"):
        m = influence(fm, solver=solver, damping=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one warning naming 'scale' (the diagonal block)
            state = m.prepare(fm.params, [train])
            S, D = m.score(fm.params, state, [train], [test]), m.self_score(fm.params, state, [test])
        torch.testing.assert_close(S, G @ state.ihvp(Gt).T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(D, (Gt * state.ihvp(Gt)).sum(1), rtol=1e-10, atol=1e-12)
