"""Contract checks of curvature operators (``check_linop``) and their inverse solvers (``check_inverse``)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._checks import check_int, check_positive
from .._types import LinOp, as_linop
from .assertions import _assert_close, _fail, _name, _randn, _rtol, default_rtol
from .matrices import MATRICES, indefinite_matrix, psd_matrix

__all__ = ["check_inverse", "check_linop"]


# -- operators ------------------------------------------------------------------------------------
MIXED_INPUT = ("follow", "refuse", "follow_or_refuse")
_NAMES_V = re.compile(r"^[\w.()\[\]=, +*-]*\(V=\.\.\.\): expected")


def check_linop(op: LinOp | Tensor, *, reference: Tensor | None = None, symmetric: bool = True,
                dense: bool = True, k: int = 3, seed: int = 0, rtol: float | None = None,
                mixed_input: str | None = "follow_or_refuse", name: str | None = None) -> None:
    """Check the LinOp contract of ``op`` on ``k`` seeded random rows.

    Properties: the output has the input's shape, dtype and device and is finite; rows are
    independent (``op(V)[i] == op(V[i:i+1])[0]``, ``op(v) == op(v[None])[0]``); linearity
    (``op(a U + b V) == a op(U) + b op(V)``); determinism (a second call is bitwise equal);
    symmetry ``<u, A v> == <A u, v>`` (unless ``symmetric=False``); ``op.dense()`` applied to
    the rows equals ``op`` and, with ``reference`` (a dense ``[P, P]``), equals it; rows in
    ANOTHER dtype than the operator's (float32 for a float64 operator and back; another device
    too when one is available) get the ``mixed_input`` contract:

    - ``"follow"``: the output has the input's dtype and device, and the values of ``op`` (to
      the lower precision's :func:`default_rtol`);
    - ``"refuse"``: a TypeError or ValueError naming ``V`` (``"<op>(V=...): expected ..."``);
    - ``"follow_or_refuse"`` (default): either; what fails is an output in another dtype than
      the input's (a silent promotion), or a raw torch error (a dtype mismatch deep in a
      matmul). :class:`~dattri_fn.LinOp` itself refuses rows of another dtype/device naming
      ``V`` (a dense tensor ``op`` is wrapped in one), so only an operator class that bypasses
      that check can fail it;
    - None: not checked.

    Args:
        op: a :class:`~dattri_fn.LinOp` or a dense ``[P, P]`` tensor.
        reference: the dense matrix ``op`` should equal, e.g. :func:`dense_hessian`.
        dense: check ``op.dense()`` (``P`` products; False for a large operator without a
            reference).
        rtol: relative to the largest magnitude compared (default :func:`default_rtol`).
        mixed_input: the contract for rows of another dtype/device (above).

    Raises:
        AssertionError: naming the violated property and the worst row/entry.
    """
    check = "check_linop"
    if mixed_input is not None and mixed_input not in MIXED_INPUT:
        raise ValueError(f"check_linop(mixed_input=...): expected None or one of "
                         f"{list(MIXED_INPUT)}, got {mixed_input!r}.")
    op = as_linop(op, name="check_linop(op=...)") if isinstance(op, Tensor) else op
    if not isinstance(op, LinOp):
        raise TypeError(f"check_linop(op=...): expected a LinOp or a [P, P] tensor, got "
                        f"{type(op).__name__}.")
    k = check_int(check, "k", k)
    seed = check_int(check, "seed", seed, minimum=0)
    rtol = _rtol(check, rtol)
    if reference is not None and (not isinstance(reference, Tensor)
                                  or tuple(reference.shape) != (op.dim, op.dim)):
        got = list(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
        raise ValueError(f"check_linop(reference=...): expected a dense [{op.dim}, {op.dim}] "
                         f"tensor, got {got}.")
    name = name or _name(op, "op")
    P, dtype, device = op.dim, op.dtype, op.device
    rtol = default_rtol(dtype) if rtol is None else rtol
    V = _randn(seed, k, P, dtype=dtype, device=device)
    U = _randn(seed + 1, k, P, dtype=dtype, device=device)
    out = op(V)
    if not isinstance(out, Tensor):
        _fail(check, name, "output is a Tensor", f"got {type(out).__name__}")
    if tuple(out.shape) != (k, P):
        _fail(check, name, "shape [k, P] -> [k, P]", f"got {list(out.shape)} for [{k}, {P}]")
    if out.dtype != V.dtype or out.device != V.device:
        _fail(check, name, "dtype/device follow the input",
              f"got {out.dtype} on {out.device} for {V.dtype} on {V.device}")
    if not bool(torch.isfinite(out).all()):
        _fail(check, name, "finite output", "NaN or inf for finite input")
    rows = torch.cat([op(V[i : i + 1]) for i in range(k)])
    _assert_close(check, name, "row batching op(V)[i] == op(V[i:i+1])[0]", rows, out, rtol)
    vec = op(V[0])
    if tuple(vec.shape) != (P,):
        _fail(check, name, "a [P] vector maps to a [P] vector", f"got {list(vec.shape)}")
    _assert_close(check, name, "vector form op(v) == op(v[None])[0]", vec[None], out[:1], rtol)
    a, b = 0.7, -1.3
    _assert_close(check, name, "linearity op(aU + bV) == a op(U) + b op(V)", op(a * U + b * V),
                  a * op(U) + b * out, rtol)
    again = op(V)
    if not torch.equal(again, out):
        diff = float((again - out).abs().max())
        _fail(check, name, "determinism (a second call is bitwise equal)", f"max |diff| {diff:.2e}")
    if symmetric:
        _assert_close(check, name, "symmetry <u_i, A v_j> == <A u_i, v_j>", U @ out.T,
                      op(U) @ V.T, rtol, labels=("u", "v"))
    if mixed_input is not None:
        other = torch.float32 if dtype == torch.float64 else torch.float64
        _check_mixed(name, op, V, out, mixed_input, dtype=other)
        if torch.cuda.is_available():
            _check_mixed(name, op, V, out, mixed_input,
                         device=torch.device("cpu" if device.type == "cuda" else "cuda"))
    if reference is not None or dense:
        D = op.dense()
        if tuple(D.shape) != (P, P):
            _fail(check, name, "dense() is [P, P]", f"got {list(D.shape)}")
        _assert_close(check, name, "dense() consistent: V dense()^T == op(V)", V @ D.T, out, rtol)
        if reference is not None:
            ref = reference.to(dtype=D.dtype, device=D.device)
            _assert_close(check, name, "equals the dense reference", D, ref, rtol)


def _check_mixed(name: str, op, V: Tensor, out: Tensor, mode: str, *, dtype=None,
                 device=None) -> None:
    """The ``mixed_input`` contract of :func:`check_linop` for ``V`` moved to ``dtype``/``device``."""
    check = "check_linop"
    W = V.to(dtype=dtype or V.dtype, device=device or V.device)
    what = f"{W.dtype} on {W.device} rows to an operator of {V.dtype} on {V.device}"
    prop = {"follow": "another input dtype/device: the output follows the input",
            "refuse": "another input dtype/device: refused naming V",
            "follow_or_refuse": "another input dtype/device: the output follows the input, or "
                                "a TypeError/ValueError naming V"}[mode]
    try:
        got = op(W)
    except (TypeError, ValueError) as err:
        if mode == "follow":
            _fail(check, name, prop, f"{what}: {type(err).__name__}: {err}")
        if not _NAMES_V.match(str(err)):
            _fail(check, name, prop, f"{what}: {type(err).__name__} not naming V: {err}")
        return
    except Exception as err:  # a raw torch error is what this property is about
        _fail(check, name, prop, f"{what}: raw {type(err).__name__}: {str(err).splitlines()[0]}")
    if mode == "refuse":
        _fail(check, name, prop, f"{what}: computed without an error")
    if not isinstance(got, Tensor) or got.dtype != W.dtype or got.device != W.device:
        desc = f"{got.dtype} on {got.device}" if isinstance(got, Tensor) else type(got).__name__
        _fail(check, name, prop, f"{what}: got {desc}")
    low = torch.float32 if torch.float32 in (W.dtype, V.dtype) else W.dtype
    _assert_close(check, name, f"{prop} (values)", got.to(out), out, default_rtol(low))


# -- inverse solvers ------------------------------------------------------------------------------
class _Outcome:
    """What a solver did on one system: its output, or the exception, and the warnings."""

    def __init__(self, solver, A, V, damping):
        self.x, self.error, self.warnings = None, None, []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.x = solver(A, damping=damping)(V)
            except Exception as e:  # a clear refusal is an allowed answer; recorded, not raised
                self.error = e
        self.warnings = [str(w.message) for w in caught]

    @property
    def said_so(self) -> bool:
        return self.error is not None or bool(self.warnings)


def _diagnose(name: str, where: str, diagnostics, op, V: Tensor, damping: float, x: Tensor,
              solved: Tensor, tol: float) -> None:
    """The ``diagnostics`` property of :func:`check_inverse` on one system; ``solved`` marks the
    rows the check found right."""
    check = "check_inverse"
    prop = f"diagnostics present ({where})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the solver's warnings were judged already
        try:
            report = diagnostics(op, damping, V)
        except Exception as err:
            _fail(check, name, prop, f"{type(err).__name__}: {err}")
    k = V.shape[0]
    conv = getattr(report, "converged", None)
    if not isinstance(conv, Tensor) or conv.dtype != torch.bool or tuple(conv.shape) != (k,):
        got = (f"{conv.dtype} of shape {list(conv.shape)}" if isinstance(conv, Tensor)
               else type(conv).__name__)
        _fail(check, name, prop, f"converged should be a bool tensor [{k}], got {got}")
    claimed = conv
    negative = getattr(report, "negative_curvature", None)
    if isinstance(negative, Tensor) and negative.shape == conv.shape:
        claimed = conv & ~negative.to(torch.bool)
    rx = getattr(report, "x", None)
    if rx is not None:
        _assert_close(check, name, f"diagnostics describe the output (their x == the solver's, "
                      f"{where})", rx, x, max(tol, default_rtol(x.dtype)))
    wrong = claimed.cpu() & ~solved.cpu()
    if bool(wrong.any()):
        i = int(wrong.nonzero()[0])
        _fail(check, name, f"diagnostics never claim a wrong row converged ({where})",
              f"row {i} reported converged but not solved within rtol {tol:.0e}")


def _opaque(A: Tensor) -> LinOp:
    """``A`` behind a LinOp that only multiplies (no dense form the solver could read)."""
    return LinOp(lambda V: V @ A.T, A.shape[0], A.dtype, A.device, name="opaque")


def _solve_ref(A: Tensor, V: Tensor, damping: float) -> Tensor:
    A64 = A.to(torch.float64)
    M = A64 + damping * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    return torch.linalg.solve(M, V.to(torch.float64).T).T


def _row_relative_error(x: Tensor, want: Tensor) -> Tensor:
    return (x.to(torch.float64) - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)


def check_inverse(solver: Callable[..., LinOp], *, dim: int = 6, damping: float = 0.1,
                  k: int = 3, seed: int = 0, rtol: float = 1e-6, cond: float = 100.0,
                  kinds: Sequence[str] = ("spd", "low_rank_diag"),
                  dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
                  indefinite: bool = True, singular: bool = True, device="cpu",
                  diagnostics: Callable | None = None, name: str | None = None) -> None:
    """Check ``solver(op, damping=damping)`` returns ``V -> (op + damping I)^-1 V``.

    Properties, on seeded random operators (:data:`MATRICES`) given both as a dense tensor and
    as a LinOp that only multiplies:

    - accuracy: every row within ``rtol`` (relative, 2-norm) of ``torch.linalg.solve`` on
      ``kinds`` (positive definite, condition number ``cond``) in float64;
    - dtype/device follow the operator, rows are independent (to ``2 rtol``), a ``[P]``
      vector works, two solvers built alike give bitwise-equal outputs (``dtypes``; float32
      to ``1e-3``);
    - never silent: on an indefinite operator (``indefinite``: ``A + damping I`` has
      eigenvalues of both signs, all ``|lambda| >= 1``) and on a singular PSD one with
      ``damping = 0`` (``singular``) the solver is accurate (the solve, or a least-squares
      solution), or warns, or raises — a wrong answer without a word fails;
    - diagnostics (with ``diagnostics``, the solver's own report, e.g. CG's
      :class:`~dattri_fn.solve.CGResult`): present (a ``converged`` bool per row; an ``x``
      equal to the solver's output), and never claiming a wrong row: on every system above,
      a row reported ``converged`` (and not ``negative_curvature``) must be solved (within
      ``rtol``; on the singular one, a least-squares solution). Rows the report flags count as
      said, so a solver whose diagnostics flag its failures need not warn.

    Args:
        solver: ``solver(op, damping=...) -> LinOp``: a :mod:`dattri_fn.solvers` value, an
            ``ihvp_*`` factory, or your own function.
        rtol: the accuracy you claim for the solver (default ``1e-6``).
        device: where the operators and right-hand sides live.
        diagnostics: ``(op, damping, V) -> report`` with ``converged`` (bool ``[k]``) and
            optionally ``negative_curvature`` (bool ``[k]``) and ``x`` (``[k, P]``), e.g.
            ``lambda op, damping, V: cg_solve(op, V, damping=damping, rtol=1e-12)``.

    Raises:
        AssertionError: naming the violated property, the operator kind and the worst row.
    """
    check = "check_inverse"
    if diagnostics is not None and not callable(diagnostics):
        raise TypeError(f"check_inverse(diagnostics=...): expected None or a callable (op, "
                        f"damping, V) -> report, got {type(diagnostics).__name__}.")
    name = name or _name(solver, "solver")
    if not callable(solver):
        raise TypeError(f"check_inverse(solver=...): expected a callable (op, damping=...) -> "
                        f"LinOp, got {type(solver).__name__}.")
    dim, k = check_int(check, "dim", dim), check_int(check, "k", k)
    seed = check_int(check, "seed", seed, minimum=0)
    damping = check_positive(check, "damping", damping, allow_zero=True)
    rtol = check_positive(check, "rtol", rtol)
    cond = check_positive(check, "cond", cond)
    if cond < 1:
        raise ValueError(f"check_inverse(cond=...): expected a condition number >= 1, got {cond!r}.")
    if isinstance(kinds, str) or not all(kind in MATRICES for kind in kinds):
        raise ValueError(f"check_inverse(kinds=...): expected a sequence of names in "
                         f"{list(MATRICES)}, got {kinds!r}.")
    if isinstance(dtypes, torch.dtype) or not dtypes or not all(
            isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        raise ValueError(f"check_inverse(dtypes=...): expected a non-empty sequence of floating "
                         f"dtypes, got {dtypes!r}.")
    for dtype in dtypes:
        tol = rtol if dtype == torch.float64 else max(rtol, 1e-3)
        for kind in kinds:
            make = MATRICES[kind]
            A = make(dim, seed, cond=cond, dtype=dtype, device=device) if kind in ("spd", "psd") \
                else make(dim, seed, dtype=dtype, device=device)
            V = _randn(seed + 7, k, dim, dtype=dtype, device=device)
            want = _solve_ref(A, V, damping)
            for form, op in (("dense", A), ("LinOp", _opaque(A))):
                where = f"{kind} {form} {dtype}"
                inv = solver(op, damping=damping)
                x = inv(V)
                if not isinstance(x, Tensor) or tuple(x.shape) != (k, dim):
                    got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
                    _fail(check, name, f"shape [k, P] -> [k, P] ({where})", f"got {got}")
                if x.dtype != dtype or x.device != V.device:
                    _fail(check, name, f"dtype/device follow the input ({where})",
                          f"got {x.dtype} on {x.device}")
                err = _row_relative_error(x, want)
                if diagnostics is not None:
                    _diagnose(name, where, diagnostics, op, V, damping, x,
                              torch.isfinite(err) & (err <= tol), tol)
                if not bool(torch.isfinite(err).all()) or float(err.max()) > tol:
                    i = int(torch.nan_to_num(err, nan=math.inf).argmax())
                    _fail(check, name, f"(A + damping I)^-1 V == linalg.solve within rtol "
                          f"{tol:.0e} ({where}, cond {cond:g}, damping {damping:g})",
                          f"worst row {i}: relative error {float(err[i]):.2e}")
                if dtype == dtypes[0] and form == "dense":
                    rows = torch.cat([inv(V[i : i + 1]) for i in range(k)])
                    # Each row is within tol of the solve, so within 2 tol of each other.
                    _assert_close(check, name, f"row batching ({where})", rows, x,
                                  max(default_rtol(dtype), 2 * tol))
                    vec = inv(V[0])
                    if tuple(vec.shape) != (dim,):
                        _fail(check, name, "a [P] vector maps to a [P] vector",
                              f"got {list(vec.shape)}")
                    again = solver(op, damping=damping)(V)
                    if not torch.equal(again, x):
                        _fail(check, name, f"determinism: built alike, bitwise equal ({where})",
                              f"max |diff| {float((again - x).abs().max()):.2e}")
    if indefinite:
        # Scaled by 1 + damping: A + damping I keeps eigenvalues of both signs, |lambda| >= 1.
        A = (1 + damping) * indefinite_matrix(dim, seed, cond=cond, device=device)
        V = _randn(seed + 11, k, dim, device=device)
        res = _Outcome(solver, A, V, damping)
        if res.x is not None and diagnostics is not None:
            err = _row_relative_error(res.x, _solve_ref(A, V, damping))
            # every unsolved row flagged by the report (else _diagnose fails): said so
            _diagnose(name, "indefinite", diagnostics, A, V, damping, res.x,
                      torch.isfinite(err) & (err <= rtol), rtol)
        elif not res.said_so:
            err = _row_relative_error(res.x, _solve_ref(A, V, damping))
            if not bool(torch.isfinite(err).all()) or float(err.max()) > rtol:
                i = int(torch.nan_to_num(err, nan=math.inf).argmax())
                _fail(check, name, "never silent on an indefinite operator (accurate, or a "
                      "warning, or an error)",
                      f"no warning and no error, row {i} off by relative {float(err[i]):.2e}")
    if singular and dim >= 2:
        A = psd_matrix(dim, seed, rank=dim // 2, cond=cond, device=device)
        W = _randn(seed + 13, k, dim, device=device)
        for label, V in (("a right-hand side in its range", W @ A.T), ("any right-hand side", W)):
            res = _Outcome(solver, A, V, 0.0)
            if res.x is None or (res.said_so and diagnostics is None):
                continue
            x = res.x.to(torch.float64)
            resid = (x @ A.T - V).norm(dim=1)
            best = (torch.linalg.lstsq(A, V.T).solution.T @ A.T - V).norm(dim=1)
            bad = ~torch.isfinite(resid) | (resid > best + rtol * V.norm(dim=1))
            if diagnostics is not None:
                _diagnose(name, f"singular, {label}", diagnostics, A, V, 0.0, res.x, ~bad, rtol)
                continue
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                _fail(check, name, f"never silent on a singular PSD operator, damping 0, "
                      f"{label} (a least-squares solution, or a warning, or an error)",
                      f"no warning and no error, row {i}: |A x - v| = {float(resid[i]):.3g} "
                      f"against the least-squares {float(best[i]):.3g}")
