"""Grad-Dot / Grad-Cos / TracIn ``self_score`` refuse non-finite self-scores by name, as ``score``
does (review R5 F5: the one-pass and streamed factored paths returned NaN silently when the
overflowing examples were past the plan check's first ones)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_cos, grad_dot, tracin
from dattri_fn.transforms.grad import per_sample_grad


def _overflowing():
    """float32 Linear whose first 3 examples are tame and last 3 give NaN gradients."""
    m = nn.Linear(4, 3)
    with torch.no_grad():
        m.weight.fill_(1e30)
        m.bias.zero_()
    fm = functional_model(m.eval(), F.cross_entropy)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(8)) * 1e10
    x[:3] *= 1e-40
    return fm, [(x[:3], torch.tensor([0, 1, 2])), (x[3:], torch.tensor([2, 1, 0]))]


METHODS = {"grad_dot": lambda fm, **kw: grad_dot(fm, **kw),
           "grad_cos": lambda fm, **kw: grad_cos(fm, **kw),
           "tracin": lambda fm, **kw: tracin(fm, lrs=[0.5], **kw)}


@pytest.mark.parametrize("streamed", [False, True], ids=["one-pass", "chunked stream"])
@pytest.mark.parametrize("prepared", [False, True], ids=["state ()", "prepared"])
@pytest.mark.parametrize("method", list(METHODS))
def test_self_score_refuses_non_finite_like_score(method, prepared, streamed):
    fm, train = _overflowing()
    M = METHODS[method](fm, **({"chunk_size": 2} if streamed else {}))
    params = [fm.params] if method == "tracin" else fm.params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = M.prepare(params, train[:1]) if prepared else ()
        with pytest.raises(ValueError, match=rf"{method}\(train=\.\.\.\): expected examples "
                                             r"whose per-example .*finite"):
            M.score(params, state, train, train[0])
        with pytest.raises(ValueError, match=rf"{method}\(train=\.\.\.\): expected examples "
                           r"whose per-example .*finite, got NaN or inf in the self-score of "
                           r"example 3"):
            M.self_score(params, state, train)


@pytest.mark.parametrize("streamed", [False, True], ids=["one-pass", "chunked stream"])
def test_finite_self_scores_unchanged(streamed):
    """The scan changes no value: float64 self-scores equal |g_i|^2 from vmap(grad)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    train = [(x[:4], y[:4]), (x[4:], y[4:])]
    G = per_sample_grad(fm.loss, fm.params, (x, y))
    M = grad_dot(fm, **({"chunk_size": 2} if streamed else {}))
    torch.testing.assert_close(M.self_score(fm.params, (), train), (G * G).sum(1),
                               rtol=1e-12, atol=0)
