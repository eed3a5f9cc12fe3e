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


def test_over_the_memory_budget_gives_none():
    """Factors of more bytes than ``memory`` give None."""
    m = _mlp((nn.Tanh,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    assert mlp_hessian(m, F.cross_entropy, params, _data(), memory=64) is None


def _shared_relu_case():
    """R3's reproducer: ``relu = nn.ReLU(); Sequential(l1, relu, l2, relu, l3)``; on the first
    64 examples layer 2's pre-activations are all positive (its ReLU acts as the identity
    there), on the next 64 many are negative."""
    torch.manual_seed(0)
    relu = nn.ReLU()
    l1, l2, l3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)
    with torch.no_grad():
        l1.weight.copy_(torch.eye(4, 3))
        l1.bias.zero_()
        l2.weight.copy_(torch.eye(4) + 0.1 * torch.randn(4, 4))
        l2.bias.copy_(torch.tensor([-1.0, -1.0, -1.0, 1.0]))
    m = nn.Sequential(l1, relu, l2, relu, l3).double().eval()
    g = torch.Generator().manual_seed(0)
    x1 = 2 + torch.rand(64, 3, generator=g, dtype=torch.float64)
    x2 = 0.5 * torch.rand(64, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (128,), generator=g)
    return m, [(x1, y[:64]), (x2, y[64:])]


def _shared_tanh_case():
    """A shared Tanh object on random data: ``Sequential(l1, tanh, l2, tanh, l3)``."""
    torch.manual_seed(1)
    tanh = nn.Tanh()
    m = nn.Sequential(nn.Linear(5, 4), tanh, nn.Linear(4, 4), tanh, nn.Linear(4, 3)).double()
    x, y = _data(20)
    return m.eval(), [(x[:8], y[:8]), (x[8:], y[8:])]


@pytest.mark.parametrize("case", [_shared_relu_case, _shared_tanh_case])
def test_a_reused_activation_object_is_applied_at_each_use(case):
    """One activation object at two places of the Sequential (it runs twice): H V ==
    V @ torch.func.hessian(mean CE) at 1e-12 (the walk once dropped its second use: 0.29 off)."""
    m, data = case()
    params = {k: v.detach() for k, v in m.named_parameters()}
    H = mlp_hessian(m, F.cross_entropy, params, data)
    assert H is not None
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    dense = _dense_hessian(m, params, x, y)
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(H(V), V @ dense, rtol=0, atol=1e-12 * float(dense.abs().max()))


class _Doubled(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _LeakyTanh(nn.Tanh):
    def forward(self, x):
        return torch.tanh(x) + 0.1 * x


def _refused_model(case: str) -> nn.Module:
    torch.manual_seed(0)
    l1, act, l2 = nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)
    if case == "sequential-subclass":
        return _Doubled(l1, act, l2)
    if case == "linear-subclass":
        return nn.Sequential(l1, act, _ScaledLinear(4, 3))
    if case == "activation-subclass":
        return nn.Sequential(l1, _LeakyTanh(), l2)
    if case == "instance-forward":
        l2.forward = lambda x: 2 * F.linear(x, l2.weight, l2.bias)
    elif case == "forward-hook":
        l2.register_forward_hook(lambda mod, inp, out: 2 * out)
    elif case == "forward-pre-hook":
        act.register_forward_pre_hook(lambda mod, inp: (2 * inp[0],))
    elif case == "module-hook":
        m = nn.Sequential(l1, act, l2)
        m.register_forward_hook(lambda mod, inp, out: 2 * out)
        return m
    elif case == "linear-reused":
        sq = nn.Linear(4, 4)
        return nn.Sequential(l1, act, sq, act, sq, act, l2)
    elif case == "weight-tied":
        a, b = nn.Linear(4, 4), nn.Linear(4, 4)
        b.weight = a.weight
        return nn.Sequential(l1, act, a, act, b, act, l2)
    return nn.Sequential(l1, act, l2)


@pytest.mark.parametrize("case", ["sequential-subclass", "linear-subclass", "activation-subclass",
                                  "instance-forward", "forward-hook", "forward-pre-hook",
                                  "module-hook", "linear-reused", "weight-tied"])
def test_none_where_the_forward_is_not_the_chain(monkeypatch, case):
    """A subclass with its own forward, a forward set on an instance, a forward (pre-)hook, or
    one Linear (or its weight) at two places: None from the structure alone (the autodiff
    check, which sees only some examples, is switched off here)."""
    monkeypatch.setattr(linear_mlp, "_agrees", lambda *a, **k: True)
    m = _refused_model(case).double().eval()
    params = dict(m.named_parameters(remove_duplicate=case != "weight-tied"))
    params = {k: v.detach() for k, v in params.items()}
    assert mlp_hessian(m, F.cross_entropy, params, _data()) is None


def test_a_product_wrong_past_the_first_64_examples_is_refused(monkeypatch):
    """The autodiff check samples examples across all the data (first and last included): a
    product 0.1% off only on the last batch's examples (marked x[:, 0] = 50) gives None."""
    m = _mlp((nn.Tanh,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, y = _data(100)
    x[90:, 0] = 50.0
    inner = linear_mlp._product

    def product(layers, p, f, V):
        out = inner(layers, p, f, V)
        marked = bool((f["a"][0][:, 0] == 50.0).any())
        return {k: (1.001 if marked else 1.0) * v for k, v in out.items()}

    assert mlp_hessian(m, F.cross_entropy, params, [(x[:64], y[:64]), (x[64:], y[64:])]) is not None
    monkeypatch.setattr(linear_mlp, "_product", product)
    assert mlp_hessian(m, F.cross_entropy, params, [(x[:64], y[:64]), (x[64:], y[64:])]) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_product_off_by_a_thousandth_is_refused_in_each_dtype(monkeypatch, dtype):
    """Accepted as is; scaled by 1.001 (1e-3 relative, above the check's 1e3 eps): None, in
    float32 (eps 1.2e-7) as in float64."""
    m = _mlp((nn.Tanh,)).to(dtype)
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, y = _data()
    data = (x.to(dtype), y)
    assert mlp_hessian(m, F.cross_entropy, params, data) is not None
    inner = linear_mlp._product
    monkeypatch.setattr(linear_mlp, "_product",
                        lambda *a: {k: 1.001 * v for k, v in inner(*a).items()})
    assert mlp_hessian(m, F.cross_entropy, params, data) is None


def test_float32_product_is_the_hessian_to_float32_rounding():
    """float32 model and data: H V within 1e-5 max|H V| of the float64 torch.func.hessian."""
    m = _mlp((nn.Tanh, nn.ReLU))
    x, y = _data(40)
    p64 = {k: v.detach() for k, v in m.named_parameters()}
    dense = _dense_hessian(m, p64, x, y)
    m32 = m.float()
    params = {k: v.detach() for k, v in m32.named_parameters()}
    H = mlp_hessian(m32, F.cross_entropy, params, (x.float(), y), batch_rows=16)
    assert H is not None
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = V @ dense
    assert float((H(V.float()).double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_give_none(dtype):
    """float16 / bfloat16 (eps 1e-3 / 8e-3: the check could not tell a wrong product): None."""
    m = _mlp((nn.Tanh,)).to(dtype)
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, y = _data()
    assert mlp_hessian(m, F.cross_entropy, params, (x.to(dtype), y)) is None


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_labels_not_int64_give_none(dtype):
    """uint8 labels would index as a mask, int32 fail inside cross_entropy: None, so the
    autodiff path names them as it would without this operator."""
    m = _mlp((nn.Tanh,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, y = _data()
    assert mlp_hessian(m, F.cross_entropy, params, (x, y.to(dtype))) is None


def test_mixed_param_dtypes_give_none():
    """A float32 bias next to float64 weights: None (one dtype for the factors and the check)."""
    m = _mlp((nn.Tanh,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    params["0.bias"] = params["0.bias"].float()
    assert mlp_hessian(m, F.cross_entropy, params, _data()) is None


def _confident(dtype):
    """A Tanh MLP whose labels are its own argmax, last layer scaled until p_y ~ 1 - 1e-6."""
    m = _mlp((nn.Tanh,))
    x, _ = _data(400)
    with torch.no_grad():
        m[-1].weight.mul_(40.0)
        m[-1].bias.mul_(40.0)
        p = torch.softmax(m(x), 1)
        keep = p.max(1).values > 1 - 1e-4
        y = p.argmax(1)
    return m.to(dtype), x[keep][:64].to(dtype), y[keep][:64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_confident_model_keeps_the_fast_path_and_a_wrong_product_is_still_refused(monkeypatch, dtype):
    """p_y > 1 - 1e-4: p - onehot and p Rz - p (p.Rz) cancel in any product formed in the params'
    dtype (float32 autodiff 7.6e-4 off the float64 Hessian, ours 7.5e-4; float64 2e-12, both above
    1e3 eps): accepted; a product 1% off is still None (review R6 F1)."""
    m, x, y = _confident(dtype)
    params = {k: v.detach() for k, v in m.named_parameters()}
    with torch.no_grad():
        p_y = torch.softmax(m(x).double(), 1).gather(1, y[:, None])
    assert x.shape[0] == 64 and float(p_y.min()) > 1 - 1e-4
    H = mlp_hessian(m, F.cross_entropy, params, (x, y))
    assert H is not None
    m64 = _confident(torch.float64)[0]
    dense = _dense_hessian(m64, {k: v.detach() for k, v in m64.named_parameters()}, x.double(), y)
    V = torch.randn(2, H.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = V @ dense
    err = float((H(V.to(dtype)).double() - ref).abs().max()) / float(ref.abs().max())
    rel = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    assert linear_mlp._CHECK_TOL[dtype] < err <= 2e-3 * rel  # beyond 1e3 eps, as autodiff's own
    inner = linear_mlp._product
    monkeypatch.setattr(linear_mlp, "_product",
                        lambda *a: {k: 1.01 * v for k, v in inner(*a).items()})
    assert mlp_hessian(m, F.cross_entropy, params, (x, y)) is None
