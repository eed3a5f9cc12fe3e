"""Small problems with known answers, as functional ``(params, loss, data)``, and their references.

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

Dense references, ``P`` the raveled size, gradients and curvatures by Python loops over the
examples (independent of the ``vmap`` paths they check): :func:`dense_hessian`,
:func:`dense_gauss_newton`, :func:`dense_fisher` and :func:`dense_curvature` (``[P, P]``),
:func:`per_example_grads` (``[n, P]``), :func:`exact_influence` (``g_i^T (C + damping I)^-1 g_j``,
``[n_train, n_test]``); :func:`loo_params` (normal equations without row ``i``, or Newton refits
with the closed-form logistic gradient and Hessian) and :func:`exact_loo`
(``loss_j(theta_{-i}) - loss_j(theta)``). Convex problems take ``cond``, the ratio of their
feature scales, so that ``H^-1`` matters to how influence ranks training points.

Random operators with a known spectrum for solver tests: :func:`spd_matrix`,
:func:`psd_matrix` (a null space), :func:`indefinite_matrix`, :func:`low_rank_plus_diagonal`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from .._types import Loss, Params
from ..tree import ravel

DTYPE = torch.float64
CURVATURES = ("hessian", "gauss_newton", "fisher")


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


# -- dense references ----------------------------------------------------------------------------
def _examples(data):
    x, y = data
    return [(x[i], y[i]) for i in range(x.shape[0])]


def _as_problem(func: str, problem) -> Problem:
    if not isinstance(problem, Problem):
        raise TypeError(f"{func}(problem=...): expected a dattri_fn.testing Problem, got "
                        f"{type(problem).__name__}.")
    return problem


def mean_loss_flat(loss: Loss, params: Params, data) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Return ``(flat0, f)`` with ``f(flat) = mean_i loss(unravel(flat), z_i)`` by a Python loop."""
    flat0, unravel = ravel(params)
    examples = _examples(data)

    def f(flat):
        p = unravel(flat)
        return torch.stack([loss(p, ex) for ex in examples]).mean()

    return flat0, f


def dense_hessian(loss: Loss, params: Params, data) -> Tensor:
    """Return the Hessian of the mean loss, ``torch.func.hessian`` on raveled params.  # [P, P]"""
    flat0, f = mean_loss_flat(loss, params, data)
    return hessian(f)(flat0)


def per_example_grads(loss: Loss, params: Params, data) -> Tensor:
    """Return ``g_i = grad loss(params, z_i)`` by a loop of ``torch.autograd.grad``.  # [n, P]"""
    flat0, unravel = ravel(params)
    rows = []
    for ex in _examples(data):
        flat = flat0.detach().clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(loss(unravel(flat), ex), flat)
        rows.append(gi)
    return torch.stack(rows)


def dense_fisher(loss: Loss, params: Params, data) -> Tensor:
    """Return the empirical Fisher ``F = (1/n) sum_i g_i g_i^T``.  # [P, P]"""
    G = per_example_grads(loss, params, data)
    return G.T @ G / G.shape[0]


def dense_gauss_newton(forward: Callable, out_loss: Callable, params: Params, data, *,
                       l2: float = 0.0) -> Tensor:
    """Return ``G = (1/n) sum_i J_i^T H_i J_i + 2 l2 I`` (``J_i``: Jacobian of the output in the
    raveled params, ``H_i``: Hessian of ``out_loss`` in the output), one example at a time.  # [P, P]"""
    flat0, unravel = ravel(params)
    G = torch.zeros(flat0.numel(), flat0.numel(), dtype=flat0.dtype, device=flat0.device)
    examples = _examples(data)
    for ex in examples:
        out_of = lambda flat, ex=ex: forward(unravel(flat), ex)
        out = out_of(flat0)
        J = jacrev(out_of)(flat0).reshape(out.numel(), -1)
        H = hessian(lambda o, ex=ex, shape=out.shape: out_loss(o.reshape(shape), ex))(out.reshape(-1))
        G += J.T @ H @ J
    G /= len(examples)
    return G + 2 * l2 * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def dense_curvature(problem: Problem, kind: str = "hessian") -> Tensor:
    """Return the problem's dense curvature on its training data: ``kind`` in
    ``"hessian"``, ``"gauss_newton"``, ``"fisher"``.  # [P, P]"""
    problem = _as_problem("dense_curvature", problem)
    if kind == "hessian":
        return dense_hessian(problem.loss, problem.params, problem.data)
    if kind == "gauss_newton":
        return dense_gauss_newton(problem.forward, problem.out_loss, problem.params, problem.data,
                                  l2=problem.l2)
    if kind == "fisher":
        return dense_fisher(problem.loss, problem.params, problem.data)
    raise ValueError(f"dense_curvature(kind=...): expected one of {list(CURVATURES)}, got {kind!r}.")


def exact_influence(problem: Problem, train=None, test=None, *, curvature: str = "hessian",
                    damping: float = 0.0) -> Tensor:
    """Return ``g_i^T (C + damping I)^-1 g_j`` with ``C`` the problem's dense curvature on its
    training data, by ``torch.linalg.solve``.  # -> [n_train, n_test]

    ``train``/``test`` default to ``problem.data``; positive = up-weighting train ``i`` lowers
    test ``j``'s loss (dattri_fn's score convention).
    """
    problem = _as_problem("exact_influence", problem)
    train = problem.data if train is None else train
    test = problem.data if test is None else test
    C = dense_curvature(problem, curvature)
    C = C + damping * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    G_train = per_example_grads(problem.loss, problem.params, train)
    G_test = per_example_grads(problem.loss, problem.params, test)
    return G_train @ torch.linalg.solve(C, G_test.T)


def loo_params(problem: Problem) -> Tensor:
    """Return the raveled minimisers ``theta_{-i}`` of the mean loss without example ``i``.  # [n, P]

    Linear/ridge regression: the normal equations with row ``i`` removed, in closed form;
    logistic regression: Newton's method from ``theta`` to a gradient norm below ``1e-12``.
    """
    problem = _as_problem("loo_params", problem)
    if not (problem.convex and problem.fitted):
        raise ValueError(f"loo_params(problem=...): expected a convex problem fitted at its "
                         f"minimiser (ridge_regression, linear_regression(fit=True), "
                         f"logistic_regression(fit=True)), got {problem!r} with "
                         f"convex={problem.convex}, fitted={problem.fitted}.")
    flat, unravel = ravel(problem.params)
    x, y = problem.data
    n = x.shape[0]
    if problem.name in ("linear", "ridge"):
        Z = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        P = Z.shape[1]
        eye = torch.eye(P, dtype=Z.dtype, device=Z.device)
        ZZ, Zy = Z.T @ Z, Z.T @ y
        A = (ZZ - Z[:, :, None] * Z[:, None, :]) / (n - 1) + 2 * problem.l2 * eye  # [n, P, P]
        b = (Zy - Z * y[:, None]) / (n - 1)  # [n, P]
        return torch.linalg.solve(A, b)
    W, b = problem.params["W"], problem.params["b"]
    Z, Y = _logistic_arrays(x, y, W.shape[0])
    T0 = torch.cat([W, b[:, None]], 1)
    rows = []
    for i in range(n):
        w = torch.ones(n, dtype=T0.dtype, device=T0.device)
        w[i] = 0
        T = _logistic_newton(Z, Y, w, problem.l2, T0)
        rows.append(torch.cat([T[:, :-1].reshape(-1), T[:, -1]]))
    return torch.stack(rows)


def exact_loo(problem: Problem, test=None) -> Tensor:
    """Return ``loss(theta_{-i}, z_j) - loss(theta, z_j)``: how much removing train ``i`` raises
    test ``j``'s loss (positive = ``i`` was a proponent), exactly.  # -> [n_train, n_test]"""
    problem = _as_problem("exact_loo", problem)
    thetas = loo_params(problem)
    flat, unravel = ravel(problem.params)
    test = problem.data if test is None else test
    losses_at = lambda theta: vmap(lambda ex: problem.loss(unravel(theta), ex))(test)
    base = losses_at(flat)
    return torch.stack([losses_at(t) for t in thetas]) - base


# -- random operators ----------------------------------------------------------------------------
def _orthogonal(dim: int, g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def _from_spectrum(eig: Tensor, g: torch.Generator, dtype, device) -> Tensor:
    q = _orthogonal(eig.numel(), g)
    A = (q * eig) @ q.T
    return ((A + A.T) / 2).to(dtype=dtype, device=device)


def spd_matrix(dim: int, seed: int, cond: float = 10.0, dtype: torch.dtype = DTYPE,
               device="cpu") -> Tensor:
    """Return a random SPD matrix with eigenvalues ``logspace(0, log10 cond)``.  # [P, P]"""
    _sizes("spd_matrix", seed, dim=dim)
    _check_cond("spd_matrix", cond)
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DTYPE))
    # log10 in float32 as the suite's draws always were: the same seed, the same matrix.
    eig = torch.logspace(0, float(torch.log10(torch.tensor(cond))), dim, dtype=DTYPE)
    return ((q * eig) @ q.T).to(dtype=dtype, device=device)


def psd_matrix(dim: int, seed: int, rank: int | None = None, cond: float = 10.0,
               dtype: torch.dtype = DTYPE, device="cpu") -> Tensor:
    """Return a random PSD matrix of ``rank`` (default ``max(1, dim // 2)``): a null space of
    ``dim - rank`` directions, the other eigenvalues in ``[1, cond]``.  # [P, P]"""
    _sizes("psd_matrix", seed, dim=dim)
    _check_cond("psd_matrix", cond)
    rank = max(1, dim // 2) if rank is None else _int("psd_matrix", "rank", rank, minimum=0)
    if rank > dim:
        raise ValueError(f"psd_matrix(rank=...): expected a rank <= dim = {dim}, got {rank}.")
    g = _gen(seed)
    eig = torch.zeros(dim, dtype=DTYPE)
    if rank:
        eig[:rank] = torch.logspace(0, float(math.log10(cond)), rank, dtype=DTYPE)
    return _from_spectrum(eig, g, dtype, device)


def indefinite_matrix(dim: int, seed: int, negative: int | None = None, cond: float = 10.0,
                      dtype: torch.dtype = DTYPE, device="cpu") -> Tensor:
    """Return a random symmetric matrix with ``negative`` (default ``max(1, dim // 3)``)
    eigenvalues in ``[-cond, -1]`` and the rest in ``[1, cond]``: non-singular, indefinite
    (negative definite for ``P = 1``).  # [P, P]"""
    _sizes("indefinite_matrix", seed, dim=dim)
    _check_cond("indefinite_matrix", cond)
    negative = (max(1, dim // 3) if negative is None
                else _int("indefinite_matrix", "negative", negative, minimum=0))
    if negative > dim:
        raise ValueError(f"indefinite_matrix(negative=...): expected at most dim = {dim} "
                         f"negative eigenvalues, got {negative}.")
    g = _gen(seed)
    mags = torch.logspace(0, float(math.log10(cond)), dim, dtype=DTYPE)
    signs = torch.ones(dim, dtype=DTYPE)
    signs[torch.randperm(dim, generator=g)[:negative]] = -1
    return _from_spectrum(mags * signs, g, dtype, device)


def low_rank_plus_diagonal(dim: int, seed: int, rank: int = 2, dtype: torch.dtype = DTYPE,
                           device="cpu") -> Tensor:
    """Return ``U U^T + diag(d)`` with ``U`` ``[P, rank]`` Gaussian and ``d`` in ``[0.1, 1]``:
    SPD, the shape of K-FAC damping and DataInf's per-layer blocks.  # [P, P]"""
    _sizes("low_rank_plus_diagonal", seed, dim=dim)
    rank = _int("low_rank_plus_diagonal", "rank", rank, minimum=0)
    g = _gen(seed)
    U = torch.randn(dim, rank, generator=g, dtype=DTYPE)
    d = 0.1 + 0.9 * torch.rand(dim, generator=g, dtype=DTYPE)
    return (U @ U.T + torch.diag(d)).to(dtype=dtype, device=device)


MATRICES: dict[str, Callable[..., Tensor]] = {
    "spd": spd_matrix,
    "psd": psd_matrix,
    "indefinite": indefinite_matrix,
    "low_rank_diag": low_rank_plus_diagonal,
}
