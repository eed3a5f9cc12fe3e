"""Contract checks: one call each, raising ``AssertionError`` naming the property and worst case.

    check_linop(op)                 a curvature operator ``[k, P] -> [k, P]``
    check_inverse(solver)           ``solver(op, damping=...) -> V -> (op + damping I)^-1 V``
    check_projector(make)           ``make(dim, proj_dim, seed) -> X -> X R``, ``[B, P] -> [B, d]``
    check_method(method, problem)   an attribution ``Method(prepare, score, self_score, name)``

Every message reads ``"<check>(<name>): <property> violated: <worst case>"``, so a failing
property test says what broke and where without a debugger. Tolerances are relative to the
magnitude of the compared values and are arguments with stated defaults; ``default_rtol``
gives the one used when none is passed: 1e-10 in float64, 1e-4 in float32, 1e-2 in 16 bits.

The checks live in one module per kind of primitive: :mod:`.operator_checks` (``check_linop``,
``check_inverse``), :mod:`.projector_checks` (``check_projector``, ``jl_d_eff``),
:mod:`.method_checks` (``check_method``) and :mod:`.assertions` (``default_rtol`` and the shared
failure message); this module gathers them.
"""

from .assertions import default_rtol
from .method_checks import MethodCheck, check_method
from .operator_checks import MIXED_INPUT, check_inverse, check_linop
from .projector_checks import check_projector, jl_d_eff

__all__ = ["MIXED_INPUT", "MethodCheck", "check_inverse", "check_linop", "check_method", "check_projector",
           "default_rtol", "jl_d_eff"]
