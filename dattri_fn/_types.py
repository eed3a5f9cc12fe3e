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
             dimension ``B``. Never mutated. Integer labels are allowed.
    Example  one element of a Batch, the leading dimension removed.
    Loss     ``loss(params, example) -> Tensor[]``: the loss of ONE example. Batch means are
             derived with ``vmap``.
    LinOp    a linear map ``Tensor[k, P] -> Tensor[k, P]`` (a ``[P]`` vector is also accepted),
             pure and batched over rows. A dense ``[P, P]`` tensor is accepted wherever a LinOp
             is (see :func:`as_linop`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import Tensor

Params = dict[str, Tensor]
Batch = Union[Tensor, tuple, list, Mapping[str, Tensor]]
Example = Any
Loss = Callable[[Params, Example], Tensor]


class LinOp:
    """A symmetric-or-not linear operator ``V -> A V`` on rows.  # [k, P] -> [k, P]

    Wraps a row-batched ``matmat`` with the facts solvers need at construction time
    (``dim``, ``dtype``, ``device``). Calling it with a ``[P]`` vector returns a ``[P]`` vector.
    """

    __slots__ = ("matmat", "dim", "dtype", "device", "name")

    def __init__(
        self,
        matmat: Callable[[Tensor], Tensor],
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        name: str = "LinOp",
    ):
        self.matmat = matmat
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.name = name

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
        return self.matmat(V)

    def dense(self, chunk_size: int | None = 256) -> Tensor:
        """Return the operator as a dense matrix ``A`` with ``A @ v == op(v)``.  # [P, P]

        Applied to ``chunk_size`` unit rows at a time (None = all ``P`` at once): a vmapped
        curvature holds per-row activations, so one ``[P, P]`` call can need many times the
        memory of the result.
        """
        P = self.dim
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


def as_linop(op: LinOp | Tensor | Callable, *, dim: int | None = None,
             dtype: torch.dtype | None = None, device=None, name: str = "op") -> LinOp:
    """Return ``op`` as a :class:`LinOp`; a dense ``[P, P]`` matrix ``A`` maps ``V -> V A^T``.

    A bare callable needs ``dim`` (and optionally ``dtype``/``device``, default float32/cpu).
    """
    if isinstance(op, LinOp):
        return op
    if isinstance(op, Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"{name}: expected a square [P, P] matrix, got shape {list(op.shape)}.")
        A = op
        return LinOp(lambda V: V @ A.T, A.shape[0], A.dtype, A.device, name=name)
    if callable(op):
        if dim is None:
            raise ValueError(
                f"{name}: a bare callable needs dim=P; pass dim= or wrap it in LinOp(...)."
            )
        return LinOp(op, dim, dtype or torch.get_default_dtype(),
                     device if device is not None else "cpu", name=name)
    raise TypeError(f"{name}: expected a LinOp, a [P, P] Tensor or a callable, got {type(op).__name__}.")
