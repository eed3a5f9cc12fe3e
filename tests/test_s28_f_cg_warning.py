"""Stop 28, engineer F (issue 14, item 3): block CG's non-convergence warning says what happened:
the steps run, why it stopped (max_iter run out, or the Krylov space spent at the dtype's
precision, as float16 does: H2's report) and the residual reached, with the remedy that fits."""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.solve import block_cg_solve


def _system(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = X @ X.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64)
    return A.to(dtype), torch.randn(3, 12, generator=g, dtype=torch.float64).to(dtype)


def _solve(dtype, **kw):
    A, B = _system(dtype)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = block_cg_solve(A, B, **kw)
    # an rtol below the dtype's eps also warns up front (tests/test_s28_f3_cg_residual.py)
    return res, B, [str(w.message) for w in seen if "(rtol=...)" not in str(w.message)]


def test_a_spent_krylov_space_is_named_not_max_iter():
    """float16, rtol=1e-12: every row stops when _orth drops every new direction; the warning
    gives the steps run (num_iters) and the worst relative residual, and no max_iter."""
    res, B, texts = _solve(torch.float16, rtol=1e-12)
    assert not bool(res.converged.any()) and len(texts) == 1
    steps = int(res.num_iters.max())
    assert steps < 120 and bool((res.num_iters == steps).all())  # short of max_iter = 10 P
    worst = float((res.residual_norm / B.norm(dim=1)).max())  # as the solver forms it
    m = re.fullmatch(
        rf"block_cg_solve: 3 of 3 rows did not reach rtol=1e-12, atol=0: 3 stopped after "
        rf"{steps} steps, when no new search direction was independent at float16's precision "
        r"\(the Krylov space spent\), worst relative residual (\S+)\. Compute in float32 or "
        r"float64 \(rtol=1e-12, atol=0 is out of reach in float16\), or raise damping \(now 0\) "
        r"to improve the conditioning\.", texts[0])
    assert m is not None, texts[0]
    assert abs(float(m.group(1)) - worst) <= 1e-2 * worst  # printed to 3 digits


def test_max_iter_run_out_still_says_raise_max_iter():
    res, _, texts = _solve(torch.float64, rtol=1e-14, max_iter=2)
    assert (res.num_iters == 2).all() and len(texts) == 1
    assert re.fullmatch(r"block_cg_solve: 3 of 3 rows did not reach rtol=1e-14, atol=0: 3 ran "
                        r"max_iter=2 steps, worst relative residual \S+\. Raise max_iter, or "
                        r"raise damping \(now 0\) to improve the conditioning\.", texts[0])


def test_float16_influence_cg_warning_names_the_spent_space():
    """H2's case: influence(solver='cg') on a float16 MLP warned 'within max_iter=510'."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 4, dtype=torch.float64).half(), torch.randint(0, 3, (16,))
    torch.manual_seed(0)
    fm = functional_model(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
                          .half().eval(), F.cross_entropy)
    m = influence(fm, solver="cg", damping=0.1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (x[:3], y[:3]))
    texts = [str(w.message) for w in seen if "did not reach" in str(w.message)]
    assert len(texts) == 1 and "max_iter" not in texts[0], texts
    assert re.search(r"^if_cg: \d of 3 rows did not reach rtol=1e-06, atol=0: \d stopped after "
                     r"\d+ (to \d+ )?steps, when no new search direction was independent at "
                     r"float16's precision", texts[0]), texts[0]
