"""Every contract of dattri_fn.testing over the whole registry of the library's own primitives.

The registry (:mod:`dattri_fn.testing.registry`) lists each solver, operator, projector and
method with the settings it is checked under; a new primitive joins the suite by joining it.
"""

import pytest

from dattri_fn.testing import (
    check_inverse,
    check_linop,
    check_method,
    check_projector,
    conv_net,
    exact_loo,
    linear_regression,
    logistic_regression,
    mlp,
    ridge_regression,
    sequence_model,
)
from dattri_fn.testing.registry import (
    METHODS,
    MIXED_INPUT_DEFECTS,
    OPERATORS,
    PROJECTORS,
    SOLVERS,
)

# One instance per kind, small enough that each check takes about a second.
PROBLEMS = {
    "ridge": lambda d: ridge_regression(n=24, dim=2, seed=1, l2=0.05, cond=10.0, device=d),
    "linear": lambda d: linear_regression(n=24, dim=2, seed=2, fit=True, cond=10.0, device=d),
    "logistic": lambda d: logistic_regression(n=27, dim=2, classes=3, seed=3, l2=0.05, fit=True,
                                              cond=10.0, device=d),
    "mlp": lambda d: mlp(n=8, seed=4, device=d),
    "conv": lambda d: conv_net(n=6, size=4, seed=5, device=d),
    "sequence": lambda d: sequence_model(n=6, length=3, seed=6, device=d),
}
_CACHE: dict = {}


def _problem(name, device):
    """Problems and their exact LOO are built once per session (LOO refits n times)."""
    if (name, device) not in _CACHE:
        p = PROBLEMS[name](device)
        _CACHE[name, device] = (p, exact_loo(p) if p.fitted else None)
    return _CACHE[name, device]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_contract(device, name):
    """check_inverse: (A + damping I)^-1 V == linalg.solve within the entry's rtol, dtype/device,
    rows, vectors, determinism; never silent on indefinite or singular operators."""
    entry = SOLVERS[name]
    check_inverse(entry.build(), name=name, device=device, **entry.options)


@pytest.mark.parametrize("name,problem", [(n, p) for n in sorted(OPERATORS) for p in sorted(PROBLEMS)
                                          if OPERATORS[n].kinds is None or p in OPERATORS[n].kinds])
def test_operator_contract(device, name, problem):
    """check_linop: rows, linearity, determinism, symmetry, dense() == the dense reference."""
    p, _ = _problem(problem, device)
    assert OPERATORS[name].applies(p)
    op, reference = OPERATORS[name].build(p)
    check_linop(op, reference=reference, name=name, **OPERATORS[name].options)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                            reason=MIXED_INPUT_DEFECTS[n]))
    if n in MIXED_INPUT_DEFECTS else n for n in sorted(OPERATORS)])
def test_operator_mixed_input_contract(device, name):
    """check_linop(mixed_input="follow_or_refuse"): float32 rows to a float64 operator are
    computed in float32 or refused naming V. The known defects (registry.MIXED_INPUT_DEFECTS)
    are expected to fail; a fixed one passes unexpectedly and must leave that list."""
    p, _ = _problem("mlp", device)
    op, _ = OPERATORS[name].build(p)
    options = {k: v for k, v in OPERATORS[name].options.items() if k != "mixed_input"}
    check_linop(op, name=name, dense=False, mixed_input="follow_or_refuse", **options)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_projector_contract(device, name):
    """check_projector: shapes, dtype, rows, linearity, seeds, E[R R^T] = I, the JL bound of the kind."""
    entry = PROJECTORS[name]
    check_projector(entry.build(), name=name, device=device, **entry.options)


# Matrix-free solvers run one HVP per iteration and ten prepare/score calls per check: two
# convex problems with exact LOO and one non-convex keep them within seconds.
MATRIX_FREE = {"if_cg", "if_minres"}
CASES = [(m, p) for m in sorted(METHODS) for p in sorted(PROBLEMS)
         if (METHODS[m].kinds is None or p in METHODS[m].kinds)
         and (m not in MATRIX_FREE or p in ("ridge", "logistic", "mlp"))]


@pytest.mark.parametrize("name,problem", CASES)
def test_method_contract(device, name, problem, tmp_path):
    """check_method: self_score == diag, batching/list/DataLoader invariance, top_k == topk,
    a duplicated point scores alike and positively, agreement with exact LOO on convex problems,
    and score/self_score from a feature store == from the data (methods that take stores)."""
    p, loo = _problem(problem, device)
    assert METHODS[name].applies(p)
    method = METHODS[name].build(p)
    options = dict(METHODS[name].options)
    store = tmp_path if options.pop("store", True) else None
    check_method(method, p, loo=loo, name=name, store=store, **options)


def test_registry_covers_the_library():
    """Every ihvp factory, projector kind, influence solver and exported method factory has an
    entry: a new primitive cannot ship outside the contracts."""
    from dattri_fn import attribute, solve
    from dattri_fn.attribute.influence import SOLVERS as INFLUENCE_SOLVERS
    from dattri_fn.transforms.project import KINDS

    assert set(solve.SOLVERS) | {"lissa"} <= set(SOLVERS)
    kinds = {getattr(e.build(), "__name__", "").split("(")[0] for e in PROJECTORS.values()}
    assert set(KINDS) <= kinds
    assert all(f"if_{s}" in METHODS or f"if_{s}_fm" in METHODS for s in INFLUENCE_SOLVERS)
    factories = {"grad_cos", "grad_dot", "tracin", "trak", "representer"}
    assert factories <= set(attribute.__all__) and factories <= set(METHODS)
    assert all(e.kinds is None or set(e.kinds) <= set(PROBLEMS)
               for e in (*OPERATORS.values(), *METHODS.values()))
