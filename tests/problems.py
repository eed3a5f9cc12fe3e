"""Small float64 test problems as functional per-example losses, plus their dense references.

Each builder returns ``(params, loss, batch)`` with ``loss(params, example) -> Tensor[]`` and a
batch ``(x, y)`` of ``n`` examples, all on ``device`` in float64, drawn from ``seed``.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

from dattri_fn.tree import ravel

DTYPE = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def linear_regression(n=12, dim=4, seed=0, device="cpu"):
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g, dtype=DTYPE)
    y = torch.randn(n, generator=g, dtype=DTYPE)
    params = {"w": torch.randn(dim, generator=g, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}

    def loss(p, ex):
        xi, yi = ex
        return 0.5 * (xi @ p["w"] + p["b"] - yi) ** 2

    return _to(params, device), loss, (x.to(device), y.to(device))


def logistic_regression(n=16, dim=3, classes=3, seed=0, device="cpu"):
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=g)
    params = {
        "W": 0.5 * torch.randn(classes, dim, generator=g, dtype=DTYPE),
        "b": 0.1 * torch.randn(classes, generator=g, dtype=DTYPE),
    }

    def loss(p, ex):
        xi, yi = ex
        logits = p["W"] @ xi + p["b"]
        return F.cross_entropy(logits.unsqueeze(0), yi.unsqueeze(0))

    return _to(params, device), loss, (x.to(device), y.to(device))


def mlp(n=16, dim=3, hidden=4, classes=3, seed=0, device="cpu"):
    """A 2-layer tanh MLP with cross-entropy: a non-convex loss with an indefinite Hessian."""
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=g)
    params = {
        "l1.weight": torch.randn(hidden, dim, generator=g, dtype=DTYPE) / dim**0.5,
        "l1.bias": 0.1 * torch.randn(hidden, generator=g, dtype=DTYPE),
        "l2.weight": torch.randn(classes, hidden, generator=g, dtype=DTYPE) / hidden**0.5,
        "l2.bias": 0.1 * torch.randn(classes, generator=g, dtype=DTYPE),
    }

    def loss(p, ex):
        xi, yi = ex
        h = torch.tanh(p["l1.weight"] @ xi + p["l1.bias"])
        logits = p["l2.weight"] @ h + p["l2.bias"]
        return F.cross_entropy(logits.unsqueeze(0), yi.unsqueeze(0))

    return _to(params, device), loss, (x.to(device), y.to(device))


PROBLEMS = {"linear": linear_regression, "logistic": logistic_regression, "mlp": mlp}


def _to(params, device):
    return {k: v.to(device) for k, v in params.items()}


def mean_loss_flat(params, loss, batch):
    """Return ``(flat0, f)`` with ``f(flat) = mean_i loss(unravel(flat), example_i)``."""
    flat0, unravel = ravel(params)
    x, y = batch

    def f(flat):
        p = unravel(flat)
        return torch.stack([loss(p, (x[i], y[i])) for i in range(x.shape[0])]).mean()

    return flat0, f


def dense_hessian(params, loss, batch):
    """Dense ``[P, P]`` Hessian of the mean loss by ``torch.func.hessian`` on raveled params."""
    flat0, f = mean_loss_flat(params, loss, batch)
    return hessian(f)(flat0)


def dense_per_sample_grads(params, loss, batch):
    """``[B, P]`` per-sample gradients by a Python loop of ``torch.autograd.grad``."""
    flat0, unravel = ravel(params)
    x, y = batch
    rows = []
    for i in range(x.shape[0]):
        flat = flat0.clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(loss(unravel(flat), (x[i], y[i])), flat)
        rows.append(gi)
    return torch.stack(rows)


def spd_matrix(dim, seed, cond=10.0, dtype=DTYPE, device="cpu"):
    """A random symmetric positive-definite ``[dim, dim]`` matrix with condition number ``cond``."""
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dtype))
    eig = torch.logspace(0, float(torch.log10(torch.tensor(cond))), dim, dtype=dtype)
    return ((q * eig) @ q.T).to(device)


class SeqNet(nn.Module):
    """A Linear over tokens ``[B, T, D]``, tanh, LayerNorm, mean over tokens, a Linear head."""

    def __init__(self, dim, hidden, classes, bias):
        super().__init__()
        self.emb = nn.Linear(dim, hidden, bias=bias)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes, bias=bias)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.emb(x))).mean(1))
