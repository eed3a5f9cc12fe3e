"""Factored curvature of Linear-only models against ``torch.func.hessian`` / ``jacrev``."""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian, jacrev

from dattri_fn import functional_model, gnvp, hvp
from dattri_fn.attribute import influence
from dattri_fn.operators.linear_curvature import (
    FactoredCurvatureError,
    linear_gnvp,
    linear_hessian,
    linear_tap,
)
from dattri_fn.tree import ravel

DT = torch.float64
ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "softplus": nn.Softplus,
        "identity": nn.Identity}


def _mse(out, target):
    return F.mse_loss(out, target)


def _dense(module, loss_fn, params, batch):
    """``torch.func.hessian`` of the mean loss over the raveled ``params`` (dict order)."""
    flat, unravel = ravel(params)
    x, y = batch

    def mean_loss(f):
        out = functional_call(module, {**dict(module.named_parameters()), **unravel(f)}, (x,))
        return torch.stack([loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(len(x))]).mean()

    return hessian(mean_loss)(flat)


class Skip(nn.Module):
    """Layer ``a`` feeds ``b`` and ``c``, ``b`` feeds ``c`` through a product: a DAG, not a chain."""

    def __init__(self, dim, hidden, classes, bias_b):
        super().__init__()
        self.a = nn.Linear(dim, hidden)
        self.b = nn.Linear(hidden, hidden, bias=bias_b)
        self.c = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        u = torch.sigmoid(self.b(h))
        return self.c(torch.cat([h * u, F.softplus(h)], -1))


class Tied(nn.Module):
    """``b.weight`` is also read outside ``b``: a tied weight the factored Hessian refuses."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + h @ self.b.weight


def _chain(seed, dims, biases, act):
    torch.manual_seed(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:], strict=False)):
        if i:
            layers.append(ACTS[act]())
        layers.append(nn.Linear(d_in, d_out, bias=biases[i]))
    return nn.Sequential(*layers).to(DT).eval()


def _batch(seed, n, dim, classes, loss, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=DT)
    if loss == "ce":
        y = torch.randint(0, classes, (n,), generator=g)
    else:
        y = torch.randn(n, classes, generator=g, dtype=DT)
    return x.to(device), y.to(device)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), depth=st.integers(1, 3),
       widths=st.lists(st.integers(1, 4), min_size=4, max_size=4),
       biases=st.lists(st.booleans(), min_size=3, max_size=3),
       act=st.sampled_from(sorted(ACTS)), loss=st.sampled_from(["ce", "mse"]),
       subset=st.integers(1, 7), reverse=st.booleans())
def test_linear_hessian_equals_dense_hessian(device, seed, n, depth, widths, biases, act, loss,
                                             subset, reverse):
    """H[(l,j,k),(m,p,q)] from probes equals torch.func.hessian of the mean loss, any layers."""
    dims = widths[:depth + 1]
    if loss == "ce":
        dims[-1] = max(dims[-1], 2)
    model = _chain(seed, dims, biases, act).to(device)
    loss_fn = F.cross_entropy if loss == "ce" else _mse
    owned = [k for k, _ in model.named_parameters()]
    lin = sorted({k.rsplit(".", 1)[0] for k in owned}, key=int)
    chosen = [m for i, m in enumerate(lin) if subset >> i & 1] or lin[-1:]
    keys = [k for k in owned if k.rsplit(".", 1)[0] in chosen]
    if reverse:
        keys = keys[::-1]
    params = {k: dict(model.named_parameters())[k].detach() for k in keys}
    batch = _batch(seed, n, dims[0], dims[-1], loss, device)
    H = linear_hessian(model, loss_fn, params, batch)
    ref = _dense(model, loss_fn, params, batch)
    assert H.dtype == DT and H.device == ref.device
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), bias_b=st.booleans(),
       reverse=st.booleans())
def test_linear_hessian_on_a_dag_with_shared_activations(device, seed, n, bias_b, reverse):
    """A layer feeding two later layers (and a product of branches) is exact too."""
    torch.manual_seed(seed)
    model = Skip(3, 4, 3, bias_b).to(DT).to(device).eval()
    items = list(model.named_parameters())
    params = {k: v.detach() for k, v in (items[::-1] if reverse else items)}
    batch = _batch(seed, n, 3, 3, "ce", device)
    torch.testing.assert_close(linear_hessian(model, F.cross_entropy, params, batch),
                               _dense(model, F.cross_entropy, params, batch),
                               rtol=1e-10, atol=1e-12)


def test_optional_argument_branch_is_factored(device):
    """A Python branch on an optional argument (no trace to get it wrong): H and G exact."""
    torch.manual_seed(0)
    model = Masked().to(DT).to(device).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = _batch(0, 5, 3, 2, "ce", device)
    torch.testing.assert_close(linear_hessian(model, F.cross_entropy, params, batch),
                               _dense(model, F.cross_entropy, params, batch),
                               rtol=1e-10, atol=1e-12)
    G = linear_gnvp(model, F.cross_entropy, params, batch).dense()
    torch.testing.assert_close(G, _dense_gn(model, F.cross_entropy, params, batch),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size,batch_rows", [(None, None), (2, None), (3, 5), (None, 4)])
def test_batches_chunks_and_merges_give_one_matrix(device, chunk_size, batch_rows):
    """Summing over batches, chunks or merged batches gives the single-batch matrix."""
    model = _chain(3, [4, 5, 3], [True, True], "tanh").to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _batch(3, 9, 4, 3, "ce", device)
    whole = linear_hessian(model, F.cross_entropy, params, (x, y))
    parts = [(x[:2], y[:2]), (x[2:7], y[2:7]), (x[7:], y[7:])]
    tap = linear_tap(model, params)
    H = linear_hessian(model, F.cross_entropy, params, parts, chunk_size=chunk_size,
                       batch_rows=batch_rows, tapped=tap)
    torch.testing.assert_close(H, whole, rtol=1e-12, atol=1e-14)


def _scores(loss, params, train, test, **kw):
    method = influence(loss, solver="explicit", damping=1.0, **{"curvature": "hessian", **kw})
    return method.score(params, method.prepare(params, train), train, test)


@pytest.mark.parametrize("method", ["lu", "auto"])
def test_influence_explicit_takes_the_factored_path(device, monkeypatch, method):
    """explicit + hessian on a Linear-only FunctionalModel: no hvp call, the hvp path's scores."""
    inf = importlib.import_module("dattri_fn.attribute.influence_inverse")  # builds the curvature
    model = _chain(5, [4, 6, 3], [True, False], "tanh").to(device)
    fm = functional_model(model, F.cross_entropy)
    train = [_batch(s, 5, 4, 3, "ce", device) for s in (1, 2)]
    test = _batch(4, 3, 4, 3, "ce", device)
    ref = _scores(fm.loss, fm.params, train, test, l2=0.05, method=method)  # a bare loss: hvp

    def refuse(*a, **k):
        raise AssertionError("hvp called")

    monkeypatch.setattr(inf, "hvp", refuse)
    got = _scores(fm, fm.params, train, test, l2=0.05, method=method)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.norm(torch.tanh(self.a(x))))


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):  # [B, T, 3] -> [B, 2]
        return self.b(torch.tanh(self.a(x))).mean(1)


class Shared(nn.Module):
    """``b`` reuses ``a``'s weight Parameter: a tie that no get_attr node shows."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3, bias=False), nn.Linear(3, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class NoGrad(nn.Module):
    """A ``torch.no_grad`` block inside forward: reverse and forward mode disagree on it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            h2 = h * 2
        return self.b(h2 + h)


class Rows(nn.Module):
    """Layers run on ``[B * T, in]`` rows: 2-D, but not one row per example."""

    def __init__(self, partial):
        super().__init__()
        self.partial = partial
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):  # [B, T, 3]
        B, T = x.shape[0], x.shape[1]
        h = torch.tanh(self.a(x.reshape(-1, 3)))
        if self.partial:
            return self.b(h.reshape(B, T, 4).mean(1))
        return self.b(h).reshape(B, T, 2).mean(1)


class Masked(nn.Module):
    """An optional argument and a Python branch on it (fx traced it the wrong way)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x, mask=None):
        h = torch.tanh(self.a(x))
        if mask is not None:
            h = h * mask
        return self.b(h)


def _hooked():
    model = _chain(0, [3, 4, 2], [True, True], "tanh")
    model[0].register_forward_hook(lambda mod, inp, out: out * 2)
    return model


def _refusals(device):
    """(model, batch, message) for every kind of model the factored curvature refuses."""
    x = torch.randn(5, 3, dtype=DT, device=device)
    y = torch.tensor([0, 1, 1, 0, 1], device=device)
    xt = torch.randn(5, 2, 3, dtype=DT, device=device)
    return [
        (Norm().eval(), (x, y), "weights/biases of nn.Linear submodules only"),
        (Tied().eval(), (x, y.new_tensor([0, 1, 2, 3, 0])), "tied weights"),
        (Shared().eval(), (x, y), "shared with another module"),
        (_hooked().eval(), (x, y), "without forward hooks"),
        (Seq().eval(), (xt, y), r"layer outputs \[B, out\] with B = 5"),
        (Rows(False).eval(), (xt, y), r"an input \[10, 3\] that is not batch-first"),
        (Rows(True).eval(), (xt, y), r"layer outputs \[B, out\] with B = 5|not batch-first"),
        (Skip(3, 4, 2, True).train(), (x, y), "eval mode"),
        (NoGrad().eval(), (x, y), "first batch equal to autodiff"),
    ]


@pytest.mark.parametrize("build", [linear_hessian, linear_gnvp], ids=["hessian", "gnvp"])
def test_models_outside_the_limits_are_refused_by_name(device, build):
    """Every model outside the limits raises FactoredCurvatureError naming the reason (for
    linear_gnvp at construction)."""
    for model, batch, match in _refusals(device):
        if isinstance(model, NoGrad) and build is linear_gnvp:
            # The captured forward is the module's own: reverse mode sees the no_grad block as
            # autodiff does, so G V agrees; only the Hessian's forward-mode terms differ.
            continue
        model = model.to(DT).to(device)
        params = {k: v.detach() for k, v in model.named_parameters()}
        with pytest.raises(FactoredCurvatureError, match=rf"{build.__name__}\(.*{match}"):
            build(model, F.cross_entropy, params, batch)


def test_influence_falls_back_to_hvp_outside_the_limits(device):
    """Each refused model still gets explicit influence: the hvp path, equal to a bare loss."""
    for model, batch, _ in _refusals(device):
        model = model.to(DT).to(device)
        fm = functional_model(model, F.cross_entropy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # train-mode warning of the bridge
            warnings.simplefilter("ignore", RuntimeWarning)  # layer_grads' own fallback
            got = _scores(fm, fm.params, batch, batch, method="lu")
            ref = _scores(fm.loss, fm.params, batch, batch, method="lu")
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_plain_errors(device):
    """Bad module, unknown keys and empty data are ordinary errors, not refusals."""
    model = _chain(0, [3, 2], [True], "tanh").to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = _batch(0, 4, 3, 2, "ce", device)
    with pytest.raises(TypeError, match=r"linear_hessian\(module=...\)"):
        linear_hessian(lambda x: x, F.cross_entropy, params, batch)
    with pytest.raises(ValueError, match=r"linear_hessian\(params=...\).*unknown") as err:
        linear_hessian(model, F.cross_entropy, {"0.wait": params["0.weight"]}, batch)
    assert not isinstance(err.value, FactoredCurvatureError)
    with pytest.raises(ValueError, match=r"linear_hessian\(data=...\)"):
        linear_hessian(model, F.cross_entropy, params, [])
    with pytest.raises(TypeError, match=r"linear_hessian\(loss_fn=...\)"):
        linear_hessian(model, None, params, batch)


def test_dense_hvp_agrees_in_float32(device):
    """The factored matrix equals hvp(...).dense() to float32 rounding on a float32 model."""
    model = _chain(1, [8, 16, 4], [True, True], "tanh").float().to(device)
    fm = functional_model(model, F.cross_entropy)
    x = torch.randn(64, 8, device=device)
    y = torch.randint(0, 4, (64,), device=device)
    H = linear_hessian(model, F.cross_entropy, fm.params, (x, y))
    ref = hvp(fm.loss, fm.params, (x, y)).dense()
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def _dense_gn(module, loss_fn, params, batch):
    """``mean_i J_i^T A_i J_i`` with ``J_i = jacrev`` of the output, ``A_i = hessian`` of the loss."""
    flat, unravel = ravel(params)
    x, y = batch
    G = 0
    for i in range(len(x)):
        f = lambda p: functional_call(module, {**dict(module.named_parameters()), **unravel(p)},
                                      (x[i:i + 1],))[0]
        J = jacrev(f)(flat)
        A = hessian(lambda o: loss_fn(o[None], y[i:i + 1]))(f(flat))
        G = G + J.T @ A @ J
    return G / len(x)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), depth=st.integers(1, 3),
       widths=st.lists(st.integers(1, 4), min_size=4, max_size=4),
       biases=st.lists(st.booleans(), min_size=3, max_size=3),
       act=st.sampled_from(sorted(ACTS)), loss=st.sampled_from(["ce", "mse"]),
       reverse=st.booleans(), cache=st.booleans(), k=st.integers(1, 3))
def test_linear_gnvp_equals_dense_gauss_newton(device, seed, n, depth, widths, biases, act,
                                               loss, reverse, cache, k):
    """linear_gnvp(V) == V @ mean_i J_i^T A_i J_i (jacrev / hessian), any chain, either loss;
    its dense() (assembled per layer pair) is that matrix."""
    dims = widths[:depth + 1]
    if loss == "ce":
        dims[-1] = max(dims[-1], 2)
    model = _chain(seed, dims, biases, act).to(device)
    loss_fn = F.cross_entropy if loss == "ce" else _mse
    items = list(model.named_parameters())
    params = {key: v.detach() for key, v in (items[::-1] if reverse else items)}
    batch = _batch(seed, n, dims[0], dims[-1], loss, device)
    op = linear_gnvp(model, loss_fn, params, batch, cache=cache)
    G = _dense_gn(model, loss_fn, params, batch)
    V = torch.randn(k, G.shape[0], generator=torch.Generator().manual_seed(seed),
                    dtype=DT).to(device)
    torch.testing.assert_close(op(V), V @ G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.dense(chunk_size=1), G, rtol=1e-10, atol=1e-12)
    assert op.dtype == DT and op.device == V.device and op.dim == G.shape[0]


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), bias_b=st.booleans())
def test_linear_gnvp_on_a_dag_equals_autodiff_gnvp(device, seed, n, bias_b):
    """On the Skip DAG the factored operator equals gnvp's, row by row and as a [P] vector."""
    torch.manual_seed(seed)
    model = Skip(3, 4, 3, bias_b).to(DT).to(device).eval()
    fm = functional_model(model, F.cross_entropy)
    batch = _batch(seed, n, 3, 3, "ce", device)
    out_loss = lambda o, ex: F.cross_entropy(o[None], ex[-1][None])
    ref = gnvp(fm.forward, out_loss, fm.params, batch)
    op = linear_gnvp(model, F.cross_entropy, fm.params, batch)
    V = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(seed),
                    dtype=DT).to(device)
    torch.testing.assert_close(op(V), ref(V), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op(V[1]), op(V[1:2])[0], rtol=0, atol=0)
    torch.testing.assert_close(op(V.T.contiguous().T), op(V), rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size,batch_rows,cache", [(None, None, True), (2, None, False),
                                                         (3, 5, True), (None, 4, False),
                                                         (2, None, 0), (None, 4, 10**9)])
def test_linear_gnvp_batches_chunks_and_merges(device, chunk_size, batch_rows, cache):
    """Batches, chunks, merges, the uncached path and byte budgets give one operator."""
    model = _chain(3, [4, 5, 3], [True, False], "tanh").to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _batch(3, 9, 4, 3, "ce", device)
    V = torch.randn(2, sum(v.numel() for v in params.values()), dtype=DT, device=device)
    whole = linear_gnvp(model, F.cross_entropy, params, (x, y))(V)
    parts = [(x[:2], y[:2]), (x[2:7], y[2:7]), (x[7:], y[7:])]
    op = linear_gnvp(model, F.cross_entropy, params, parts, chunk_size=chunk_size,
                     batch_rows=batch_rows, cache=cache, tapped=linear_tap(model, params))
    torch.testing.assert_close(op(V), whole, rtol=1e-12, atol=1e-14)


class Squeeze(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 1)

    def forward(self, x):
        return self.a(x)[:, 0]


def test_linear_gnvp_output_and_argument_errors(device):
    """A non-[B, C] output is a refusal; bad cache, out_hessian or data are plain errors."""
    sq = Squeeze().to(DT).to(device).eval()
    x = torch.randn(4, 3, dtype=DT, device=device)
    with pytest.raises(FactoredCurvatureError, match=r"linear_gnvp\(module=...\): expected an "
                       r"output \[B, C\], got \[4\]"):
        linear_gnvp(sq, _mse, {k: v.detach() for k, v in sq.named_parameters()}, (x, x[:, 0]))
    model = _chain(0, [3, 2], [True], "tanh").to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = _batch(0, 4, 3, 2, "ce", device)
    with pytest.raises(TypeError, match=r"linear_gnvp\(cache=...\): expected a bool or a "
                       r"byte budget"):
        linear_gnvp(model, F.cross_entropy, params, batch, cache=1.0)
    with pytest.raises(ValueError, match=r"linear_gnvp\(cache=...\): expected a byte budget"):
        linear_gnvp(model, F.cross_entropy, params, batch, cache=-1)
    with pytest.raises(ValueError, match=r"linear_gnvp\(data=...\)"):
        linear_gnvp(model, F.cross_entropy, params, [], cache=False)


def test_linear_gnvp_without_a_target(device):
    """A bare-Tensor example has no target: A is the Hessian of loss_fn(output) alone."""
    model = _chain(2, [3, 4, 2], [True, True], "sigmoid").to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 3, dtype=DT, device=device)
    loss_fn = lambda out: (out.sum(-1) ** 4).mean()
    op = linear_gnvp(model, loss_fn, params, x)
    fm = functional_model(model, loss_fn)
    ref = gnvp(fm.forward, lambda o, ex: loss_fn(o[None]), params, x)
    V = torch.randn(2, op.dim, dtype=DT, device=device)
    torch.testing.assert_close(op(V), ref(V), rtol=1e-10, atol=1e-12)


def test_recipe_gauss_newton_factors_linear_models_and_falls_back(device, monkeypatch):
    """recipes.gauss_newton: linear_gnvp for an eval-mode MLP (no autodiff gnvp call), gnvp
    for a Conv model; the same operator either way."""
    from dattri_fn.app.recipes import gauss_newton

    curv = importlib.import_module("dattri_fn.operators.gauss_newton")  # where gnvp is looked up
    model = _chain(4, [4, 6, 3], [True, True], "tanh").to(device)
    fm = functional_model(model, F.cross_entropy)
    batch = _batch(4, 6, 4, 3, "ce", device)
    V = torch.randn(2, sum(v.numel() for v in fm.params.values()), dtype=DT, device=device)
    ref = gnvp(fm.forward, lambda o, ex: F.cross_entropy(o[None], ex[-1][None]), fm.params,
               batch)(V)
    real = curv.gnvp
    calls = []
    monkeypatch.setattr(curv, "gnvp", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(gauss_newton(fm, F.cross_entropy)(fm.params, batch)(V), ref,
                               rtol=1e-10, atol=1e-12)
    assert not calls
    conv = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Linear(6, 3)).to(DT).to(device)
    fc = functional_model(conv.eval(), F.cross_entropy)
    xc = torch.randn(5, 1, 4, dtype=DT, device=device)
    yc = torch.tensor([0, 1, 2, 1, 0], device=device)
    Vc = torch.randn(2, sum(v.numel() for v in fc.params.values()), dtype=DT, device=device)
    out = gauss_newton(fc, F.cross_entropy)(fc.params, (xc, yc))(Vc)
    assert calls
    torch.testing.assert_close(out, real(fc.forward, lambda o, ex: F.cross_entropy(
        o[None], ex[-1][None]), fc.params, (xc, yc))(Vc), rtol=1e-12, atol=1e-14)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), K=st.integers(2, 5))
def test_cross_entropy_out_hessian_equals_autodiff(device, seed, n, K):
    """diag(p) - p p^T == hessian of F.cross_entropy(o[None], y[None]) w.r.t. o, per row; as
    linear_gnvp's out_hessian it gives the autodiff operator."""
    from dattri_fn.operators.curvature import cross_entropy_out_hessian

    g = torch.Generator().manual_seed(seed)
    out = (3 * torch.randn(n, K, generator=g, dtype=DT)).to(device)
    y = torch.randint(0, K, (n,), generator=g).to(device)
    ref = torch.stack([hessian(lambda o: F.cross_entropy(o[None], y[i:i + 1]))(out[i])
                       for i in range(n)])
    torch.testing.assert_close(cross_entropy_out_hessian(out, y), ref, rtol=1e-12, atol=1e-14)
    model = _chain(seed, [3, 4, K], [True, True], "tanh").to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = _batch(seed, n, 3, K, "ce", device)
    V = torch.randn(2, sum(v.numel() for v in params.values()), generator=g,
                    dtype=DT).to(device)
    closed = linear_gnvp(model, F.cross_entropy, params, batch,
                         out_hessian=cross_entropy_out_hessian)
    torch.testing.assert_close(closed(V), linear_gnvp(model, F.cross_entropy, params, batch)(V),
                               rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match=r"linear_gnvp\(out_hessian=...\): expected None or a "
                       r"callable"):
        linear_gnvp(model, F.cross_entropy, params, batch, out_hessian="ce")


def test_cache_budget_keeps_factors_only_when_they_fit():
    """_keep: True keeps all, False keeps none, an int keeps all iff their bytes fit."""
    from dattri_fn.operators.linear_curvature import _keep

    items = [(torch.zeros(4), {"a": torch.zeros(2)}) for _ in range(3)]  # 24 bytes each
    assert _keep(iter(items), True) == items
    assert _keep(iter(items), False) is None
    assert _keep(iter(items), 72) == items
    assert _keep(iter(items), 71) is None


def test_registration_order_and_train_mode_containers(device):
    """A consumer Linear registered before its producer, and a plain MLP left in training mode
    (only Linear/activation/container modules): both factored, both exact."""

    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.b, self.a = nn.Linear(4, 3), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))

    for model in (Reversed().to(DT).to(device).eval(),
                  _chain(2, [4, 5, 3], [True, True], "tanh").to(device).train()):
        params = {k: v.detach() for k, v in model.named_parameters()}
        batch = _batch(2, 6, 4, 3, "ce", device)
        torch.testing.assert_close(linear_hessian(model, F.cross_entropy, params, batch),
                                   _dense(model, F.cross_entropy, params, batch),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", [(2, 3, 4, 5), (1, 1, 9, 8), (3, 2, 1, 1)])
def test_pair_blocks_every_route_and_sub_chunk(monkeypatch, dims):
    """_pair_block / _activation_block equal their einsum definitions whichever intermediate
    they pick and however the rows are split (the block budget shrunk to force splits)."""
    import dattri_fn.operators.linear_blocks as lc

    dl, dm, kl, km = dims
    g = torch.Generator().manual_seed(sum(dims))
    B = 7
    Ht = torch.randn(B, dl, dm, generator=g, dtype=DT)
    al, am = torch.randn(B, kl, generator=g, dtype=DT), torch.randn(B, km, generator=g, dtype=DT)
    T, gm = torch.randn(B, km, dl, generator=g, dtype=DT), torch.randn(B, dm, generator=g, dtype=DT)
    want = torch.einsum("bjp,bk,bq->jkpq", Ht, al, am)
    want_r = torch.einsum("bp,bqj,bk->pqjk", gm, T, al)
    for block in (2**24, 5, 1):
        monkeypatch.setattr(lc, "_BLOCK", block)
        torch.testing.assert_close(lc._pair_block(Ht, al, am), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lc._activation_block(gm, T, al), want_r, rtol=1e-12,
                                   atol=1e-12)


def test_bare_linear_root_is_factored(device, monkeypatch):
    """A bare nn.Linear (logistic regression) is traced wrapped: exact Hessian and Gauss-Newton,
    the params' own keys and order, and explicit influence without an hvp call."""
    torch.manual_seed(3)
    model = nn.Linear(4, 3).to(DT).to(device).eval()
    params = {k: v.detach() for k, v in reversed(list(model.named_parameters()))}
    batch = _batch(3, 6, 4, 3, "ce", device)
    tap = linear_tap(model, params)
    H = linear_hessian(model, F.cross_entropy, params, batch, tapped=tap)
    torch.testing.assert_close(H, _dense(model, F.cross_entropy, params, batch), rtol=1e-10,
                               atol=1e-12)
    op = linear_gnvp(model, F.cross_entropy, params, batch, tapped=tap)
    torch.testing.assert_close(op.dense(), H, rtol=1e-10, atol=1e-12)  # GN = H for a linear model
    fm = functional_model(model, F.cross_entropy)
    ref = _scores(fm.loss, fm.params, batch, batch, method="lu")
    inf = importlib.import_module("dattri_fn.attribute.influence_inverse")  # builds the curvature
    monkeypatch.setattr(inf, "hvp", lambda *a, **k: (_ for _ in ()).throw(AssertionError("hvp")))
    torch.testing.assert_close(_scores(fm, fm.params, batch, batch, method="lu"), ref,
                               rtol=1e-10, atol=1e-12)


def test_old_module_path_reexports_the_split_modules():
    """linear_curvature re-exports every name that moved to linear_limits / linear_blocks /
    linear_exact / linear_gauss_newton: the same objects, public and private."""
    import dattri_fn.operators.linear_curvature as lc

    moved = {"linear_limits": ["FactoredCurvatureError", "linear_tap", "_checked", "_setup",
                               "_verified", "_CHECK_ROWS"],
             "linear_blocks": ["_BLOCK", "_accumulate", "_pair_block", "_activation_block"],
             "linear_exact": ["linear_hessian", "_probe_terms"],
             "linear_gauss_newton": ["linear_gnvp", "FactoredOperator", "_keep", "_ROW_BLOCK"]}
    for module, names in moved.items():
        mod = importlib.import_module(f"dattri_fn.operators.{module}")
        for name in names:
            assert getattr(lc, name) is getattr(mod, name), (module, name)
    assert lc.linear_gnvp is linear_gnvp and lc.__all__ == [
        "FactoredCurvatureError", "linear_gnvp", "linear_hessian", "linear_tap"]
