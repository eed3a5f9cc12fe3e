"""Small problems with known answers, as functional ``(params, loss, data)``.

Every builder draws its data and parameters in float64 on the CPU from ``torch.Generator(seed)``
and only then casts to ``dtype`` and moves to ``device``, so the same seed is the same problem in
any dtype and on any device. A :class:`Problem` is a NamedTuple whose first three fields are the
``(params, loss, data)`` every dattri_fn transform takes; ``forward`` and ``out_loss`` split the
loss as ``loss(p, z) = out_loss(forward(p, z), z) + l2 |p|^2`` for the Gauss-Newton.

    linear_regression   0.5 (w.x + b - y)^2 (+ l2 |p|^2); convex, exact LOO in closed form
    ridge_regression    the same with l2 > 0, params at the minimiser
    logistic_regression multinomial cross-entropy (+ l2 |p|^2); convex, LOO by Newton refits
    mlp                 a 2-layer tanh MLP, cross-entropy: an indefinite Hessian
    conv_net            Conv2d(1 -> c, 3x3), tanh, Linear: a small conv net
    sequence_model      token embeddings + positions, tanh Linear per token, mean, Linear head

Convex problems take ``cond``, the ratio of their feature scales, so that ``H^-1`` matters to
how influence ranks training points.

Their dense references (Hessian, Gauss-Newton, Fisher, exact influence and leave-one-out) are in
:mod:`.references`, random operators with a known spectrum in :mod:`.matrices`; both stay
importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._types import Loss, Params

DTYPE = torch.float64


class Problem(NamedTuple):
    """A problem with known answers: ``(params, loss, data)`` plus what the references need.

    ``params, loss, data = problem[:3]`` unpacks what every transform takes.

    Fields:
        params: ``dict[str, Tensor]``; their raveled order defines ``P``.
        loss: ``loss(params, example) -> Tensor[]`` for one example ``(x_i, y_i)``, ``l2`` term
            included (the training objective is the mean of ``loss`` over ``data``).
        data: ``(x, y)`` with leading dimension ``n``.
        forward: ``forward(params, example) -> output`` of one example ``(x_i, y_i)``.
        out_loss: ``out_loss(output, example) -> Tensor[]``, convex in ``output``.
        name: the builder's name (``"ridge"``, ``"mlp"``...).
        l2: the ``l2 |params|^2`` term inside ``loss``.
        convex: whether ``loss`` is convex in ``params``.
        fitted: whether ``params`` minimise the mean loss (to ``~1e-12``): :func:`exact_loo`
            and the LOO check of ``check_method`` need it.
    """

    params: Params
    loss: Loss
    data: tuple[Tensor, Tensor]
    forward: Callable[[Params, Any], Tensor]
    out_loss: Callable[[Tensor, Any], Tensor]
    name: str
    l2: float = 0.0
    convex: bool = False
    fitted: bool = False

    @property
    def n(self) -> int:
        """Number of training examples."""
        return int(self.data[0].shape[0])

    @property
    def num_params(self) -> int:
        """``P``."""
        return sum(v.numel() for v in self.params.values())

    def __repr__(self) -> str:
        return (f"Problem({self.name}, n={self.n}, P={self.num_params}, l2={self.l2:g}, "
                f"dtype={next(iter(self.params.values())).dtype})")


def _gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _int(func: str, arg: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers too), or a named error."""
    import operator

    if not isinstance(value, bool):
        try:
            value = operator.index(value)
        except TypeError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{func}({arg}=...): expected an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{func}({arg}=...): expected an int >= {minimum}, got {value!r}.")
    return value


def _sizes(func: str, seed, **sizes) -> None:
    """Refuse a size < 1 or a seed < 0 by name before a draw turns it into a torch error."""
    for arg, value in sizes.items():
        _int(func, arg, value)
    _int(func, "seed", seed, minimum=0)


def _check_cond(func: str, cond) -> float:
    if isinstance(cond, bool) or not isinstance(cond, (int, float)) or not (
            math.isfinite(cond) and cond >= 1):
        raise ValueError(f"{func}(cond=...): expected a finite condition number >= 1, got "
                         f"{cond!r}.")
    return float(cond)


def _squared_error(out: Tensor, example) -> Tensor:
    return 0.5 * (out - example[1]) ** 2


def _cross_entropy(out: Tensor, example) -> Tensor:
    return F.cross_entropy(out.unsqueeze(0), example[1].unsqueeze(0))


def _make(name, params, data, forward, out_loss, *, l2, convex, dtype, device) -> Problem:
    """Cast and move the float64 CPU draws, then bind the loss (with its l2 term)."""
    params = {k: v.to(dtype=dtype, device=device) for k, v in params.items()}
    x, y = data
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
    l2 = float(l2)

    if l2 == 0.0:
        def loss(p, ex):
            return out_loss(forward(p, ex), ex)
    else:
        def loss(p, ex):
            return out_loss(forward(p, ex), ex) + l2 * sum((v * v).sum() for v in p.values())

    return Problem(params, loss, (x, y), forward, out_loss, name, l2, convex, False)


def _check_l2(func: str, l2, fit: bool) -> None:
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"{func}(l2=...): expected a finite number >= 0, got {l2!r}.")
    if fit and func == "logistic_regression" and l2 <= 0:
        raise ValueError(f"{func}(l2=...): expected l2 > 0 with fit=True (the multinomial loss "
                         f"has no unique minimiser without it), got {l2!r}.")


def _linear_forward(p, ex):
    return ex[0] @ p["w"] + p["b"]


def linear_regression(n: int = 12, dim: int = 4, seed: int = 0, *, l2: float = 0.0,
                      fit: bool = False, cond: float = 1.0, dtype: torch.dtype = DTYPE,
                      device="cpu") -> Problem:
    """Return least squares ``0.5 (w.x + b - y)^2 + l2 |p|^2`` on ``n`` Gaussian examples.

    ``fit=False``: ``w`` is a random draw (not a minimiser); ``fit=True``: ``(w, b)`` solve the
    normal equations ``(Z^T Z / n + 2 l2 I) theta = Z^T y / n`` with ``Z = [x, 1]``.
    ``cond``: feature ``j`` is scaled by ``cond^(j / (dim - 1))``, so the Hessian's
    conditioning grows with it (1: isotropic features).
    """
    _check_l2("linear_regression", l2, fit)
    _sizes("linear_regression", seed, n=n, dim=dim)
    _check_cond("linear_regression", cond)
    g = _gen(seed)
    x = _scaled(torch.randn(n, dim, generator=g, dtype=DTYPE), cond)
    y = torch.randn(n, generator=g, dtype=DTYPE)
    params = {"w": torch.randn(dim, generator=g, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}
    if fit:
        theta = _ridge_solution(x, y, l2)
        params = {"w": theta[:dim], "b": theta[dim]}
    name = "ridge" if l2 > 0 else "linear"
    prob = _make(name, params, (x, y), _linear_forward, _squared_error, l2=l2, convex=True,
                 dtype=dtype, device=device)
    return prob._replace(fitted=bool(fit))


def ridge_regression(n: int = 16, dim: int = 3, seed: int = 0, *, l2: float = 0.05,
                     cond: float = 10.0, dtype: torch.dtype = DTYPE, device="cpu") -> Problem:
    """Return :func:`linear_regression` with ``l2 > 0``, fitted: exact LOO in closed form."""
    if not (isinstance(l2, (int, float)) and l2 > 0):
        raise ValueError(f"ridge_regression(l2=...): expected a number > 0, got {l2!r}.")
    _sizes("ridge_regression", seed, n=n, dim=dim)
    _check_cond("ridge_regression", cond)
    return linear_regression(n, dim, seed, l2=l2, fit=True, cond=cond, dtype=dtype,
                             device=device)


def _scaled(x: Tensor, cond: float) -> Tensor:
    if not (isinstance(cond, (int, float)) and cond >= 1):
        raise ValueError(f"expected cond >= 1 (the feature scale ratio), got {cond!r}.")
    dim = x.shape[1]
    if cond == 1 or dim == 1:
        return x
    return x * torch.logspace(0, math.log10(cond), dim, dtype=x.dtype)


def _ridge_solution(x: Tensor, y: Tensor, l2: float) -> Tensor:
    """``argmin mean_i 0.5 (z_i.theta - y_i)^2 + l2 |theta|^2`` with ``z = [x, 1]``.  # -> [dim + 1]"""
    Z = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    n, P = Z.shape
    A = Z.T @ Z / n + 2 * l2 * torch.eye(P, dtype=Z.dtype, device=Z.device)
    return torch.linalg.solve(A, Z.T @ y / n)


def _logistic_forward(p, ex):
    return p["W"] @ ex[0] + p["b"]


def logistic_regression(n: int = 16, dim: int = 3, classes: int = 3, seed: int = 0, *,
                        l2: float = 0.0, fit: bool = False, cond: float = 1.0,
                        dtype: torch.dtype = DTYPE, device="cpu") -> Problem:
    """Return multinomial logistic regression ``CE(W x + b, y) + l2 |p|^2``: convex.

    ``fit=True`` (needs ``l2 > 0``) runs Newton's method to a gradient norm below ``1e-12``;
    ``cond`` scales the features as in :func:`linear_regression`.
    """
    _check_l2("logistic_regression", l2, fit)
    _sizes("logistic_regression", seed, n=n, dim=dim, classes=classes)
    _check_cond("logistic_regression", cond)
    g = _gen(seed)
    x = _scaled(torch.randn(n, dim, generator=g, dtype=DTYPE), cond)
    y = torch.randint(0, classes, (n,), generator=g)
    params = {
        "W": 0.5 * torch.randn(classes, dim, generator=g, dtype=DTYPE),
        "b": 0.1 * torch.randn(classes, generator=g, dtype=DTYPE),
    }
    prob = _make("logistic", params, (x, y), _logistic_forward, _cross_entropy, l2=l2,
                 convex=True, dtype=DTYPE, device="cpu")
    if fit:
        Z, Y = _logistic_arrays(x, y, classes)
        T = torch.cat([params["W"], params["b"][:, None]], 1)
        T = _logistic_newton(Z, Y, torch.ones(n, dtype=DTYPE), float(l2), T)
        prob = prob._replace(params={"W": T[:, :dim].contiguous(), "b": T[:, dim].contiguous()},
                             fitted=True)
    return _recast(prob, dtype, device)


def _recast(prob: Problem, dtype, device) -> Problem:
    params = {k: v.to(dtype=dtype, device=device) for k, v in prob.params.items()}
    x, y = prob.data
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
    return prob._replace(params=params, data=(x, y))


def _logistic_objective(Z: Tensor, Y: Tensor, w: Tensor, l2: float, T: Tensor) -> Tensor:
    """``sum_i w_i CE(T z_i, y_i) / sum_i w_i + l2 |T|^2`` for ``T = [W, b]``, ``[C, D + 1]``."""
    logits = Z @ T.T
    ce = torch.logsumexp(logits, 1) - (logits * Y).sum(1)
    return (w * ce).sum() / w.sum() + l2 * (T * T).sum()


def _logistic_newton(Z: Tensor, Y: Tensor, w: Tensor, l2: float, T: Tensor,
                     max_iter: int = 100) -> Tensor:
    """Minimise :func:`_logistic_objective` by Newton steps with the closed-form gradient
    ``sum_i w_i (p_i - e_{y_i}) z_i^T / sum w + 2 l2 T`` and Hessian
    ``sum_i w_i (diag p_i - p_i p_i^T) (x) z_i z_i^T / sum w + 2 l2 I`` (row-major ``vec T``),
    halving a step until the objective does not rise; stops at a gradient norm below 1e-12."""
    C, D1 = T.shape
    eye = torch.eye(C * D1, dtype=T.dtype, device=T.device)
    value = _logistic_objective(Z, Y, w, l2, T)
    for _ in range(max_iter):
        p = torch.softmax(Z @ T.T, 1)
        g = ((p - Y) * w[:, None]).T @ Z / w.sum() + 2 * l2 * T
        if float(g.norm()) < 1e-12:
            break
        S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [n, C, C]
        H = torch.einsum("i,iab,icd->acbd", w, S, Z[:, :, None] * Z[:, None, :]) / w.sum()
        step = torch.linalg.solve(H.reshape(C * D1, C * D1) + 2 * l2 * eye, g.reshape(-1))
        step = step.reshape(C, D1)
        if float(step.norm()) <= 1e-15 * (1 + float(T.norm())):
            break  # round-off floor
        t = 1.0
        while True:
            trial = T - t * step
            new = _logistic_objective(Z, Y, w, l2, trial)
            # Near the minimum a full step can "rise" by round-off; halving it then stalls.
            if new <= value + 1e-14 * abs(float(value)) or t < 1e-8:
                break
            t /= 2
        T, value = trial, new
    return T


def _logistic_arrays(x: Tensor, y: Tensor, classes: int):
    Z = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    return Z, F.one_hot(y, classes).to(x.dtype)


def mlp(n: int = 16, dim: int = 3, hidden: int = 4, classes: int = 3, seed: int = 0, *,
        l2: float = 0.0, dtype: torch.dtype = DTYPE, device="cpu") -> Problem:
    """Return a 2-layer tanh MLP with cross-entropy: non-convex, an indefinite Hessian."""
    _check_l2("mlp", l2, False)
    _sizes("mlp", seed, n=n, dim=dim, hidden=hidden, classes=classes)
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=g)
    params = {
        "l1.weight": torch.randn(hidden, dim, generator=g, dtype=DTYPE) / dim**0.5,
        "l1.bias": 0.1 * torch.randn(hidden, generator=g, dtype=DTYPE),
        "l2.weight": torch.randn(classes, hidden, generator=g, dtype=DTYPE) / hidden**0.5,
        "l2.bias": 0.1 * torch.randn(classes, generator=g, dtype=DTYPE),
    }

    def forward(p, ex):
        h = torch.tanh(p["l1.weight"] @ ex[0] + p["l1.bias"])
        return p["l2.weight"] @ h + p["l2.bias"]

    return _make("mlp", params, (x, y), forward, _cross_entropy, l2=l2, convex=False,
                 dtype=dtype, device=device)


def conv_net(n: int = 10, size: int = 5, channels: int = 2, classes: int = 3, seed: int = 0, *,
             l2: float = 0.0, dtype: torch.dtype = DTYPE, device="cpu") -> Problem:
    """Return ``Linear(flatten(tanh(Conv2d_{1->channels, 3x3}(x))))`` on ``[1, size, size]``
    images with cross-entropy: ``P = 10 channels + classes (channels (size-2)^2 + 1)``."""
    _check_l2("conv_net", l2, False)
    _sizes("conv_net", seed, n=n, size=size, channels=channels, classes=classes)
    if size < 3:
        raise ValueError(f"conv_net(size=...): expected size >= 3 (a 3x3 kernel), got {size!r}.")
    g = _gen(seed)
    x = torch.randn(n, 1, size, size, generator=g, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=g)
    flat_dim = channels * (size - 2) ** 2
    params = {
        "conv.weight": torch.randn(channels, 1, 3, 3, generator=g, dtype=DTYPE) / 3.0,
        "conv.bias": 0.1 * torch.randn(channels, generator=g, dtype=DTYPE),
        "fc.weight": torch.randn(classes, flat_dim, generator=g, dtype=DTYPE) / flat_dim**0.5,
        "fc.bias": 0.1 * torch.randn(classes, generator=g, dtype=DTYPE),
    }

    def forward(p, ex):
        h = torch.tanh(F.conv2d(ex[0].unsqueeze(0), p["conv.weight"], p["conv.bias"]))
        return p["fc.weight"] @ h.reshape(-1) + p["fc.bias"]

    return _make("conv", params, (x, y), forward, _cross_entropy, l2=l2, convex=False,
                 dtype=dtype, device=device)


def sequence_model(n: int = 10, length: int = 4, vocab: int = 6, dim: int = 3, hidden: int = 4,
                   classes: int = 2, seed: int = 0, *, l2: float = 0.0,
                   dtype: torch.dtype = DTYPE, device="cpu") -> Problem:
    """Return a tiny sequence classifier on integer tokens ``[n, length]``: embeddings plus
    positions, a tanh Linear per token, the mean over tokens, a Linear head; cross-entropy."""
    _check_l2("sequence_model", l2, False)
    _sizes("sequence_model", seed, n=n, length=length, vocab=vocab, dim=dim, hidden=hidden,
           classes=classes)
    g = _gen(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    params = {
        "emb": torch.randn(vocab, dim, generator=g, dtype=DTYPE),
        "pos": 0.5 * torch.randn(length, dim, generator=g, dtype=DTYPE),
        "l1.weight": torch.randn(hidden, dim, generator=g, dtype=DTYPE) / dim**0.5,
        "l1.bias": 0.1 * torch.randn(hidden, generator=g, dtype=DTYPE),
        "head.weight": torch.randn(classes, hidden, generator=g, dtype=DTYPE) / hidden**0.5,
        "head.bias": 0.1 * torch.randn(classes, generator=g, dtype=DTYPE),
    }

    def forward(p, ex):
        h = torch.tanh((p["emb"][ex[0]] + p["pos"]) @ p["l1.weight"].T + p["l1.bias"])
        return p["head.weight"] @ h.mean(0) + p["head.bias"]

    return _make("sequence", params, (x, y), forward, _cross_entropy, l2=l2, convex=False,
                 dtype=dtype, device=device)


BUILDERS: dict[str, Callable[..., Problem]] = {
    "linear": linear_regression,
    "ridge": ridge_regression,
    "logistic": logistic_regression,
    "mlp": mlp,
    "conv": conv_net,
    "sequence": sequence_model,
}


# Importers of dattri_fn.testing.problems keep these names; imported last because references
# builds on Problem and matrices on the size checks above.
from .matrices import (  # noqa: E402, F401
    MATRICES,
    indefinite_matrix,
    low_rank_plus_diagonal,
    psd_matrix,
    spd_matrix,
)
from .references import (  # noqa: E402, F401
    CURVATURES,
    dense_curvature,
    dense_fisher,
    dense_gauss_newton,
    dense_hessian,
    exact_influence,
    exact_loo,
    loo_params,
    mean_loss_flat,
    per_example_grads,
)
