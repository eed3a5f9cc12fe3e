"""RPS's closed-form check (:func:`_linear_softmax`) over several blocks of rows: the loss is
checked on every row (its last block included) and at random logits (appended to the last
block's vmapped call), in ceil(n / _loss_rows) vmapped calls of the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dattri_fn.attribute.representer_fit import _block_rows, _linear_softmax, _loss_rows

F64 = torch.float64
N, FD, K = 600, 5, 3


def _problem(scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, FD, generator=g, dtype=F64)
    W = scale * torch.randn(K, FD, generator=g, dtype=F64)
    y = torch.randint(0, K - 1, (N,), generator=g)  # class K-1 nowhere ...
    y[-1] = K - 1  # ... but on the last row
    return h, {"W": W}, y


def _head(p, h):
    return p["W"] @ h


def _recognised(loss, scale: float = 1.0) -> bool:
    h, params, y = _problem(scale)
    return _linear_softmax(_head, loss, {}, ["W"], params, h, y, 0.1) is not None


def test_the_problem_has_several_loss_blocks():
    rows = _block_rows(N, FD)
    assert N > 2 * _loss_rows(rows, FD, K) > 0


def test_a_loss_off_the_formula_on_the_last_row_only_is_refused():
    """Class K-1 (the last row's label only) adds a term: only the last block's check sees it."""
    assert _recognised(F.cross_entropy)

    def odd(z, t):
        return F.cross_entropy(z, t) + 1e-3 * (t == K - 1).to(z.dtype) * z[K - 1]

    assert not _recognised(odd)


def test_a_loss_off_the_formula_at_large_logits_only_is_refused():
    """Clamped logits equal cross-entropy at the start's small logits (|z| < 1) on every row:
    only the random logits (4 randn, appended to the last block's call) tell them apart."""
    h, params, _ = _problem(0.05)
    assert float((h @ params["W"].T).abs().max()) < 1

    def clamped(z, t):
        return F.cross_entropy(z.clamp(-1, 1), t)

    assert not _recognised(clamped, 0.05)


def test_the_loss_is_vmapped_once_per_block():
    """ceil(n / _loss_rows) calls, the random logits riding along with the last block."""
    calls = []

    def counted(z, t):
        calls.append(1)
        return F.cross_entropy(z, t)

    assert _recognised(counted)
    loss = _loss_rows(_block_rows(N, FD), FD, K)
    assert len(calls) == -(-N // loss)


def test_float_targets_are_checked_on_every_block():
    """Soft targets [n, K] (the float path: T is the targets themselves): cross-entropy on
    probabilities is recognised; a term only the last row's target carries is refused."""
    h, params, y = _problem()
    t = F.one_hot(y, K).to(F64) * 0.9 + 0.1 / K

    def fit(loss):
        return _linear_softmax(_head, loss, {}, ["W"], params, h, t, 0.1)

    assert fit(F.cross_entropy) is not None

    def odd(z, p):
        return F.cross_entropy(z, p) + 1e-3 * p[K - 1] * (p[K - 1] > 0.5).to(z.dtype) * z[K - 1]

    assert fit(odd) is None
