"""Stop 27, engineer F3: leftovers of the new-user trial RU2.

M2: the plain-loss forms on a model vmap cannot run name the public call and the remedy;
L2: layer_grads' loop warning names the looped parameters; H's note: source(curvature="ekfac")
refuses fisher="true" on a loss with no known sampler at construction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, per_sample_grad, per_sample_layer_grads
from dattri_fn.attribute import grad_dot, source, tracin


class _Branchy(nn.Module):
    """Python control flow on a tensor's value: vmap cannot run it (as HF's mask helpers)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.s = nn.Linear(4, 5), nn.Linear(5, 3), nn.Parameter(torch.ones(5))

    def forward(self, x):
        h = torch.tanh(self.a(x)) * self.s
        if h.sum() > 1e9:
            h = h * 0
        return self.b(h)


def _fm():
    torch.manual_seed(0)
    return functional_model(_Branchy().double().eval(), F.cross_entropy)


def _xy(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                              generator=g)


def _is_vmap_cause(err: BaseException) -> bool:
    """Torch's error chained, and still a RuntimeError for code that catches it to loop."""
    return isinstance(err, RuntimeError) and isinstance(err.__cause__, RuntimeError) \
        and str(err.__cause__).startswith("vmap:")


def test_per_sample_grad_names_itself_and_the_remedy():
    fm = _fm()
    with pytest.raises(ValueError, match=r"^per_sample_grad\(loss=\.\.\.\): expected a loss "
                       r"torch\.func\.vmap can run.*per_sample_layer_grads\(fm, params, batch\)"
                       r".*needs no vmap") as info:
        per_sample_grad(fm.loss, fm.params, _xy())
    assert _is_vmap_cause(info.value)
    per_sample_layer_grads(fm, fm.params, _xy())  # the remedy runs (a loop for `s`)


@pytest.mark.filterwarnings("ignore:layer_grads. vmap cannot run")
@pytest.mark.parametrize("factory", [grad_dot, lambda f: tracin(f, lrs=[0.1])])
def test_gradsim_plain_loss_names_the_method(factory):
    fm = _fm()
    method = factory(fm.loss)
    name = "grad_dot" if factory is grad_dot else "tracin"
    b = _xy()
    with pytest.raises(ValueError, match=rf"^{name}\(loss=\.\.\.\): .*Pass the FunctionalModel "
                       rf"itself \({name}\(fm\), not {name}\(fm\.loss\)\): its per-layer "
                       r"capture needs no vmap") as info:
        method.score(fm.params, method.prepare(fm.params, b), b, b)
    assert _is_vmap_cause(info.value)
    good = factory(fm)  # the remedy: same scores as a loop of backward passes
    scores = good.score(fm.params, good.prepare(fm.params, b), b, b)
    assert scores.shape == (6, 6) and torch.isfinite(scores).all()


def test_gradsim_target_side_is_named_target():
    fm = _fm()
    ok = functional_model(nn.Linear(4, 3).double(), F.cross_entropy)
    method = grad_dot(ok.loss, target=lambda p, ex: fm.loss(fm.params, ex))
    b = _xy()
    with pytest.raises(ValueError, match=r"^grad_dot\(target=\.\.\.\): .*\(target=fm, not "
                       r"target=fm\.loss\)"):
        method.score(ok.params, method.prepare(ok.params, b), b, b)


def test_loop_warning_names_the_looped_parameters():
    fm = _fm()
    with pytest.warns(RuntimeWarning, match=r"vmap cannot run _Branchy .*outside the captured "
                      r"layers, \['s'\], get per-example gradients from a loop"):
        per_sample_layer_grads(fm, fm.params, _xy())


def test_dense_loop_warning_names_every_parameter():
    """A plan left dense (no layer captured) loops over every attributed parameter."""
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

        def forward(self, x):
            h = x @ self.w
            return h * 0 if h.sum() > 1e9 else h

    fm = functional_model(Bare().eval(), F.cross_entropy)
    with pytest.warns(RuntimeWarning, match=r"vmap cannot run Bare .*\['w'\]"):
        per_sample_layer_grads(fm, fm.params, _xy())


def _own_loss(out, y):
    return (out - F.one_hot(y, 3).to(out.dtype)).square().sum()


def test_source_ekfac_refuses_true_fisher_without_sampler_at_construction():
    torch.manual_seed(0)
    fm = functional_model(nn.Linear(4, 3).double(), _own_loss)
    with pytest.raises(ValueError, match=r"^source\(fisher=\.\.\.\): expected 'empirical' with "
                       r"curvature='ekfac'.*got 'true' with loss_fn _own_loss.*fisher='empirical'"
                       ) as info:
        source(fm, curvature="ekfac")
    assert str(info.value.__cause__).startswith("source(sampler=...)")
    source(fm, curvature="ekfac", fisher="empirical")  # the remedy
    source(fm, curvature="gn")  # no Fisher drawn: nothing to refuse
    ce = functional_model(nn.Linear(4, 3).double(), F.cross_entropy)
    source(ce, curvature="ekfac")  # a known sampler
    _own_loss.sample = lambda out, y, g: y
    try:
        source(fm, curvature="ekfac")  # its own .sample
    finally:
        del _own_loss.sample
