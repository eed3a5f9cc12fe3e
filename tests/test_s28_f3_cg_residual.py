"""Stop 28, engineer F3 (review RF M2): half-precision CG is judged on its TRUE residual
``||b - (A + damping I) x||`` (the recursive one met rtol = 1e-6 at a true 1e-3..2e-2, or read 0
in float16), an rtol below the dtype's eps warns up front naming the call, and plain CG's
early stop at a breakdown says so instead of "within max_iter"."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.solve import block_cg_solve, cg_solve, ihvp_block_cg


def _system(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = X @ X.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64)
    B = torch.randn(6, 12, generator=g, dtype=torch.float64)
    B[3:] *= torch.logspace(0, 2, 12, dtype=torch.float64)
    return A.to(dtype), B.to(dtype)


def _run(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [(w.filename, str(w.message)) for w in seen]


SOLVES = [(block_cg_solve, {"block_size": 3}), (cg_solve, {})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solve,kw", SOLVES, ids=["block_cg_solve", "cg_solve"])
def test_half_precision_is_judged_on_the_true_residual(solve, kw, dtype):
    """Before: every row converged=True, no warning, at a true relative residual of 1e-3..4e-2."""
    A, B = _system(dtype)
    res, seen = _run(solve, A, B, **kw)
    true = (B.double() - res.x.double() @ A.double()).norm(dim=1)
    assert not bool(res.converged.any())
    # residual_norm is the true residual (formed in the dtype's products), not the recursive one
    assert torch.allclose(res.residual_norm.double(), true, rtol=0.2)
    name, dt = solve.__name__, str(dtype)[6:]
    texts = [t for f, t in seen]
    assert all(f == __file__ for f, _ in seen), seen  # at the user's line
    assert len(texts) == 2, texts
    assert texts[0].startswith(f"{name}(rtol=...): expected rtol >= ") and f"what {dt} resolves, " \
        "got rtol=1e-06 with atol=0" in texts[0], texts[0]
    assert re.match(rf"{name}: 6 of 6 rows did not reach rtol=1e-06, atol=0: 6 met it on the "
                    rf"recursively updated residual after \d+ (to \d+ )?steps, not on the true "
                    rf"residual .*\({dt} rounding\), worst relative residual (\S+)\. Compute in "
                    rf"float32 or float64", texts[1]), texts[1]
    assert "max_iter" not in texts[1]


@pytest.mark.parametrize("solve,kw", SOLVES, ids=["block_cg_solve", "cg_solve"])
def test_float16_at_a_reachable_rtol_converges_without_a_warning(solve, kw):
    A, B = _system(torch.float16)
    res, seen = _run(solve, A, B, rtol=3e-2, **kw)
    assert bool(res.converged.all()) and not seen, seen


@pytest.mark.parametrize("solve,kw", SOLVES, ids=["block_cg_solve", "cg_solve"])
def test_float32_below_eps_warns_up_front_and_keeps_its_answer(solve, kw):
    """float32 keeps the recursive test (no extra product, the same bits); rtol below eps
    says so once, before the solve."""
    A, B = _system(torch.float32)
    res, seen = _run(solve, A, B, rtol=1e-12, **kw)
    quiet, none = _run(solve, A, B, rtol=1e-6, **kw)
    assert bool(res.converged.all()) and not none
    assert [t for _, t in seen] == [
        f"{solve.__name__}(rtol=...): expected rtol >= 1.19e-07, what float32 resolves, got "
        "rtol=1e-12 with atol=0; a row's recursively updated residual can meet it while its "
        "true residual ||b - (A + damping I) x|| stays above it. Compute in float64, or pass "
        "rtol >= 1.19e-07."]


def test_ihvp_block_cg_warns_once_at_construction_naming_its_caller():
    A, B = _system(torch.bfloat16)
    op, seen = _run(ihvp_block_cg, A, func="if_cg", arg="curvature")
    assert len(seen) == 1 and seen[0][1].startswith("if_cg(rtol=...): expected rtol >= 0.00781, "
                                                    "what bfloat16 resolves"), seen
    _, seen = _run(op, B)
    assert len(seen) == 1 and seen[0][1].startswith("if_cg: 6 of 6 rows did not reach")


def test_cg_breakdown_is_named_not_max_iter():
    """negative_curvature='continue' stops a row only at p^T A p = 0: diag(1, -1) on (1, 1)
    breaks down at the first step; the warning said 'within max_iter=20'."""
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    res, seen = _run(cg_solve, A, torch.ones(1, 2, dtype=torch.float64),
                     negative_curvature="continue")
    assert int(res.num_iters) == 0 and not bool(res.converged.any())
    assert [t for _, t in seen] == [
        "cg_solve: 1 of 1 rows did not reach rtol=1e-06, atol=0: 1 stopped after 0 steps at a "
        "breakdown, p^T (A + damping*I) p = 0, worst relative residual 1. Use ihvp_minres, or "
        "raise damping (now 0) to improve the conditioning."]


def test_float16_influence_flags_every_row_its_true_residual_misses():
    """H2's float16 MLP: one of the three test rows read converged (no word of it) at a true
    relative residual of 3.4e-4 > rtol = 1e-6."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 4, dtype=torch.float64).half(), torch.randint(0, 3, (16,))
    torch.manual_seed(0)
    fm = functional_model(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
                          .half().eval(), F.cross_entropy)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m = influence(fm, solver="cg", damping=0.1)
        m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (x[:3], y[:3]))
    texts = [str(w.message) for w in seen]
    assert sum(t.startswith("if_cg(rtol=...): expected rtol >= 0.000977, what float16 "
                            "resolves") for t in texts) == 1, texts
    late = [t for t in texts if "did not reach" in t]
    assert len(late) == 1 and late[0].startswith("if_cg: 3 of 3 rows did not reach"), late
