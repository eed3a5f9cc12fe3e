"""The losses a K-FAC/EK-FAC factor pass backpropagates (``fisher=``): the observed targets
(empirical Fisher), one target drawn from the model per example (true Fisher), or the exact
expectation over the model's outputs (see :mod:`dattri_fn.operators.kfac` for the method)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from .._checks import _msg, check_int
from ..transforms.layers import layer_chunks

__all__ = ["fisher_losses"]


class _SampledLoss:
    """``loss_fn`` on targets drawn by ``sampler`` from the batch's own output (true Fisher).

    The draw happens on the whole batch in ``per_example``, outside any torch.func transform
    (:func:`dattri_fn.transforms.layers.per_example_losses` calls it instead of vmapping the loss).
    """

    def __init__(self, loss_fn: Callable, sampler: Callable, seed: int):
        self.loss_fn, self.sampler = loss_fn, sampler
        self.generator = torch.Generator().manual_seed(seed)
        self.first = None  # the pass's first draw: the targets of its gradient check (kfac_check)

    def __call__(self, output, target):
        return self.loss_fn(output, target)

    def per_example(self, output, target) -> Tensor:
        from ..transforms.layers import per_example_losses

        detached = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, output)
        drawn = self.sampler(detached, target, self.generator)
        if self.first is None:
            self.first = drawn
        return per_example_losses(self.loss_fn, output, drawn)


class _ExpectedLoss:
    """The expectation over the model's own output distribution (``fisher="expected"``).

    For a loss whose Hessian in the output is known, ``H_n = B_n B_n^T`` with ``B_n`` ``[C, K]``
    (:meth:`directions`), ``E_y[g g^T] = J^T H_n J = sum_k (J^T b_nk)(J^T b_nk)^T``: the
    statistics take ``K`` backprops of the detached columns ``b_nk`` per example (one forward).
    Softmax cross-entropy: ``H = diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T``, so
    ``b_c = sqrt(p_c) (e_c - p)``, ``K = C``; ``F.mse_loss`` (the mean over the ``D`` output
    entries of one example): ``H = (2 / D) I``, ``b_k = sqrt(2 / D) e_k``, ``K = D``.
    """

    def __init__(self, func: str, loss_fn: Callable, kind: str):
        self.func, self.loss_fn, self.kind = func, loss_fn, kind

    def directions(self, out) -> Tensor:
        """``B`` with ``H_n = B_n B_n^T``, detached.  # out [B, C] (or [B, ...]) -> [K, B, ...]"""
        if not isinstance(out, Tensor) or (self.kind == "ce" and out.ndim != 2):
            got = (f"output shape {list(out.shape)}" if isinstance(out, Tensor)
                   else f"a {type(out).__name__} output")
            raise ValueError(_msg(self.func, "fisher", "'expected' on [B, C] logits for "
                                  "softmax cross-entropy", got, "Use fisher='true' (one "
                                  "drawn target per example) for sequence outputs."))
        out = out.detach()
        if self.kind == "ce":
            p = out.softmax(-1)  # [B, C]
            eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
            # b[c, n, :] = sqrt(p_nc) (e_c - p_n)
            return (eye[:, None, :] - p[None]) * p.T.sqrt()[:, :, None]
        D = out[0].numel()
        eye = torch.eye(D, dtype=out.dtype, device=out.device) * (2.0 / D) ** 0.5
        return eye[:, None, :].expand(D, out.shape[0], D).reshape(D, *out.shape)


def _expected_kind(loss_fn: Callable) -> str | None:
    from ..transforms.layers import cross_entropy_rows

    if loss_fn is F.cross_entropy or getattr(loss_fn, "per_example", None) is cross_entropy_rows:
        return "ce"
    return "mse" if loss_fn is F.mse_loss else None


def _expected_io(tapped, expected: _ExpectedLoss, state, batch, chunk_size, step,
                 on_input=None) -> None:
    """``step(layer, a, g_k)`` for each output-Hessian direction ``k`` of :class:`_ExpectedLoss`,
    from one batched forward and ``K`` backward passes through its graph."""
    for args, kwargs, _, shapes, like in layer_chunks(tapped, state, batch, chunk_size):
        probes = {k: like.new_zeros(shapes[k], requires_grad=True) for k in tapped.layers}
        with torch.enable_grad():
            out, captured = tapped(state, probes, *args, **kwargs)
            acts = {k: a.detach() for k, a in captured.items()}
            del captured
            if on_input is not None:
                with torch.no_grad():
                    for k in list(acts):
                        on_input(k, acts.pop(k))
            B = expected.directions(out)
            for j in range(B.shape[0]):
                gs = torch.autograd.grad(out, list(probes.values()), grad_outputs=B[j],
                                         retain_graph=j + 1 < B.shape[0])
                with torch.no_grad():
                    for k, g in zip(probes, gs, strict=True):
                        step(k, acts.get(k), g)


def fisher_losses(func: str, loss_fn: Callable, fisher: str, seed: int,
                  sampler: Callable | None) -> Callable[[], Callable]:
    """Return ``() -> loss`` for one pass: ``loss_fn`` itself (empirical Fisher), a
    :class:`_SampledLoss` whose generator restarts at ``seed`` (true Fisher), or an
    :class:`_ExpectedLoss` (the exact expectation over the model's outputs)."""
    if fisher not in ("empirical", "true", "expected"):
        raise ValueError(_msg(func, "fisher", "'empirical', 'true' or 'expected'", repr(fisher)))
    if fisher == "expected":
        kind = _expected_kind(loss_fn)
        if kind is None:
            raise ValueError(_msg(func, "fisher", "'empirical' or 'true' for this loss_fn "
                                  "('expected' needs a known output Hessian: F.cross_entropy, "
                                  "a loss with per_example=cross_entropy_rows, or F.mse_loss)",
                                  f"'expected' with loss_fn "
                                  f"{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}"))
        return lambda: _ExpectedLoss(func, loss_fn, kind)
    check_int(func, "seed", seed, minimum=0)
    if sampler is not None and not callable(sampler):
        raise TypeError(_msg(func, "sampler", "None or a callable (output, target, generator) "
                             "-> target", type(sampler).__name__))
    if fisher == "empirical":
        return lambda: loss_fn
    draw = sampler or getattr(loss_fn, "sample", None) or _default_sampler(loss_fn)
    if draw is None:  # classes drawn from a regression output would pass silently (RU2 H2)
        raise ValueError(_msg(func, "sampler", "a sampler (output, target, generator) -> target "
                              "with fisher='true' for this loss_fn (targets are drawn by default "
                              "only for F.cross_entropy, nn.CrossEntropyLoss, cross_entropy_rows, "
                              "F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss and a "
                              "loss with its own .sample)", f"None with loss_fn {_name(loss_fn)}",
                              "Pass sampler=dattri_fn.losses.sample_categorical if the loss "
                              "takes class labels and softmax logits, a sampler of your own "
                              "otherwise, or fisher='empirical'."))
    return lambda: _SampledLoss(loss_fn, draw, seed)


def _name(fn) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _default_sampler(loss_fn: Callable) -> Callable | None:
    """The library's sampler for a loss it knows (softmax cross-entropy: classes; one-logit
    binary cross-entropy: Bernoulli labels), else None."""
    from ..losses import sample_bernoulli, sample_categorical
    from ..transforms.layers import cross_entropy_rows

    fn = loss_fn.func if isinstance(loss_fn, partial) and not loss_fn.args else loss_fn
    if fn is F.cross_entropy or isinstance(fn, torch.nn.CrossEntropyLoss) \
            or getattr(fn, "per_example", None) is cross_entropy_rows:
        return sample_categorical
    if fn is F.binary_cross_entropy_with_logits or isinstance(fn, torch.nn.BCEWithLogitsLoss):
        return sample_bernoulli
    return None
