"""Influence's fast default: CG on the Gauss-Newton is block CG (no sketch); M='nystrom' sketches."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dattri_fn.solve.block_cg as block_cg
import dattri_fn.solve.nystrom as nystrom
from dattri_fn import functional_model, solvers
from dattri_fn._types import LinOp
from dattri_fn.attribute import influence

DT = torch.float64


def _problem(n_train: int = 40, n_test: int = 30):
    """An MLP with P = 314 > 200 (so r = 200 and the rule's threshold is 13 rows), float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 10)).to(DT).eval()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_train + n_test, 8, generator=g, dtype=DT)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return fm, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


@pytest.fixture
def sketches(monkeypatch):
    """Counts the Nystrom sketches influence builds (the function it imports at solve time)."""
    calls = []
    real = nystrom.nystrom_preconditioner

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(nystrom, "nystrom_preconditioner", counted)
    return calls


def _scores(method, fm, train, test):
    return method.score(fm.params, method.prepare(fm.params, train), train, test)


@pytest.fixture
def blocks(monkeypatch):
    """Counts the block CG groups influence solves (rows per group)."""
    calls = []
    real = block_cg._block

    def counted(matmat, precond, B, *args, **kwargs):
        calls.append(B.shape[0])
        return real(matmat, precond, B, *args, **kwargs)

    monkeypatch.setattr(block_cg, "_block", counted)
    return calls


def test_default_cg_is_block_cg_without_a_sketch(sketches, blocks):
    """M unset on the Gauss-Newton: every call's rows are solved as one block (k = 1, 12, 13, 30
    rows), and no Nystrom sketch is ever built."""
    fm, train, test = _problem()
    m = influence(fm, solver="cg", damping=0.05)
    state = m.prepare(fm.params, train)
    for k in (1, 12, 13, 30):
        m.score(fm.params, state, train, (test[0][:k], test[1][:k]))
    assert sketches == [] and blocks == [1, 12, 13, 30]


@pytest.mark.parametrize("how", ["M=None", "solvers.cg(M=None)", "fisher", "budget"])
def test_no_sketch_when_turned_off_or_not_the_gauss_newton(how, sketches, monkeypatch):
    """M=None (keyword or solver value), another curvature, or a small memory budget: no sketch
    for 30 right-hand sides."""
    fm, train, test = _problem()
    opts = {"M=None": dict(solver="cg", M=None), "solvers.cg(M=None)": dict(solver=solvers.cg(M=None)),
            "fisher": dict(solver="cg", curvature="fisher"), "budget": dict(solver="cg")}[how]
    if how == "budget":  # 5 * 200 * 314 * 8 bytes = 2.5 MB of sketch against a 1 MB budget
        monkeypatch.setenv("DATTRI_FN_MEMORY", "1M")
    _scores(influence(fm, damping=0.05, **opts), fm, train, test)
    assert sketches == []


def test_solver_value_without_m_is_automatic(sketches, blocks):
    """solvers.cg() leaves M unset ('auto'), so influence solves by block CG as with the keyword
    default."""
    fm, train, test = _problem()
    _scores(influence(fm, solver=solvers.cg(rtol=1e-8), damping=0.05), fm, train, test)
    assert sketches == [] and blocks == [30]
    assert "M" not in solvers.cg().options and solvers.cg(M=None).options["M"] is None


def test_default_equals_the_dense_inverse_and_is_deterministic(blocks):
    """The default (block CG) scores = g_i^T (G + damping I)^-1 g_j from the dense G (explicit)
    = plain CG (M=None) at rtol 1e-12, and two fresh methods agree bit for bit."""
    fm, train, test = _problem()
    opts = dict(damping=0.05, rtol=1e-12, max_iter=1000)
    got = _scores(influence(fm, solver="cg", **opts), fm, train, test)
    assert blocks == [30]
    again = _scores(influence(fm, solver="cg", **opts), fm, train, test)
    plain = _scores(influence(fm, solver="cg", M=None, **opts), fm, train, test)
    dense = _scores(influence(fm, solver="explicit", damping=0.05, curvature="gauss_newton"), fm,
                    train, test)
    assert torch.equal(got, again)
    scale = dense.abs().max()
    assert float((got - dense).abs().max() / scale) < 1e-9
    assert float((got - plain).abs().max() / scale) < 1e-9


def test_explicit_nystrom_is_built_at_the_first_solve_and_named(sketches):
    """M='nystrom' given: sketched at the first solve whatever k (one row here), errors named
    after the method; the scores match plain CG to its tolerance."""
    fm, train, test = _problem()
    opts = dict(solver="cg", damping=0.05, rtol=1e-12, max_iter=1000)
    one = (test[0][:1], test[1][:1])
    got = _scores(influence(fm, M="nystrom", **opts), fm, train, one)
    assert len(sketches) == 1 and sketches[0]["func"] == "if_cg"
    want = _scores(influence(fm, M=None, **opts), fm, train, one)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_sketch_errors_name_the_caller():
    """An operator giving NaN, or an indefinite one, is refused naming func(arg=...), not
    nystrom_preconditioner, when a caller builds the sketch for its user."""
    P = 6
    nan_op = LinOp(lambda V: V * float("nan"), P, DT, "cpu")
    with pytest.raises(ValueError, match=r"^if_cg\(curvature=...\): expected an operator "
                                         r"returning finite values"):
        nystrom.nystrom_preconditioner(nan_op, damping=0.1, func="if_cg", arg="curvature")
    neg = -torch.eye(P, dtype=DT)
    with pytest.raises(ValueError, match=r"^if_cg\(curvature=...\): expected a positive "
                                         r"semi-definite operator"):
        nystrom.nystrom_preconditioner(neg, damping=0.1, func="if_cg", arg="curvature")
    with pytest.raises(ValueError, match=r"^nystrom_preconditioner\(op=...\): expected an "
                                         r"operator returning finite values"):
        nystrom.nystrom_preconditioner(nan_op, damping=0.1)


def test_sketch_error_inside_influence_names_if_cg(monkeypatch):
    """A curvature whose sketch (M='nystrom') fails inside score (here: the sketch's product made
    NaN) raises if_cg(curvature=...), the user's entry point."""
    fm, train, test = _problem()
    real = nystrom.nystrom_preconditioner

    def poisoned(op, **kwargs):
        bad = LinOp(lambda V: op.matmat(V) * float("nan"), op.dim, op.dtype, op.device)
        return real(bad, **kwargs)

    monkeypatch.setattr(nystrom, "nystrom_preconditioner", poisoned)
    m = influence(fm, solver="cg", M="nystrom", damping=0.05)
    with pytest.raises(ValueError, match=r"^if_cg\(curvature=...\): expected an operator "
                                         r"returning finite values"):
        _scores(m, fm, train, test)


def test_block_cg_error_inside_influence_names_if_cg(monkeypatch):
    """The default's block CG meeting a non-finite product raises if_cg(curvature=...)."""
    fm, train, test = _problem()
    real = block_cg._block

    def poisoned(matmat, *args, **kwargs):
        return real(lambda V: matmat(V) * float("nan"), *args, **kwargs)

    monkeypatch.setattr(block_cg, "_block", poisoned)
    with pytest.raises(ValueError, match=r"^if_cg\(curvature=...\): expected an operator "
                                         r"returning finite values"):
        _scores(influence(fm, solver="cg", damping=0.05), fm, train, test)


def test_solver_value_applied_directly_is_plain_cg():
    """solvers.cg() (M 'auto') applied to an operator is plain CG: (A + d I)^-1 B to 1e-10."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(12, 12, generator=g, dtype=DT)
    A, B = X @ X.T, torch.randn(3, 12, generator=g, dtype=DT)
    want = torch.linalg.solve(A + 0.1 * torch.eye(12, dtype=DT), B.T).T
    torch.testing.assert_close(solvers.cg(rtol=1e-13)(A, 0.1)(B), want, rtol=1e-10, atol=1e-10)


def test_indefinite_gauss_newton_falls_back_to_plain_cg_with_a_warning():
    """A loss not convex in the outputs (sum cos(out - y)): its Gauss-Newton + damping is
    indefinite, block CG cannot apply; the default warns once, naming if_cg(curvature=...), and
    gives plain CG's scores (M=None) bit for bit."""
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT).eval()
    fm = functional_model(net, lambda out, y: torch.cos(out - y).sum(-1).mean())
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 4, generator=g, dtype=DT), torch.randn(30, 3, generator=g, dtype=DT)
    train, test = (x[:20], y[:20]), (x[20:], y[20:])
    with pytest.warns(UserWarning, match=r"^if_cg\(curvature=...\): the Gauss-Newton \+ damping is "
                                         r"not positive definite") as record:
        got = _scores(influence(fm, solver="cg", damping=1e-3), fm, train, test)
    assert len([w for w in record if "positive definite" in str(w.message)]) == 1
    assert torch.equal(got, _scores(influence(fm, solver="cg", M=None, damping=1e-3), fm, train, test))
