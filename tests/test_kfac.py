"""K-FAC / EK-FAC factors and inverse-Fisher products against dense references."""

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from dattri_fn.operators.kfac import (
    EKFACFactors,
    KFACFactors,
    ekfac_factors,
    ihvp_ekfac,
    ihvp_kfac,
    kfac_factors,
    kfac_tap,
)
from problems import SeqNet

DT = torch.float64


def _problem(kind, seed, n, dim, hidden, classes, T, bias, device):
    """Return (model, layers, batch) for a tanh MLP on [B, D] or SeqNet on [B, T, D], with CE."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.Tanh(),
                              nn.Linear(hidden, classes, bias=bias))
        x = torch.randn(n, dim, generator=g, dtype=DT)
        layers = ["0", "2"]
    else:
        model = SeqNet(dim, hidden, classes, bias)
        x = torch.randn(n, T, dim, generator=g, dtype=DT)
        layers = ["emb", "head"]
    y = torch.randint(0, classes, (n,), generator=g)
    return model.double().to(device), layers, (x.to(device), y.to(device))


def _capture(model, kind, batch):
    """Per example: {layer: (a [T, in], g [T, out])} by an explicit forward and autograd.grad."""
    x, y = batch
    rec = {}
    for n in range(x.shape[0]):
        if kind == "mlp":
            l1, l2 = model[0], model[2]
            z1 = F.linear(x[n], l1.weight, l1.bias)
            h = torch.tanh(z1)
            z2 = F.linear(h, l2.weight, l2.bias)
            names = ("0", "2")
        else:
            l1, l2, ln = model.emb, model.head, model.norm
            z1 = F.linear(x[n], l1.weight, l1.bias)
            h = F.layer_norm(torch.tanh(z1), ln.normalized_shape, ln.weight, ln.bias).mean(0)
            z2 = F.linear(h, l2.weight, l2.bias)
            names = ("emb", "head")
        loss = F.cross_entropy(z2[None], y[n][None])
        g1, g2 = torch.autograd.grad(loss, [z1, z2])
        for name, a, g in ((names[0], x[n], g1), (names[1], h, g2)):
            rec.setdefault(name, []).append((a.detach().reshape(-1, a.shape[-1]),
                                             g.reshape(-1, g.shape[-1])))
    return rec


def _aug(a, bias):
    return torch.cat([a, torch.ones_like(a[:, :1])], 1) if bias else a


def _dense_factors(rec, bias):
    """A = (1/N) sum_n (1/T) sum_t a a^T, G = (1/N) sum_n sum_t g g^T, by loops over examples."""
    A, G = {}, {}
    for layer, items in rec.items():
        A[layer] = sum(_aug(a, bias).T @ _aug(a, bias) / a.shape[0] for a, _ in items) / len(items)
        G[layer] = sum(g.T @ g for _, g in items) / len(items)
    return A, G


def _ravel_index(names, shapes):
    """{layer: (ravel positions, column-major vec([W|b]) positions)} for a params order."""
    sizes = {}
    for layer, (out, inp, _) in shapes.items():
        sizes[f"{layer}.weight"], sizes[f"{layer}.bias"] = out * inp, out
    offset, start = {}, 0
    for k in names:
        offset[k], start = start, start + sizes[k]
    out_idx = {}
    for layer, (out, inp, bias) in shapes.items():
        o, i = torch.meshgrid(torch.arange(out), torch.arange(inp), indexing="ij")
        rav = [offset[f"{layer}.weight"] + (o * inp + i).reshape(-1)]
        col = [(i * out + o).reshape(-1)]
        if bias:
            rav.append(offset[f"{layer}.bias"] + torch.arange(out))
            col.append(inp * out + torch.arange(out))
        out_idx[layer] = (torch.cat(rav), torch.cat(col))
    return start, out_idx


def _blockdiag(names, shapes, blocks, device):
    """Place column-major per-layer [W|b] matrices into the params' ravel layout."""
    P, idx = _ravel_index(names, shapes)
    D = torch.zeros(P, P, dtype=DT, device=device)
    for layer, K in blocks.items():
        rav, col = idx[layer]
        D[rav[:, None], rav[None, :]] = K[col[:, None], col[None, :]]
    return D


def _per_sample_flat(model, loss_fn, params, batch):
    """[N, P] per-sample gradients of the raveled params by torch.func."""
    full = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, ex):
        x, y = ex
        return loss_fn(functional_call(model, {**full, **p}, (x[None],)), y[None])

    g = vmap(grad(loss), in_dims=(None, 0))(params, batch)
    return torch.cat([g[k].reshape(g[k].shape[0], -1) for k in params], 1)


def _tol(K, damping):
    """1e-12 * cond / damping, cond = 1 + |K|_2 / damping: the float64 error bound of a solve."""
    return 1e-12 * (1 + float(torch.linalg.matrix_norm(K, 2)) / damping) / damping


def _params(model, layers, bias, order_seed):
    """Weights (and biases) of the layers, in an order drawn from order_seed."""
    keys = [f"{layer}.{w}" for layer in layers for w in (("weight", "bias") if bias else
                                                         ("weight",))]
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(order_seed))
    mp = dict(model.named_parameters())
    return {keys[i]: mp[keys[i]].detach() for i in perm.tolist()}


def _shapes(model, layers, bias):
    mods = dict(model.named_modules())
    return {lay: (mods[lay].out_features, mods[lay].in_features, bias) for lay in layers}


SIZES = dict(seed=st.integers(0, 2**16), n=st.integers(2, 6), dim=st.integers(1, 3),
             hidden=st.integers(2, 4), classes=st.integers(2, 3), T=st.integers(1, 3),
             bias=st.booleans(), order=st.integers(0, 100))


@given(kind=st.sampled_from(["mlp", "seq"]), **SIZES)
def test_kfac_factors_equal_dense_definition(device, kind, seed, n, dim, hidden, classes, T,
                                             bias, order):
    """A = E_n[(1/T) sum_t [a,1][a,1]^T], G = E_n[sum_t g g^T] from explicitly captured a, g."""
    model, layers, batch = _problem(kind, seed, n, dim, hidden, classes, T, bias, device)
    params = _params(model, layers, bias, order)
    half = n // 2
    data = [tuple(t[:half] for t in batch), tuple(t[half:] for t in batch)]
    f = kfac_factors(model, F.cross_entropy, params, data, chunk_size=2)
    A, G = _dense_factors(_capture(model, kind, batch), bias)
    assert isinstance(f, KFACFactors) and int(f.num_examples) == n
    assert f.param_names == tuple(params) and list(f.A) == layers
    for layer in layers:
        torch.testing.assert_close(f.A[layer], A[layer], atol=1e-12, rtol=0)
        torch.testing.assert_close(f.G[layer], G[layer], atol=1e-12, rtol=0)


@given(kind=st.sampled_from(["mlp", "seq"]), damping=st.sampled_from([1e-2, 0.1, 1.0]),
       **SIZES)
def test_ihvp_kfac_equals_dense_kronecker_inverse(device, kind, seed, n, dim, hidden, classes,
                                                  T, bias, order, damping):
    """ihvp_kfac = (blockdiag_l P_l (A_l kron G_l) P_l^T + damping I)^-1 in ravel layout."""
    model, layers, batch = _problem(kind, seed, n, dim, hidden, classes, T, bias, device)
    params = _params(model, layers, bias, order)
    f = kfac_factors(model, F.cross_entropy, params, batch)
    op = ihvp_kfac(f, damping=damping)
    K = _blockdiag(tuple(params), _shapes(model, layers, bias),
                   {lay: torch.kron(f.A[lay], f.G[lay]) for lay in layers}, device)
    eye = torch.eye(K.shape[0], dtype=DT, device=device)
    ref = torch.linalg.solve(K + damping * eye, eye)
    assert op.dim == K.shape[0] and op.dtype == DT and op.device.type == device.type
    tol = _tol(K, damping)
    torch.testing.assert_close(op.dense(), ref, atol=tol, rtol=0)
    V = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(seed), dtype=DT)
    V = V.to(device)
    torch.testing.assert_close(op(V), V @ ref, atol=10 * tol * float(V.abs().max()), rtol=0)
    torch.testing.assert_close(op(V[1]), op(V[1:2])[0], atol=1e-13, rtol=0)


@given(seed=st.integers(0, 2**16), n_a=st.integers(1, 4), n_g=st.integers(1, 4),
       dim=st.integers(1, 3), out=st.integers(1, 3), bias=st.booleans(),
       damping=st.sampled_from([1e-2, 0.1, 1.0]))
def test_ekfac_and_kfac_exact_on_independent_pairs(device, seed, n_a, n_g, dim, out, bias,
                                                   damping):
    """MSE on all pairs (a_i, g_j), y_ij = W a_i + b - g_j: F = A kron G, so both are exact."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, out, bias=bias)).double().to(device)
    a = torch.randn(n_a, dim, generator=gen, dtype=DT).to(device)
    g = torch.randn(n_g, out, generator=gen, dtype=DT).to(device)
    x = a.repeat_interleave(n_g, 0)
    with torch.no_grad():
        y = model(x) - g.repeat(n_a, 1)
    loss_fn = lambda o, t: 0.5 * ((o - t) ** 2).sum()
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = [(x[: n_g], y[: n_g]), (x[n_g:], y[n_g:])] if n_a > 1 else (x, y)
    J = _per_sample_flat(model, loss_fn, params, (x, y))
    eye = torch.eye(J.shape[1], dtype=DT, device=device)
    Fisher = J.T @ J / J.shape[0]
    exact = torch.linalg.inv(Fisher + damping * eye)
    for op in (ihvp_ekfac(ekfac_factors(model, loss_fn, params, data), damping=damping),
               ihvp_kfac(kfac_factors(model, loss_fn, params, data), damping=damping)):
        torch.testing.assert_close(op.dense(), exact, atol=_tol(Fisher, damping), rtol=0)


def _dense_ekfac(model, kind, layers, params, batch, bias, damping):
    """Dense EK-FAC inverse: Q_A, Q_G by eigh of loop factors, Lambda from torch.func DW_n."""
    A, G = _dense_factors(_capture(model, kind, batch), bias)
    J = _per_sample_flat(model, F.cross_entropy, params, batch)
    shapes = _shapes(model, layers, bias)
    _, idx = _ravel_index(tuple(params), shapes)
    blocks = {}
    for layer in layers:
        out, inp, _ = shapes[layer]
        rav, col = idx[layer]
        DW = torch.zeros(J.shape[0], out * (inp + bias), dtype=DT, device=J.device)
        DW[:, col] = J[:, rav]  # column-major vec([W|b]) of each example's gradient
        Q = torch.kron(torch.linalg.eigh(A[layer])[1], torch.linalg.eigh(G[layer])[1])
        lam = ((DW @ Q) ** 2).mean(0)
        blocks[layer] = (Q / (lam + damping)) @ Q.T
    return _blockdiag(tuple(params), shapes, blocks, J.device)


@given(damping=st.sampled_from([0.1, 1.0]), **(SIZES | {"bias": st.just(True),
                                                         "T": st.integers(2, 3)}))
def test_ihvp_ekfac_with_bias_and_sequence_equals_dense_definition(
        device, seed, n, dim, hidden, classes, T, bias, order, damping):
    """ihvp_ekfac = blockdiag (Q_A kron Q_G) diag(1/(E[(Q^T vec DW_n)^2] + damping)) (..)^T."""
    model, layers, batch = _problem("seq", seed, n, dim, hidden, classes, T, bias, device)
    params = _params(model, layers, bias, order)
    f = ekfac_factors(model, F.cross_entropy, params, batch, chunk_size=3)
    assert isinstance(f, EKFACFactors) and f.Lambda["emb"].shape == (hidden, dim + 1)
    ref = _dense_ekfac(model, "seq", layers, params, batch, bias, damping)
    torch.testing.assert_close(ihvp_ekfac(f, damping=damping).dense(), ref,
                               atol=1e-8 / damping, rtol=0)


@given(seed=st.integers(0, 2**16), n=st.integers(3, 8), dim=st.integers(1, 3),
       hidden=st.integers(2, 4), classes=st.integers(2, 3), bias=st.booleans(),
       damping=st.sampled_from([1e-3, 1e-2, 0.1]))
def test_ekfac_fisher_at_least_as_close_as_kfac(device, seed, n, dim, hidden, classes, bias,
                                                damping):
    """|C_ekfac - F|_F <= |C_kfac - F|_F, C = op^-1 - damping I, F the exact empirical Fisher."""
    model, layers, batch = _problem("mlp", seed, n, dim, hidden, classes, 1, bias, device)
    params = _params(model, layers, bias, 0)
    J = _per_sample_flat(model, F.cross_entropy, params, batch)
    Fisher = J.T @ J / n
    eye = torch.eye(J.shape[1], dtype=DT, device=device)
    assume(float(Fisher.norm()) > 1e-6)
    err = {}
    for name, op in (("ek", ihvp_ekfac(ekfac_factors(model, F.cross_entropy, params, batch),
                                       damping=damping)),
                     ("k", ihvp_kfac(kfac_factors(model, F.cross_entropy, params, batch),
                                     damping=damping))):
        C = torch.linalg.inv(op.dense()) - damping * eye
        err[name] = float((C - Fisher).norm())
    assert err["ek"] <= err["k"] + 1e-9 * (1 + float(Fisher.norm()))


def test_factors_save_load_round_trip(device, tmp_path):
    """torch.save/torch.load of the NamedTuple state gives the same operator."""
    model, layers, batch = _problem("seq", 3, 4, 2, 3, 2, 2, True, device)
    params = _params(model, layers, True, 1)
    f = ekfac_factors(model, F.cross_entropy, params, batch)
    buf = io.BytesIO()
    torch.save(f._asdict(), buf)
    buf.seek(0)
    g = EKFACFactors(**torch.load(buf))
    torch.testing.assert_close(ihvp_ekfac(g, damping=0.1).dense(),
                               ihvp_ekfac(f, damping=0.1).dense(), atol=0, rtol=0)


def test_kfac_errors(device):
    """Unknown layers, params not matching the module or layers, bad damping, non-finite data."""
    model, layers, batch = _problem("seq", 0, 3, 2, 3, 2, 2, True, device)
    params = _params(model, layers, True, 0)
    ce = F.cross_entropy
    with pytest.raises(ValueError, match=r"kfac_factors\(layers=...\).*unknown \['nope'\]"):
        kfac_factors(model, ce, params, batch, layers=["nope"])
    with pytest.raises(ValueError, match=r"kfac_factors\(layers=...\).*'norm' \(LayerNorm\)"):
        kfac_factors(model, ce, params, batch, layers=["norm"])
    with pytest.raises(ValueError, match=r"kfac_factors\(params=...\).*unknown keys \['x'\]"):
        kfac_factors(model, ce, {**params, "x": params["emb.bias"]}, batch)
    with pytest.raises(ValueError, match=r"ekfac_factors\(params=...\).*other keys "
                                         r"\['norm.weight'\]"):
        ekfac_factors(model, ce, {**params, "norm.weight": model.norm.weight.detach()}, batch,
                      others="error")
    with pytest.raises(ValueError, match=r"other keys \['head.weight', 'head.bias'\]"):
        kfac_factors(model, ce, {k: params[k] for k in ("emb.weight", "head.weight",
                                                        "head.bias")}, batch, layers=["emb"],
                     others="error")
    for others in ("error", "diagonal"):
        with pytest.raises(ValueError, match=r"no weight for \['head'\]"):
            kfac_factors(model, ce, {"emb.weight": params["emb.weight"]}, batch,
                         layers=["emb", "head"], others=others)
    with pytest.raises(ValueError, match=r"kfac_factors\(others=...\): expected None, "
                                         r"'diagonal' or 'error', got 'drop'"):
        kfac_factors(model, ce, params, batch, others="drop")
    nan_params = {**params, "emb.weight": params["emb.weight"] * float("nan")}
    with pytest.raises(ValueError, match=r"kfac_factors\(params=...\): expected finite"):
        kfac_factors(model, ce, nan_params, batch)
    bad = (batch[0].clone(), batch[1])
    bad[0][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"kfac_factors\(data=...\): expected finite"):
        kfac_factors(model, ce, params, [batch, bad])
    with pytest.raises(TypeError, match=r"kfac_factors\(data=...\).*one-shot iterator"):
        kfac_factors(model, ce, params, iter([batch]))
    f = kfac_factors(model, ce, params, batch)
    for bad_damping in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"ihvp_kfac\(damping=...\): expected a finite "
                                             r"number > 0"):
            ihvp_kfac(f, damping=bad_damping)
    with pytest.raises(TypeError, match=r"ihvp_ekfac\(factors=...\): expected a EKFACFactors"):
        ihvp_ekfac(f, damping=1.0)
    with pytest.raises(ValueError, match=r"ihvp_kfac\(factors.A=...\): expected finite"):
        ihvp_kfac(f._replace(A={**f.A, "emb": f.A["emb"] * float("inf")}), damping=1.0)


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_reused_tap_gives_identical_factors(device, fit):
    """fit(..., tapped=kfac_tap(...)) == fit(...) exactly; a tap of other layers or of another
    module is refused, naming tapped."""
    model, layers, batch = _problem("seq", 1, 5, 2, 3, 2, 3, True, device)
    params = _params(model, layers, True, 0)
    tap = kfac_tap(model, params)
    ref = fit(model, F.cross_entropy, params, [batch, batch])
    for _ in range(2):
        got = fit(model, F.cross_entropy, params, [batch, batch], tapped=tap)
        for a, b in zip(got, ref, strict=True):
            if isinstance(a, dict):
                for k in a:
                    torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    one = {k: v for k, v in params.items() if k.startswith("emb")}
    with pytest.raises(ValueError, match=r"(e)?kfac_factors\(tapped=...\): expected tap_layers"):
        fit(model, F.cross_entropy, one, batch, tapped=tap)
    with pytest.raises(TypeError, match=r"kfac_tap\(module=...\): expected an nn.Module"):
        kfac_tap(params, params)
    with pytest.raises(ValueError, match=r"kfac_tap\(layers=...\)"):
        kfac_tap(model, params, layers=["nope"])
    other, _, _ = _problem("seq", 2, 5, 2, 3, 2, 3, True, device)
    with pytest.raises(ValueError, match=r"tapped=...\): expected tap_layers.*got a tap of "
                                         r"another module"):
        fit(other, F.cross_entropy, params, batch, tapped=tap)


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
@pytest.mark.parametrize("rows", [1, 4, 100])
def test_batch_rows_merges_batches_without_changing_factors(device, fit, rows):
    """fit(data, batch_rows=r) == fit(data) to 1e-12: merging batches only changes the calls."""
    model, layers, batch = _problem("seq", 4, 9, 2, 3, 2, 3, True, device)
    params = _params(model, layers, True, 0)
    data = [tuple(t[a:b] for t in batch) for a, b in [(0, 2), (2, 5), (5, 6), (6, 9)]]
    ref = fit(model, F.cross_entropy, params, data)
    got = fit(model, F.cross_entropy, params, data, batch_rows=rows)
    for a, b in zip(got, ref, strict=True):
        if isinstance(a, dict):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"factors\(batch_rows=...\): expected an int >= 1"):
        fit(model, F.cross_entropy, params, data, batch_rows=0)


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: weight ``[in, out]``, ``addmm`` on flattened rows."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / 2)
        self.bias = nn.Parameter(torch.randn(nf) / 2)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(
            *x.shape[:-1], self.nf)


class _PatchLinear(nn.Module):
    """A Conv2d written as a Linear on its unfolded patches: the same function."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.lin = nn.Linear(conv.in_channels * 9, conv.out_channels)
        self.lin.weight, self.lin.bias = (nn.Parameter(conv.weight.detach().flatten(1)),
                                          nn.Parameter(conv.bias.detach()))

    def forward(self, x):
        B, _, H, W = x.shape
        z = self.lin(F.unfold(x, 3, padding=1).transpose(1, 2))  # [B, L, out]
        return z.transpose(1, 2).reshape(B, -1, H, W)


@pytest.mark.parametrize("fit, inverse", [(kfac_factors, ihvp_kfac), (ekfac_factors, ihvp_ekfac)])
def test_conv1d_and_conv2d_equal_their_linear_forms(device, fit, inverse):
    """K-FAC/EK-FAC of a HF Conv1D (transposed weight) and of a Conv2d (unfolded patches) equal
    those of the same function written with nn.Linear: the factors, and the inverse in each
    model's own ravel layout (Conv1D's weight block transposed)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    c1 = Conv1D(3, 4).to(DT).to(device)
    lin = nn.Linear(4, 3).to(DT).to(device)
    lin.weight, lin.bias = nn.Parameter(c1.weight.detach().T.clone()), nn.Parameter(c1.bias.detach())
    x = torch.randn(6, 5, 4, generator=g, dtype=DT).to(device)
    y = torch.randint(0, 3, (6,), generator=g).to(device)
    loss = lambda out, t: F.cross_entropy(out.mean(-2), t)
    pairs = []
    for m, keys in ((nn.Sequential(c1), ("0.weight", "0.bias")),
                    (nn.Sequential(lin), ("0.weight", "0.bias"))):
        params = {k: v.detach() for k, v in m.named_parameters() if k in keys}
        pairs.append((fit(m, loss, params, (x, y)), params))
    (fc, pc), (fl, pl) = pairs
    for field in fc._fields[:-4]:  # the per-layer dicts (not names, N, transposed, diagonal)
        for layer in getattr(fc, field):
            torch.testing.assert_close(getattr(fc, field)[layer], getattr(fl, field)[layer])
    assert fc.transposed == ("0",) and fl.transposed == ()
    V = torch.randn(2, 15, generator=g, dtype=DT).to(device)  # rows in Conv1D's layout
    V_lin = torch.cat([V[:, :12].reshape(2, 4, 3).transpose(1, 2).reshape(2, 12), V[:, 12:]], 1)
    out_c, out_l = inverse(fc, damping=0.1)(V), inverse(fl, damping=0.1)(V_lin)
    torch.testing.assert_close(out_c[:, :12].reshape(2, 4, 3).transpose(1, 2).reshape(2, 12),
                               out_l[:, :12], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_c[:, 12:], out_l[:, 12:], rtol=1e-10, atol=1e-12)

    conv = nn.Conv2d(2, 3, 3, padding=1).to(DT).to(device)
    patch = _PatchLinear(conv).to(device)
    xi = torch.randn(4, 2, 5, 5, generator=g, dtype=DT).to(device)
    yi = torch.randint(0, 3, (4,), generator=g).to(device)
    img_loss = lambda out, t: F.cross_entropy(out.mean((2, 3)), t)
    fc = fit(nn.Sequential(conv), img_loss, {k: v.detach() for k, v in
                                             nn.Sequential(conv).named_parameters()}, (xi, yi))
    fp = fit(patch, img_loss, {"lin.weight": patch.lin.weight.detach(),
                               "lin.bias": patch.lin.bias.detach()}, (xi, yi))
    for field in fc._fields[:-4]:  # the per-layer dicts (not names, N, transposed, diagonal)
        torch.testing.assert_close(getattr(fc, field)["0"], getattr(fp, field)["lin"])
    V = torch.randn(2, 57, generator=g, dtype=DT).to(device)
    torch.testing.assert_close(inverse(fc, damping=0.1)(V), inverse(fp, damping=0.1)(V),
                               rtol=1e-10, atol=1e-12)


def test_bare_linear_root(device):
    """A bare nn.Linear (logistic regression) is its own K-FAC layer, keys 'weight'/'bias'."""
    torch.manual_seed(0)
    m = nn.Linear(4, 3).to(DT).to(device)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 4, generator=g, dtype=DT).to(device), torch.randint(0, 3, (7,), generator=g)
    params = {k: v.detach() for k, v in m.named_parameters()}
    wrapped = nn.Sequential(m)
    f = ekfac_factors(m, F.cross_entropy, params, (x, y.to(device)))
    ref = ekfac_factors(wrapped, F.cross_entropy, {f"0.{k}": v for k, v in params.items()},
                        (x, y.to(device)))
    assert list(f.QA) == [""] and f.param_names == ("weight", "bias")
    torch.testing.assert_close(ihvp_ekfac(f, damping=0.1).dense(),
                               ihvp_ekfac(ref, damping=0.1).dense(), rtol=1e-12, atol=1e-14)


# -- true Fisher: targets drawn from the model ---------------------------------------------
def _mlp_batch(seed, n=8, dim=3, hidden=4, classes=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(DT)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=DT)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, {k: v.detach() for k, v in model.named_parameters()}, x, y


@given(seed=st.integers(0, 2**16), draw_seed=st.integers(0, 2**16))
def test_true_fisher_factors_are_the_empirical_factors_of_the_drawn_labels(seed, draw_seed):
    """fisher="true": factors = empirical factors on y' ~ softmax(f(x)), drawn batch by batch
    from one Generator(seed) that restarts every pass (EK-FAC's two passes see the same y')."""
    from dattri_fn.losses import sample_categorical

    model, params, x, y = _mlp_batch(seed)
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    gen = torch.Generator().manual_seed(draw_seed)
    with torch.no_grad():
        drawn = [(b, sample_categorical(model(b), t, gen)) for b, t in data]
    for make in (kfac_factors, ekfac_factors):
        true = make(model, F.cross_entropy, params, data, fisher="true", seed=draw_seed)
        emp = make(model, F.cross_entropy, params, drawn)
        for a, b in zip(true, emp, strict=True):
            for k in a if isinstance(a, dict) else ():
                torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)


def test_true_fisher_output_factor_approaches_its_expectation():
    """Softmax regression: G_true = mean_n (p_n - e_{y_n})(..)^T with y_n ~ p_n tends to
    E = mean_x diag(p) - p p^T; each entry lies in [-1, 1], so with n = 30000 draws Hoeffding
    gives |G_true - E| <= sqrt(2 ln(2 K^2 / 1e-6) / n) = 0.034 with probability 1 - 1e-6 (K = 3);
    the empirical G of fixed labels is farther than that."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(2, 3, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 2, generator=g, dtype=DT))
    x0 = torch.randn(3, 2, generator=g, dtype=DT)
    x = x0.repeat(10000, 1)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    params = {"weight": model.weight.detach()}
    G = kfac_factors(model, F.cross_entropy, params, (x, y), fisher="true", seed=3).G[""]
    p = model(x0).softmax(-1).detach()
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    bound = (2 * torch.log(torch.tensor(2 * 9 / 1e-6)) / x.shape[0]).sqrt()
    assert float((G - expected).abs().max()) <= float(bound)
    G_emp = kfac_factors(model, F.cross_entropy, params, (x, y)).G[""]
    assert float((G_emp - expected).abs().max()) > 3 * float(bound)


def test_causal_lm_sample_draws_each_kept_next_token_and_keeps_the_rest():
    """causal_lm_loss.sample: y'_t ~ softmax(logits_{t-1}) where y_t != -100; y'_0 and -100 kept
    (peaked logits make the draw the argmax)."""
    from dattri_fn.losses import causal_lm_loss

    g = torch.Generator().manual_seed(0)
    peak = torch.randint(0, 7, (2, 5), generator=g)
    logits = 60.0 * F.one_hot(peak, 7).to(DT)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 0, -100, -100, -100]])
    drawn = causal_lm_loss.sample(logits, labels, torch.Generator().manual_seed(1))
    want = labels.clone()
    want[:, 1:] = torch.where(labels[:, 1:] != -100, peak[:, :-1], labels[:, 1:])
    assert torch.equal(drawn, want)


def test_fisher_settings_are_checked():
    """A bad fisher name, seed or sampler is named."""
    model, params, x, y = _mlp_batch(0)
    with pytest.raises(ValueError, match=r"ekfac_factors\(fisher=...\): expected 'empirical', "
                                         r"'true' or 'expected', got 'exact'"):
        ekfac_factors(model, F.cross_entropy, params, (x, y), fisher="exact")
    with pytest.raises(TypeError, match=r"kfac_factors\(sampler=...\): expected None or a "
                                        r"callable"):
        kfac_factors(model, F.cross_entropy, params, (x, y), fisher="true", sampler=3)
    with pytest.raises(ValueError, match=r"kfac_factors\(seed=...\)"):
        kfac_factors(model, F.cross_entropy, params, (x, y), fisher="true", seed=-1)


# -- the factored Fisher as an operator with its closed-form inverse ----------------------
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["kfac", "ekfac"]),
       damping=st.sampled_from([0.1, 1.0]), bias=st.booleans())
def test_kfac_operator_is_the_factored_fisher_and_inverts_in_closed_form(seed, kind, damping,
                                                                         bias):
    """kfac_operator(f).dense() = blockdiag A (x) G (or Q diag(Lambda) Q^T); its .inverse(d) =
    (F + d I)^-1 = ihvp_kfac/ekfac; ihvp_explicit and solvers.explicit take the closed form."""
    from dattri_fn import solvers
    from dattri_fn.operators import kfac_operator
    from dattri_fn.solve import ihvp_explicit

    model, params, x, y = _mlp_batch(seed)
    if not bias:
        params = {k: v for k, v in params.items() if k.endswith("weight")}
    make = kfac_factors if kind == "kfac" else ekfac_factors
    f = make(model, F.cross_entropy, params, (x, y))
    op = kfac_operator(f)
    Fd = op.dense()
    torch.testing.assert_close(Fd, Fd.T, rtol=0, atol=1e-12)
    eye = torch.eye(op.dim, dtype=DT)
    exact = torch.linalg.inv(Fd + damping * eye)
    ref = (ihvp_kfac if kind == "kfac" else ihvp_ekfac)(f, damping=damping).dense()
    for inv in (op.inverse(damping), ihvp_explicit(op, damping=damping),
                solvers.explicit()(op, damping)):
        torch.testing.assert_close(inv.dense(), exact, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(inv.dense(), ref, rtol=1e-10, atol=1e-12)
    if kind == "kfac":  # the forward product against the Kronecker definition, layer by layer
        start = 0
        for layer in ("0", "2"):
            A, G = f.A[layer], f.G[layer]
            out, inp = G.shape[0], A.shape[0] - int(bias)
            K = torch.kron(G, A)  # row-major vec of [out, in(+1)]
            idx = torch.arange(out * A.shape[0]).reshape(out, A.shape[0])
            w = idx[:, :inp].reshape(-1)
            cols = torch.cat([w, idx[:, inp]]) if bias else w
            n = cols.numel()
            block = Fd[start:start + n, start:start + n]
            torch.testing.assert_close(block, K[cols][:, cols], rtol=1e-10, atol=1e-12)
            start += n
    assert (op + damping).inverse is None  # a sum has no closed form: solvers go iterative


# -- fisher="expected": the exact expectation over the model's outputs --------------------
@given(kind=st.sampled_from(["mlp", "seq"]), **SIZES)
def test_expected_fisher_is_the_class_weighted_sum_of_label_statistics(
        device, kind, seed, n, dim, hidden, classes, T, bias, order):
    """fisher="expected": G = E_n sum_c p_nc g_nc g_nc^T and Lambda = E_n sum_c p_nc
    (Q_G^T DW_nc Q_A)^2, g_nc / DW_nc those of label c; A is the empirical A (counted once)."""
    model, layers, batch = _problem(kind, seed, n, dim, hidden, classes, T, bias, device)
    params = _params(model, layers, bias, order)
    x = batch[0]
    with torch.no_grad():
        p = model(x).softmax(-1)  # [n, C]
    recs = [_capture(model, kind, (x, torch.full((n,), c, device=device)))
            for c in range(classes)]
    half = n // 2
    data = [tuple(t[:half] for t in batch), tuple(t[half:] for t in batch)]
    kf = kfac_factors(model, F.cross_entropy, params, data, chunk_size=2, fisher="expected")
    ek = ekfac_factors(model, F.cross_entropy, params, data, fisher="expected")
    A_emp, _ = _dense_factors(recs[0], bias)
    for layer in layers:
        G = sum(p[i, c] * g.T @ g for c in range(classes)
                for i, (_, g) in enumerate(recs[c][layer])) / n
        torch.testing.assert_close(kf.A[layer], A_emp[layer], atol=1e-12, rtol=0)
        torch.testing.assert_close(kf.G[layer], G, atol=1e-12, rtol=0)
        qa, qg = ek.QA[layer], ek.QG[layer]
        L = sum(p[i, c] * (qg.T @ g.T @ _aug(a, bias) @ qa) ** 2 for c in range(classes)
                for i, (a, g) in enumerate(recs[c][layer])) / n
        torch.testing.assert_close(ek.Lambda[layer], L, atol=1e-12, rtol=0)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), bias=st.booleans())
def test_expected_kfac_block_is_input_moment_kron_expected_output_gauss_newton(seed, n, bias):
    """Per layer l, kfac_operator(kfac_factors(fisher="expected")) = E[a a^T] (x) E[J_l^T H J_l],
    J_l = d logits / d z_l by jacrev and H = diag(p) - p p^T, both formed densely."""
    from dattri_fn.operators import kfac_operator

    model, params, x, y = _mlp_batch(seed, n=n)
    if not bias:
        params = {k: v for k, v in params.items() if k.endswith("weight")}
    f = kfac_factors(model, F.cross_entropy, params, (x, y), fisher="expected")
    Fd = kfac_operator(f).dense()
    l0, l2 = model[0], model[2]
    start = 0
    for layer in ("0", "2"):
        A = torch.zeros(3 + bias if layer == "0" else 4 + bias, 3 + bias if layer == "0"
                        else 4 + bias, dtype=DT)
        G = 0
        for i in range(n):
            z1 = F.linear(x[i], l0.weight, l0.bias)
            head = lambda z1_: F.linear(torch.tanh(z1_), l2.weight, l2.bias)  # noqa: E731
            if layer == "0":
                a, J = x[i], torch.func.jacrev(head)(z1)
            else:
                a, J = torch.tanh(z1), torch.eye(3, dtype=DT)
            a = torch.cat([a, a.new_ones(1)]) if bias else a
            p = head(z1).softmax(-1)
            H = torch.diag(p) - torch.outer(p, p)
            A = A + torch.outer(a, a) / n
            G = G + J.T @ H @ J / n
        torch.testing.assert_close(f.G[layer], G, rtol=0, atol=1e-12)
        torch.testing.assert_close(f.A[layer], A, rtol=0, atol=1e-12)
        K = torch.kron(G, A)  # row-major vec of [out, in(+1)]
        out, inp = G.shape[0], A.shape[0] - int(bias)
        idx = torch.arange(out * A.shape[0]).reshape(out, A.shape[0])
        cols = torch.cat([idx[:, :inp].reshape(-1), idx[:, inp]]) if bias else idx.reshape(-1)
        m = cols.numel()
        torch.testing.assert_close(Fd[start:start + m, start:start + m], K[cols][:, cols],
                                   rtol=0, atol=1e-10)
        start += m


@given(seed=st.integers(0, 2**16), n=st.integers(2, 6), out=st.integers(1, 3),
       bias=st.booleans())
def test_expected_kfac_of_linear_regression_is_its_exact_hessian(seed, n, out, bias):
    """A GLM with F.mse_loss (H = (2/D) I per example): K-FAC of the expected Fisher and EK-FAC
    both equal the exact Hessian = Gauss-Newton of the mean loss (torch.func.hessian)."""
    from dattri_fn.operators import kfac_operator
    from problems import dense_hessian

    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, out, bias=bias).to(DT)
    with torch.no_grad():
        for v in model.parameters():
            v.copy_(torch.randn(v.shape, generator=g, dtype=DT))
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randn(n, out, generator=g, dtype=DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = lambda p, ex: F.mse_loss(functional_call(model, p, (ex[0][None],)), ex[1][None])  # noqa: E731
    H = dense_hessian(params, loss, (x, y))
    for make in (kfac_factors, ekfac_factors):
        f = make(model, F.mse_loss, params, [(x[:1], y[:1]), (x[1:], y[1:])], fisher="expected")
        torch.testing.assert_close(kfac_operator(f).dense(), H, rtol=0, atol=1e-10)


def test_softmax_regression_expected_kfac_is_the_exact_gauss_newton_of_one_input():
    """One-layer softmax model, every example the same input a: K-FAC expected = a a^T (x)
    (diag(p) - p p^T) = the exact Hessian (= Gauss-Newton) of the mean cross-entropy; the
    empirical and the true Fisher are not."""
    from dattri_fn.operators import kfac_operator
    from problems import dense_hessian

    g = torch.Generator().manual_seed(1)
    model = nn.Linear(3, 4).to(DT)
    with torch.no_grad():
        for v in model.parameters():
            v.copy_(torch.randn(v.shape, generator=g, dtype=DT))
    x = torch.randn(1, 3, generator=g, dtype=DT).repeat(5, 1)
    y = torch.randint(0, 4, (5,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = lambda p, ex: F.cross_entropy(functional_call(model, p, (ex[0][None],)), ex[1][None])  # noqa: E731
    H = dense_hessian(params, loss, (x, y))
    dense = lambda fisher: kfac_operator(kfac_factors(model, F.cross_entropy, params, (x, y),  # noqa: E731
                                                      fisher=fisher)).dense()
    torch.testing.assert_close(dense("expected"), H, rtol=0, atol=1e-10)
    for fisher in ("empirical", "true"):
        assert float((dense(fisher) - H).abs().max()) > 1e-3


def test_expected_fisher_refuses_unknown_losses_and_sequence_logits():
    """fisher="expected" needs a known output Hessian: another loss_fn and [B, T, C] logits are
    refused, naming fisher and the loss."""
    model, params, x, y = _mlp_batch(0)
    custom = lambda out, t: F.cross_entropy(out, t) ** 2  # noqa: E731
    with pytest.raises(ValueError, match=r"kfac_factors\(fisher=...\): expected 'empirical' or "
                                         r"'true' for this loss_fn .*got 'expected' with loss_fn "
                                         r".*<lambda>"):
        kfac_factors(model, custom, params, (x, y), fisher="expected")
    seq = SeqNet(3, 4, 3, True).to(DT)
    seq.forward = lambda x_: seq.head(torch.tanh(seq.emb(x_)))  # logits per token
    sp = {k: v.detach() for k, v in seq.named_parameters() if k.startswith(("emb", "head"))}
    xs = torch.randn(2, 4, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"ekfac_factors\(fisher=...\): expected 'expected' on "
                                         r"\[B, C\] logits .*got output shape \[2, 4, 3\]"):
        ekfac_factors(seq, F.cross_entropy, sp,
                      (xs, torch.zeros(2, 4, dtype=torch.long)), fisher="expected")
