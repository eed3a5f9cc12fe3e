"""The suite's test problems: a thin re-export of :mod:`dattri_fn.testing.problems` (the kit).

Builders keep their historical ``(params, loss, batch)`` triples and the references their
``(params, loss, batch)`` argument order, so the tests importing them read unchanged; the
values are the kit's (same seeds, same draws).
"""

import torch
from torch import nn

from dattri_fn.testing import problems as _kit
from dattri_fn.testing.problems import DTYPE, spd_matrix  # noqa: F401 - re-exported


def _triple(build):
    def make(*args, **kwargs):
        problem = build(*args, **kwargs)
        return problem.params, problem.loss, problem.data

    make.__name__ = build.__name__
    make.__doc__ = build.__doc__
    return make


linear_regression = _triple(_kit.linear_regression)
logistic_regression = _triple(_kit.logistic_regression)
mlp = _triple(_kit.mlp)

PROBLEMS = {"linear": linear_regression, "logistic": logistic_regression, "mlp": mlp}


def mean_loss_flat(params, loss, batch):
    """Return ``(flat0, f)`` with ``f(flat) = mean_i loss(unravel(flat), example_i)``."""
    return _kit.mean_loss_flat(loss, params, batch)


def dense_hessian(params, loss, batch):
    """Dense ``[P, P]`` Hessian of the mean loss by ``torch.func.hessian`` on raveled params."""
    return _kit.dense_hessian(loss, params, batch)


def dense_per_sample_grads(params, loss, batch):
    """``[B, P]`` per-sample gradients by a Python loop of ``torch.autograd.grad``."""
    return _kit.per_example_grads(loss, params, batch)


class SeqNet(nn.Module):
    """A Linear over tokens ``[B, T, D]``, tanh, LayerNorm, mean over tokens, a Linear head."""

    def __init__(self, dim, hidden, classes, bias):
        super().__init__()
        self.emb = nn.Linear(dim, hidden, bias=bias)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes, bias=bias)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.emb(x))).mean(1))
