"""operators.linear_mlp: the exact Hessian of a softmax cross-entropy MLP by the R-operator."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from dattri_fn.operators import linear_mlp
from dattri_fn.operators.linear_mlp import mlp_hessian


def _mlp(acts, seed=0):
    torch.manual_seed(seed)
    widths = [5, 4, 4, 3][: len(acts) + 2]
    mods = []
    for i, act in enumerate(acts):
        mods += [nn.Linear(widths[i], widths[i + 1])] + ([act()] if act else [])
    mods.append(nn.Linear(widths[len(acts)], 3))
    return nn.Sequential(*mods).double().eval()


def _data(n=9, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                generator=gen)


def _dense_hessian(m, params, x, y):
    keys, sizes = list(params), [v.numel() for v in params.values()]
    flat0 = torch.cat([v.reshape(-1) for v in params.values()])

    def mean_loss(f):
        p = {k: t.view_as(params[k]) for k, t in zip(keys, f.split(sizes), strict=True)}
        return F.cross_entropy(functional_call(m, p, (x,)), y)

    return torch.func.hessian(mean_loss)(flat0)


CHAINS = {"tanh": (nn.Tanh,), "sigmoid-tanh": (nn.Sigmoid, nn.Tanh), "relu": (nn.ReLU,),
          "linear-linear": (None,), "identity": (nn.Identity,)}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_product_is_the_exact_hessian(chain):
    """H V == V @ hessian(mean CE) (torch.func.hessian, float64) at 1e-12, over a list of
    batches and in row steps of 2; on_rows(idx) == the Hessian of the mean over idx."""
    m = _mlp(CHAINS[chain])
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, y = _data()
    H = mlp_hessian(m, F.cross_entropy, params, [(x[:4], y[:4]), (x[4:], y[4:])], batch_rows=2)
    assert H is not None
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense = _dense_hessian(m, params, x, y)
    assert torch.allclose(H(V), V @ dense, rtol=0, atol=1e-12 * float(dense.abs().max()))
    idx = torch.tensor([7, 0, 3])
    sub = _dense_hessian(m, params, x[idx], y[idx])
    assert torch.allclose(H.on_rows(idx)(V), V @ sub, rtol=0, atol=1e-12 * float(sub.abs().max()))


def test_params_in_another_order_ravel_in_that_order():
    """params reversed: H V == P^T (H_model P V) for the permutation P of the raveled blocks."""
    m = _mlp((nn.Tanh,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    rev = dict(reversed(list(params.items())))
    x, y = _data()
    H = mlp_hessian(m, F.cross_entropy, rev, (x, y))
    dense = _dense_hessian(m, rev, x, y)
    V = torch.randn(2, H.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(H(V), V @ dense, rtol=0, atol=1e-12 * float(dense.abs().max()))


@pytest.mark.parametrize("case", ["mse", "layernorm", "missing-key", "extra-key", "float-labels",
                                  "3d-input", "activation-last", "not-sequential",
                                  "ignored-label", "label-out-of-range"])
def test_none_where_it_is_not_the_hessian(case):
    """Every case outside the structure gives None (the caller keeps autodiff)."""
    m = _mlp((nn.Tanh,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, y = _data()
    loss_fn, data = F.cross_entropy, (x, y)
    if case == "mse":
        loss_fn = F.mse_loss
    elif case == "layernorm":
        m = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
        params = {k: v.detach() for k, v in m.named_parameters()}
    elif case == "missing-key":
        params.pop("0.bias")
    elif case == "extra-key":
        params["other"] = torch.zeros(2, dtype=torch.float64)
    elif case == "float-labels":
        data = (x, y.double())
    elif case == "3d-input":
        data = (x[:, None], y)
    elif case == "activation-last":
        m = nn.Sequential(nn.Linear(5, 3), nn.Tanh()).double()
        params = {k: v.detach() for k, v in m.named_parameters()}
    elif case in ("ignored-label", "label-out-of-range"):
        y = y.clone()
        y[2] = -100 if case == "ignored-label" else 3
        data = (x, y)
    elif case == "not-sequential":
        m = nn.ModuleDict({"0": nn.Linear(5, 3)}).double()
        params = {k: v.detach() for k, v in m.named_parameters()}
    assert mlp_hessian(m, loss_fn, params, data) is None


def test_a_wrong_product_is_refused_by_the_autodiff_check(monkeypatch):
    """A product that differs from autodiff's Hessian-vector product gives None."""
    m = _mlp((nn.Tanh,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    inner = linear_mlp._product
    monkeypatch.setattr(linear_mlp, "_product",
                        lambda *a: {k: 1.001 * v for k, v in inner(*a).items()})
    assert mlp_hessian(m, F.cross_entropy, params, _data()) is None


def test_over_the_memory_budget_gives_none():
    """Factors of more bytes than ``memory`` give None."""
    m = _mlp((nn.Tanh,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    assert mlp_hessian(m, F.cross_entropy, params, _data(), memory=64) is None
