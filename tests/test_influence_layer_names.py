"""Two gaps of influence's K-FAC/EK-FAC prepare around layer names (review R1 stop 22 F3, F4).

F3: params holding a LayerNorm's weight but not its bias were accepted at ``prepare``; ``score``
then failed deep inside with ``tapped(state=...) missing ['1.bias']`` (the diagonal block
captures a LayerNorm's weight and bias together). They are refused at ``prepare`` naming
``params``, as a Linear weight without its bias is.

F4: ``once_per_call`` (one warning per ensemble prepare) blanked every digit of a warning,
layer names too: a later checkpoint's warning about layer '2' of an ``nn.Sequential`` was
dropped as a repeat of one about layer '0'. Only measurements (a decimal point or an exponent)
are blanked now, and quoted names are kept whole."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.influence import influence
from dattri_fn.attribute.influence_inverse import once_per_call
from dattri_fn.model import functional_model

DT = torch.float64


def _problem():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x, y = torch.randn(12, 3, generator=g, dtype=DT), torch.randint(0, 2, (12,), generator=g)
    return net, (x, y), (x[:4], y[:4])


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_a_layernorm_weight_without_its_bias_is_refused_at_prepare(solver):
    """params = the model's keys minus '1.bias' (a LayerNorm's): prepare, from data or from
    given factors, raises if_<solver>(params=...) naming '1.bias' (was: prepare passed, score
    raised the inner tapped(state=...) error)."""
    from dattri_fn.operators.kfac import ekfac_factors, kfac_factors

    net, train, _ = _problem()
    fm = functional_model(net, F.cross_entropy)
    sub = {k: v for k, v in fm.params.items() if k != "1.bias"}
    m = influence(fm, solver=solver, damping=0.1)
    fit = kfac_factors if solver == "kfac" else ekfac_factors
    factors = fit(net, F.cross_entropy, sub, train, others="diagonal")
    for given in (train, factors):
        with pytest.raises(ValueError, match=rf"if_{solver}\(params=\.\.\.\): expected every key "
                           r"of the model's params that belongs to a layer .*missing \['1\.bias'\]"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m.prepare(sub, given)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_params_of_whole_layers_with_a_layernorm_still_score(solver):
    """params = {0.*, 1.* (the whole LayerNorm)} of the full model's FunctionalModel score
    exactly as functional_model(params=those keys) (diff <= 1e-12); nonzero."""
    net, train, test = _problem()
    keys = ["0.weight", "0.bias", "1.weight", "1.bias"]
    fm, fm_sel = functional_model(net, F.cross_entropy), functional_model(
        net, F.cross_entropy, params=keys)
    out = []
    for loss, p in ((fm, {k: fm.params[k] for k in keys}), (fm_sel, dict(fm_sel.params))):
        m = influence(loss, solver=solver, damping=0.1, others="diagonal")
        out.append(m.score(p, m.prepare(p, [train]), [train], [test]))
    assert float(out[1].abs().max()) > 1e-3
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-12)


def _warn_each(messages):
    def build(c):
        warnings.warn(messages[c], UserWarning, stacklevel=1)
        return c

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert once_per_call(build, list(range(len(messages)))) == tuple(range(len(messages)))
    return [str(x.message) for x in w]


def test_warnings_about_differently_numbered_layers_are_both_issued():
    """Checkpoint 1 moves layer '0', checkpoint 2 layer '2' (an nn.Sequential): both warnings
    are issued, in order (the second was dropped as a repeat)."""
    text = ("kfac_factors(params=...): 2 params are outside the Kronecker-factored layers "
            "(layer '{n}': its captured per-example gradients differ from autodiff on the "
            "first 2 rows ({d} of 1.2e+00)): ['{n}.weight', '{n}.bias']")
    msgs = [text.format(n=0, d="3.1e-01"), text.format(n=2, d="4.7e-02")]
    assert _warn_each(msgs) == msgs


def test_a_warning_that_differs_only_in_its_measurements_is_issued_once():
    """The same layer '0' with another scale (3.1e-01 vs 4.7e-02, 0.25 vs 0.5, 1e-12 vs 2e-12)
    on checkpoint 2 is a repeat: one warning."""
    text = "layer '0': differs ({d} of 1.2e+00, tol {t}, ratio {r}); the model's params"
    msgs = [text.format(d="3.1e-01", t="1e-12", r="0.25"), text.format(d="4.7e-02", t="2e-12",
                                                                          r="0.5")]
    assert _warn_each(msgs) == msgs[:1]
