"""Core types and the shape glossary.

Shapes used in every docstring:
    P        number of (selected) parameters, the length of a raveled params dict
    B        examples in one batch
    k        right-hand sides (rows) handled at once by a linear operator
    d        projection dimension (``proj_dim``)
    n_train  training examples; n_test  test examples
    C        checkpoints (or independently trained models) in an ensemble

Contracts:
    Params   ``dict[str, Tensor]`` ordered like ``named_parameters()``, detached; the order
             defines the ravel order.
    Batch    a Tensor, a tuple/list of Tensors or a dict of Tensors, all sharing the leading
             dimension ``B``. Never mutated. Integer labels are allowed. Data arguments take
             one Batch or a list of them; a list of tensors of ONE shape and dtype reads both
             ways and is refused: a tuple ``(x, y)`` is one batch, ``[(x1,), (x2,)]`` shards.
             A DataLoader must give its dataset's rows in order, all of them (no shuffle, no
             ``drop_last`` that drops rows) wherever rows reach the output; a curvature takes any,
             but a seeded draw per row (``fisher="true"``, a dropout ``seed=``) gives the same
             result on every call only with the rows in a fixed order.
    Example  one element of a Batch, the leading dimension removed.
    Loss     ``loss(params, example) -> Tensor[]``: the loss of ONE example. Batch means are
             derived with ``vmap``.
    LinOp    a linear map ``Tensor[k, P] -> Tensor[k, P]`` (a ``[P]`` vector is also accepted),
             pure and batched over rows. A dense ``[P, P]`` tensor is accepted wherever a LinOp
             is (see :func:`as_linop`).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import Tensor

from ._checks import all_finite, check_dense_fits, check_int, check_rows_like

Params = dict[str, Tensor]
Batch = Union[Tensor, tuple, list, Mapping[str, Tensor]]
Example = Any
Loss = Callable[[Params, Example], Tensor]


class LinOp:
    """A symmetric-or-not linear operator ``V -> A V`` on rows.  # [k, P] -> [k, P]

    Wraps a row-batched ``matmat`` with the facts solvers need at construction time
    (``dim``, ``dtype``, ``device``). Calling it with a ``[P]`` vector returns a ``[P]`` vector.
    ``inverse``: for an operator with a closed-form inverse (K-FAC, EK-FAC), ``damping ->
    (A + damping I)^-1`` as a LinOp; :func:`~dattri_fn.solve.ihvp_explicit` then uses it
    instead of a dense factorisation. Sums and multiples of operators drop it.
    """

    __slots__ = ("matmat", "dim", "dtype", "device", "name", "inverse")
    #: Rows of another dtype are refused (naming ``V``) unless a subclass computes in its rows'
    #: dtype (K-FAC/EK-FAC with reduced-precision factors); the device must always match.
    follows_dtype = False

    def __init__(
        self,
        matmat: Callable[[Tensor], Tensor],
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        name: str = "LinOp",
        inverse: Callable[[float], LinOp] | None = None,
    ):
        self.matmat = matmat
        self.dim = _dim("LinOp", dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.name = name
        self.inverse = inverse

    def __call__(self, V: Tensor) -> Tensor:
        if not isinstance(V, Tensor):
            raise TypeError(f"{self.name}(V=...): expected a Tensor, got {type(V).__name__}.")
        if V.ndim == 1:
            return self.__call__(V.unsqueeze(0)).squeeze(0)
        if V.ndim != 2 or V.shape[1] != self.dim:
            raise ValueError(
                f"{self.name}(V=...): expected shape [k, {self.dim}] or [{self.dim}], "
                f"got {list(V.shape)}."
            )
        check_rows_like(self.name, V, None if self.follows_dtype else self.dtype, self.device)
        # The one finite check of a call; the matmat (and solver loops calling it) stay bare.
        # Under a torch.func transform values cannot be read, so it is skipped there.
        if (V.is_floating_point() and torch._C._functorch.maybe_current_level() is None
                and not all_finite(V)):
            raise ValueError(f"{self.name}(V=...): expected finite values, got NaN or inf.")
        return self.matmat(V)

    def dense(self, chunk_size: int | None = 256) -> Tensor:
        """Return the operator as a dense matrix ``A`` with ``A @ v == op(v)``.  # [P, P]

        Applied to ``chunk_size`` unit rows at a time (None = all ``P`` at once): a vmapped
        curvature holds per-row activations, so one ``[P, P]`` call can need many times the
        memory of the result.
        """
        P = self.dim
        check_dense_fits(f"{self.name}.dense", P, self.dtype, self.device)
        step = P if chunk_size is None else max(1, int(chunk_size))
        out = torch.empty(P, P, dtype=self.dtype, device=self.device)
        for start in range(0, P, step):
            stop = min(P, start + step)
            rows = torch.zeros(stop - start, P, dtype=self.dtype, device=self.device)
            rows[:, start:stop].fill_diagonal_(1)
            out[start:stop] = self.matmat(rows)
        return out.T

    def __repr__(self) -> str:
        return f"{self.name}(dim={self.dim}, dtype={self.dtype}, device={self.device})"

    def __add__(self, other) -> LinOp:
        """``A + B`` for a LinOp or ``[P, P]`` tensor ``B``; ``A + c`` is ``A + c I``.  # [k, P] -> [k, P]

        ``damping`` as a value: ``ihvp_cg(C + 0.1)`` solves the same system as
        ``ihvp_cg(C, damping=0.1)``.
        """
        c = _scalar(other, "LinOp.__add__", "other")
        if isinstance(c, Tensor):  # a 0-d tensor in autograd: its graph is kept
            return LinOp(lambda V: self.matmat(V) + c * V, self.dim, self.dtype, self.device,
                         name=f"({self.name} + c I)")
        if c is not None:
            return LinOp(lambda V: self.matmat(V).add(V, alpha=c), self.dim, self.dtype,
                         self.device, name=f"({self.name} + {c:g} I)")
        B = _operand("LinOp.__add__", other, self)
        return LinOp(lambda V: self.matmat(V) + B.matmat(V), self.dim, self.dtype, self.device,
                     name=f"({self.name} + {B.name})")

    __radd__ = __add__

    def __mul__(self, c) -> LinOp:
        """``c A`` for a real number or 0-d tensor ``c``.  # [k, P] -> [k, P]"""
        s = _scalar(c, "LinOp.__mul__", "c")
        if s is None and isinstance(c, Tensor):
            raise TypeError(f"LinOp.__mul__(c=...): expected a real number or a 0-d tensor, got "
                            f"{_kind(c)}. Apply the operator with op @ X (columns [P, m]) or "
                            f"op(V) (rows [k, P]).")
        if s is None:
            return NotImplemented
        c = s
        return LinOp(lambda V: self.matmat(V).mul(c), self.dim, self.dtype, self.device,
                     name=f"{c:g} {self.name}" if isinstance(c, float) else f"c {self.name}")

    __rmul__ = __mul__

    def __truediv__(self, c) -> LinOp:
        """``A / c`` = ``(1/c) A`` for a real number or 0-d tensor ``c != 0``.  # [k, P] -> [k, P]"""
        s = _scalar(c, "LinOp.__truediv__", "c")
        if s is None:
            raise TypeError(f"LinOp.__truediv__(c=...): expected a real number or a 0-d tensor, "
                            f"got {_kind(c)}. An inverse is a solver's: ihvp_cg(op, ...) or "
                            f"solvers.*(op).")
        if isinstance(s, float) and s == 0:
            raise ZeroDivisionError("LinOp.__truediv__(c=...): expected c != 0, got 0.")
        return self * (1.0 / s)

    def __matmul__(self, X) -> LinOp | Tensor:
        """``A @ X``: ``A x`` for ``x`` ``[P]``, ``A X`` for columns ``X`` ``[P, m]``, and the
        composition ``V -> A(B V)`` for a LinOp ``B``.  # [P] / [P, m] -> same; LinOp -> LinOp"""
        if isinstance(X, LinOp):
            B = _operand("LinOp.__matmul__", X, self)
            return LinOp(lambda V: self.matmat(B.matmat(V)), self.dim, self.dtype, self.device,
                         name=f"{self.name} @ {B.name}")
        if not isinstance(X, Tensor):
            return NotImplemented
        if X.ndim == 1:
            return self(X)
        if X.ndim != 2 or X.shape[0] != self.dim:
            raise ValueError(f"LinOp.__matmul__(X=...): expected [{self.dim}] or columns "
                             f"[{self.dim}, m] (op(V) takes rows [k, {self.dim}]), got "
                             f"{list(X.shape)}.")
        return self(X.T.contiguous()).T

    def __rmatmul__(self, X):
        raise TypeError(f"LinOp.__rmatmul__(X=...): X @ op needs A's transpose, which a LinOp "
                        f"does not carry; got {_kind(X)} @ {self.name}. Use op @ X (columns), "
                        f"or op(V) for rows: V A^T, which is V A for a symmetric A (a curvature).")

    def __neg__(self) -> LinOp:
        return self * -1.0

    def __sub__(self, other) -> LinOp:
        c = _scalar(other, "LinOp.__sub__", "other")
        if c is not None:
            return self + (-c)
        return self + (-_operand("LinOp.__sub__", other, self))

    @staticmethod
    def identity(dim: int, dtype: torch.dtype = torch.float32, device="cpu") -> LinOp:
        """The identity ``V -> V`` on ``P = dim``.  # [k, P] -> [k, P]"""
        return LinOp(lambda V: V, dim, dtype, device, name="I")


def _scalar(c, func: str, arg: str) -> float | Tensor | None:
    """``c`` as a multiplier: a finite float for a real number or a 0-d tensor outside autograd,
    the 0-d tensor itself in autograd (its graph kept; its value is not read, so a NaN, an inf
    or a zero divisor there is not caught), None for anything else. NaN/inf raise, naming
    ``func(arg=...)``: the operator would give NaN rows on every later product."""
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        s = float(c)
    elif isinstance(c, Tensor) and c.ndim == 0 and not c.is_complex() and c.dtype != torch.bool:
        if c.requires_grad:
            return c
        s = float(c)
    else:
        return None
    if not math.isfinite(s):
        raise ValueError(f"{func}({arg}=...): expected a finite number, got {s}.")
    return s


def _kind(x) -> str:
    return f"a tensor of shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _operand(func: str, other, like: LinOp) -> LinOp:
    """``other`` (a LinOp or a square tensor) as a LinOp of ``like``'s size and dtype, or raise."""
    if not isinstance(other, (LinOp, Tensor)):
        raise TypeError(f"{func}(other=...): expected a LinOp, a [P, P] tensor or a real "
                        f"number, got {type(other).__name__}.")
    B = as_linop(other, name="other")
    if B.dim != like.dim or B.dtype != like.dtype:
        raise ValueError(f"{func}(other=...): expected an operator of size {like.dim} and "
                         f"dtype {like.dtype}, got size {B.dim} and {B.dtype}.")
    return B


def as_linop(op: LinOp | Tensor | Callable, *, dim: int | None = None,
             dtype: torch.dtype | None = None, device=None, name: str = "op") -> LinOp:
    """Return ``op`` as a :class:`LinOp`; a dense ``[P, P]`` matrix ``A`` maps ``V -> V A^T``.

    A bare callable needs ``dim`` (and optionally ``dtype``/``device``, default float32/cpu).
    K-FAC/EK-FAC factors (``KFACFactors``/``EKFACFactors``) become
    :func:`~dattri_fn.operators.kfac.kfac_operator` of them: the factored Fisher, carrying its
    closed-form ``inverse``. These are the curvature values every ``ihvp_*`` takes first.
    """
    if isinstance(op, LinOp):
        return op
    if isinstance(op, tuple):  # a NamedTuple of factors; imported here: operators import us
        from .operators.kfac import EKFACFactors, KFACFactors, kfac_operator

        if isinstance(op, (KFACFactors, EKFACFactors)):
            return kfac_operator(op)
    if isinstance(op, Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1] or op.shape[0] == 0:
            raise ValueError(f"{name}: expected a square [P, P] matrix (P >= 1), got shape {list(op.shape)}.")
        A = op
        return LinOp(lambda V: V @ A.T, A.shape[0], A.dtype, A.device, name=name)
    if callable(op):
        if dim is None:
            raise ValueError(
                f"{name}: a bare callable needs dim=P; pass dim= or wrap it in LinOp(...)."
            )
        dim = _dim("as_linop", dim)
        return LinOp(_width_checked(op, dim, name), dim, dtype or torch.get_default_dtype(),
                     device if device is not None else "cpu", name=name)
    raise TypeError(f"{name}: expected a LinOp, a [P, P] Tensor, K-FAC/EK-FAC factors or a "
                    f"callable, got {type(op).__name__}.")


def _dim(func: str, dim) -> int:
    """Return ``dim`` as an int >= 1 (any integer type, e.g. ``numpy.int64``), or raise."""
    if not isinstance(dim, bool):
        with contextlib.suppress(TypeError):
            dim = operator.index(dim)
    return check_int(func, "dim", dim)


def _width_checked(fn: Callable[[Tensor], Tensor], dim: int, name: str):
    """Wrap a user's ``[k, P] -> [k, P]`` callable so a wrong output shape raises at call time
    (a shape test, no reduction: it stays in solver loops)."""

    def matmat(V: Tensor) -> Tensor:
        out = fn(V)
        if not isinstance(out, Tensor):
            raise TypeError(f"{name}: expected the callable to return a Tensor, got "
                            f"{type(out).__name__}.")
        if out.shape != V.shape:
            raise ValueError(f"{name}: expected the callable to map [k, {dim}] to [k, {dim}], "
                             f"got {list(out.shape)} for V of shape {list(V.shape)}.")
        return out

    return matmat
