"""A stochastic curvature as one value: the mean curvature over a data set, which also draws the
curvature of random mini-batches of it (what LiSSA's recursion steps on).

``sampled(batch_op, data, batch_size=b, seed=s)`` is a :class:`~dattri_fn._types.LinOp` whose
product is the curvature of all of ``data``, ``A = batch_op(data)``, and which hands
:func:`~dattri_fn.solve.ihvp_lissa` the per-step curvatures ``A_j = batch_op(data[I_j])`` of
``b`` rows ``I_j`` drawn without replacement by a ``torch.Generator`` seeded with ``s``. For a
``batch_op`` that averages per-example curvatures (``hvp``, ``fvp``, ``Hs[idx].mean(0)``)
``E[A_j] = A``: the mini-batches are unbiased draws of the operator itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from .._checks import _msg, _rebuilt, batch_slice, check_int, check_optional_int
from .._checks import batch_size as _batch_len
from .._types import Batch, LinOp, as_linop

__all__ = ["SampledLinOp", "sampled"]


def _take(batch: Batch, idx: Tensor) -> Batch:
    if isinstance(batch, Tensor):
        return batch[idx.to(batch.device)]
    if isinstance(batch, Mapping):
        return {k: v[idx.to(v.device)] for k, v in batch.items()}
    return _rebuilt(batch, [v[idx.to(v.device)] for v in batch])


class SampledLinOp(LinOp):
    """The mean curvature ``V -> A V``, ``A = batch_op(data)``, that also draws mini-batch
    curvatures ``batch_op(data[I_j])``.  # [k, P] -> [k, P]

    Attributes (besides LinOp's): ``batch_op``, ``data``, ``n`` (rows of data), ``batch_size``
    (``None``: every draw is the whole of ``data``), ``seed``. ``draws()`` yields the per-step
    operators from a fresh generator seeded with ``seed`` (every call replays the same ones).
    Sums and multiples keep the sampling, draw by draw: ``(A + B)_j = A_j + B`` for a
    deterministic ``B`` (a LinOp, a ``[P, P]`` tensor, ``c I``; a second sampled operator on
    the right enters through its mean product) and ``(c A)_j = c A_j``, so
    damping as a value, ``ihvp_lissa(op + 0.1)``, still steps on mini-batches.
    """

    __slots__ = ("batch_op", "data", "n", "batch_size", "seed", "_probe", "_label")

    @property
    def full(self) -> bool:
        """Whether every draw is the whole of ``data`` (a deterministic operator)."""
        return self.batch_size is None

    def draw(self, gen: torch.Generator) -> LinOp:
        """The curvature of ``batch_size`` rows drawn by ``gen`` (the whole data when full)."""
        if self.full:
            return self._probe
        rows = torch.randperm(self.n, generator=gen)[:self.batch_size]
        return as_linop(self.batch_op(_take(self.data, rows)), name=self._label)

    def draws(self) -> Iterator[LinOp]:
        """The per-step curvatures ``A_1, A_2, ...`` from a generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.draw(gen)

    def __add__(self, other) -> SampledLinOp:
        plain = LinOp.__add__(self, other)  # validates other; the mean product and its name
        return self._derived(plain, lambda A: LinOp.__add__(A, other))

    __radd__ = __add__  # A + B = B + A, bit for bit (IEEE addition commutes)

    def __mul__(self, c) -> SampledLinOp:
        plain = LinOp.__mul__(self, c)
        if plain is NotImplemented:
            return plain
        return self._derived(plain, lambda A: LinOp.__mul__(A, c))

    __rmul__ = __mul__

    def _derived(self, plain: LinOp, f: Callable[[LinOp], LinOp]) -> SampledLinOp:
        """``f(self)``: ``plain`` = ``f`` of the mean product, and ``f`` of every draw."""
        batch_op, label = self.batch_op, self._label
        op = SampledLinOp(plain.matmat, plain.dim, plain.dtype, plain.device, name=plain.name)
        op.batch_op = lambda batch: f(as_linop(batch_op(batch), name=label))
        op.data, op.n, op.batch_size, op.seed = self.data, self.n, self.batch_size, self.seed
        op._probe, op._label = f(self._probe), label
        return op


def sampled(batch_op: Callable[[Batch], LinOp], data: Batch, *, batch_size: int | None = None,
            seed: int = 0) -> SampledLinOp:
    """Return the curvature ``V -> batch_op(data) V`` that draws mini-batch curvatures for
    LiSSA.  # [k, P] -> [k, P]

    Args:
        batch_op: ``batch -> LinOp`` (or dense ``[P, P]``), the curvature on one mini-batch,
            e.g. ``lambda b: hvp(loss, params, b)``.
        data: ONE Batch (tensor, tuple/list or dict of tensors sharing the leading dim ``n``).
        batch_size: rows per draw, ``1 <= batch_size <= n``; ``None`` (or ``n``) draws all of
            ``data`` every time, so LiSSA runs the deterministic full-batch recursion.
        seed: seed of the row sampler, ``>= 0``.

    Returns:
        a :class:`SampledLinOp` of the mini-batch operators' ``dim``/``dtype``/``device``.
        Its own product is ``batch_op(data)``: built once for a full ``batch_size``, otherwise
        rebuilt at each product (a mini-batch ``batch_op`` may hold a dense matrix; the full
        one is only needed for ``dense()``, CG and the like).

    Raises:
        TypeError: ``batch_op`` not callable; ``data`` not a Batch; wrong kind of setting.
        ValueError: ints out of range, ``batch_size > n``; a ``batch_op`` that returns no
            operator.

    Example:
        >>> Hs = torch.randn(6, 3, 3, dtype=torch.float64)
        >>> Hs = Hs @ Hs.mT
        >>> op = sampled(lambda idx: Hs[idx].mean(0), torch.arange(6), batch_size=2, seed=1)
        >>> torch.allclose(op.dense(), Hs.mean(0))
        True
    """
    return sampled_op("sampled", "batch_op", batch_op, data, batch_size, seed)


def sampled_op(func: str, arg: str, batch_op, data, batch_size, seed) -> SampledLinOp:
    """:func:`sampled` with errors naming ``func(arg=...)`` (``ihvp_lissa``'s own form)."""
    if not callable(batch_op) or isinstance(batch_op, (LinOp, Tensor)):
        raise TypeError(_msg(func, arg, "a callable batch -> LinOp", type(batch_op).__name__))
    n = _batch_len(func, "data", data)
    batch_size = check_optional_int(func, "batch_size", batch_size)
    seed = check_int(func, "seed", seed, minimum=0)
    if batch_size is not None and batch_size > n:
        raise ValueError(_msg(func, "batch_size", f"batch_size <= n = {n} (the rows of data)",
                              repr(batch_size), "Lower batch_size or pass None."))
    full = batch_size is None or batch_size == n
    label = f"{func}({arg}=...)"
    # The full-data operator is built once and reused; otherwise a probe fixes P/dtype/device.
    probe = as_linop(batch_op(data if full else batch_slice(data, 0, batch_size)), name=label)
    if full:
        matmat = probe.matmat
    else:
        def matmat(V: Tensor) -> Tensor:
            return as_linop(batch_op(data), name=label).matmat(V)
    op = SampledLinOp(matmat, probe.dim, probe.dtype, probe.device, name="sampled")
    op.batch_op, op.data, op.n = batch_op, data, n
    op.batch_size, op.seed = (None if full else batch_size), seed
    op._probe, op._label = probe, label
    return op
