"""A solver's warning points at the user's line, also when a method called the solver (the
lead, stop 28: influence's CG and LiSSA warnings pointed at influence_cg.py)."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, ihvp_cg
from dattri_fn.attribute import influence


def _problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    return functional_model(net, F.cross_entropy), (x, torch.arange(12) % 3)


def _located(call):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        call()
    ours = [w for w in got if issubclass(w.category, RuntimeWarning) and "rows" in str(w.message)]
    assert ours, [str(w.message) for w in got]
    return {w.filename for w in ours}


def test_influence_cg_and_lissa_warnings_point_at_the_caller():
    fm, data = _problem()
    for m in (influence(fm, solver="cg", max_iter=1, damping=1e-3),
              influence(fm, solver="lissa", depth=2, scale=10.0, damping=1e-3)):
        assert _located(lambda m=m: m.score(fm.params, m.prepare(fm.params, data), data,
                                            data)) == {__file__}


def test_a_direct_solver_call_points_at_the_caller():
    A = torch.diag(torch.logspace(0, 6, 20, dtype=torch.float64))
    V = torch.randn(3, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert _located(lambda: ihvp_cg(A, damping=1e-6, max_iter=2)(V)) == {__file__}
