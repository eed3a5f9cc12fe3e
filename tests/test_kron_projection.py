"""Kronecker-factored projection of layer gradients: equal to kron(P_out, P_in) on autograd gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dattri_fn.attribute.gradsim import grad_cos, grad_dot, tracin
from dattri_fn.attribute.trak_features import FeatureConfig, feature_calls
from dattri_fn.model import functional_model
from dattri_fn.transforms.grad import per_sample_grad
from dattri_fn.transforms.kronecker import (
    FACTOR_KINDS,
    KroneckerLayer,
    kronecker_layers,
    make_kronecker_projector,
)
from dattri_fn.transforms.layer_grads import layer_grads_stacked, layer_plan
from problems import SeqNet

DT = torch.float64
seeds = st.integers(0, 2**16)


class EmbNet(nn.Module):
    """Embedding [B, T] -> Linear over tokens -> LayerNorm -> mean -> Linear (no bias)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.mix = nn.Linear(6, 9)
        self.norm = nn.LayerNorm(9)
        self.head = nn.Linear(9, 4, bias=False)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.mix(self.emb(x)))).mean(1))


def _problem(kind: str, seed: int, n: int = 6):
    """(FunctionalModel with CE, batch) of one model kind, float64, seeded."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":  # flat inputs: factored [B, in'] layers, one with a bias, one without
        net = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3, bias=False))
        x = torch.randn(n, 5, generator=g, dtype=DT)
    elif kind == "seq":  # [B, T, D] inputs wide enough to stay factored ([C, B, T, in'])
        net = SeqNet(30, 40, 3, True)
        x = torch.randn(n, 2, 30, generator=g, dtype=DT)
    elif kind == "seq-small":  # [B, T, D] with T^2 (in + out) >= in out: materialised by the engine
        net = SeqNet(3, 5, 3, True)
        x = torch.randn(n, 4, 3, generator=g, dtype=DT)
    else:  # an embedding (dense rows), a LayerNorm (the rest), padding tokens
        net = EmbNet()
        x = torch.randint(0, 11, (n, 5), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return functional_model(net.to(DT).eval(), F.cross_entropy), (x, y)


def _dense_reference(fm, batch, kp, params=None) -> torch.Tensor:
    """Each block = raveled [W | b] (weight as [out, in]) times kron(P_out, P_in); rest @ R."""
    G = per_sample_grad(fm.loss, fm.params if params is None else params, batch)
    offs, o = {}, 0
    for k, v in fm.params.items():
        offs[k] = (o, o + v.numel())
        o += v.numel()
    cols = lambda k: G[:, offs[k][0]:offs[k][1]]
    out = []
    for n, lay in kp.layers.items():
        parts = []
        if lay.weight is not None:
            W = cols(lay.weight)
            parts.append(W.reshape(-1, lay.inp, lay.out).mT if lay.kind in ("conv1d", "embedding")
                         else W.reshape(-1, lay.out, lay.inp))
        if lay.bias is not None:
            parts.append(cols(lay.bias)[..., None])
        block = torch.cat(parts, -1)  # [B, out, in']
        P_in, P_out = kp.matrices(n, DT, "cpu")
        P_in = torch.eye(block.shape[-1], dtype=DT) if P_in is None else P_in
        P_out = torch.eye(block.shape[-2], dtype=DT) if P_out is None else P_out
        out.append(block.flatten(1) @ torch.kron(P_out, P_in))
    if kp.rest:
        R = torch.cat([cols(k) for k, _ in kp.rest], 1)
        out.append(kp.project_rest(R))
    return torch.cat(out, 1)


@given(seed=seeds, kind=st.sampled_from(["mlp", "seq", "seq-small", "emb"]),
       proj=st.sampled_from([2, (3, 2), 4]), pkind=st.sampled_from(FACTOR_KINDS))
def test_equals_the_kronecker_matrix_on_autograd_gradients(seed, kind, proj, pkind):
    """phi_i = kron(P_out, P_in)^T vec([dW_i | db_i]) per layer, dW_i by vmap(grad); rest: R^T g."""
    fm, batch = _problem(kind, seed)
    plan = layer_plan(fm)
    layers, rest = kronecker_layers(plan, fm.params)
    kp = make_kronecker_projector(layers, proj_dim=proj, kind=pkind, seed=seed, rest=rest,
                                  rest_dim=5)
    lg = layer_grads_stacked(plan, {k: v[None] for k, v in fm.params.items()}, batch)
    phi = kp.layer_grads(lg)[0]
    ref = _dense_reference(fm, batch, kp)
    assert phi.shape == (6, kp.proj_dim)
    torch.testing.assert_close(phi, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_sequence_layers_take_the_factored_path():
    """[B, T, D] layers wide enough stay factored: a [C, B, T, in'] pair per layer, none dense."""
    fm, batch = _problem("seq", 0)
    plan = layer_plan(fm)
    lg = layer_grads_stacked(plan, {k: v[None] for k, v in fm.params.items()}, batch)
    assert lg.factors["emb"][0].shape == (1, 6, 2, 31)  # in + 1 bias column
    layers, rest = kronecker_layers(plan, fm.params)
    assert [k for k, _ in rest] == ["norm.weight", "norm.bias"]
    kp = make_kronecker_projector(layers, proj_dim=3, seed=1, rest=rest)
    assert kp.dims == {"emb": 9, "head": 9, "<rest>": 9} and kp.proj_dim == 27


def test_bias_rides_as_the_last_input_column():
    """Bias alone: block = P_out^T db (a = [1]); weight alone: P_out^T dW P_in (no ones column)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 8), nn.Tanh(), nn.Linear(8, 6)).to(DT).eval()
    x, y = torch.randn(5, 7, dtype=DT), torch.randint(0, 6, (5,))
    only_bias = functional_model(net, F.cross_entropy, params=lambda n: n == "2.bias")
    only_weight = functional_model(net, F.cross_entropy, params=lambda n: n == "2.weight")
    for fm, width in ((only_bias, 1), (only_weight, 8)):
        plan = layer_plan(fm)
        layers, rest = kronecker_layers(plan, fm.params)
        assert layers["2"].width == width and rest == ()
        kp = make_kronecker_projector(layers, proj_dim=3, kind="gaussian", seed=4)
        lg = layer_grads_stacked(plan, {k: v[None] for k, v in fm.params.items()}, (x, y))
        torch.testing.assert_close(kp.layer_grads(lg)[0], _dense_reference(fm, (x, y), kp),
                                   rtol=1e-10, atol=1e-12)


def test_expectation_of_r_r_transpose_is_the_identity():
    """E[kron(P_out, P_in) kron(P_out, P_in)^T] = I: mean over 400 seeds within 0.25 of I;
    rademacher rows have unit norm exactly; mask's R R^T is diagonal (entries 0 or scaled)."""
    lay = {"l": KroneckerLayer("w", "b", "linear", 4, 3)}  # [4, 3 + 1] block, k = 2 per side
    for kind in FACTOR_KINDS:
        acc = torch.zeros(16, 16, dtype=DT)
        for s in range(400):
            kp = make_kronecker_projector(lay, proj_dim=2, kind=kind, seed=s)
            P_in, P_out = kp.matrices("l", DT, "cpu")
            R = torch.kron(P_out, P_in)  # [16, 4]
            RRt = R @ R.T
            if kind == "rademacher":
                torch.testing.assert_close(RRt.diagonal(), torch.ones(16, dtype=DT))
            if kind == "mask":
                assert torch.count_nonzero(RRt - torch.diag(RRt.diagonal())) == 0
            acc += RRt
        err = float((acc / 400 - torch.eye(16, dtype=DT)).abs().max())
        assert err < 0.25, (kind, err)


def test_same_seed_same_projection_and_seeds_decorrelate():
    """The seed fixes every factor: same seed, equal matrices; the next seed, other matrices."""
    lay = {"a": KroneckerLayer("w", None, "linear", 9, 7), "b": KroneckerLayer("v", None, "linear", 9, 7)}
    m = lambda s, n: make_kronecker_projector(lay, proj_dim=3, kind="gaussian", seed=s).matrices(
        n, DT, "cpu")
    assert all(torch.equal(u, v) for u, v in zip(m(5, "a"), m(5, "a"), strict=True))
    assert not torch.equal(m(5, "a")[0], m(6, "a")[0])
    assert not torch.equal(m(5, "a")[0], m(5, "b")[0])  # two layers, two draws


def test_errors_name_the_argument():
    """Bad kind / proj_dim / layer spec: errors that name the call and the argument."""
    lay = {"l": KroneckerLayer("w", None, "linear", 4, 3)}
    with pytest.raises(ValueError, match=r"make_kronecker_projector\(kind=...\): expected one of"):
        make_kronecker_projector(lay, proj_dim=2, kind="dense")
    with pytest.raises(ValueError, match=r"make_kronecker_projector\(proj_dim=...\)"):
        make_kronecker_projector(lay, proj_dim=0)
    with pytest.raises(TypeError, match=r"make_kronecker_projector\(layers\['l'\]=...\): expected a "
                                        r"KroneckerLayer"):
        make_kronecker_projector({"l": (4, 3)}, proj_dim=2)


# -- as an option of Grad-Dot / Grad-Cos / TracIn and TRAK's features -------------------------
def _kron_features(fm, params, batch, proj, kind, seed):
    """The reference features: autograd gradients times the dense Kronecker matrices."""
    layers, rest = kronecker_layers(layer_plan(fm), params)
    kp = make_kronecker_projector(layers, proj_dim=proj, kind=kind, seed=seed, rest=rest)
    return _dense_reference(fm, batch, kp, params)


@pytest.mark.parametrize("kind", ["seq", "emb"])
def test_grad_dot_and_cos_with_kronecker_projection(kind):
    """Grad-Dot = <phi_i, phi_j>, Grad-Cos = cosine of the phi's, phi = kron-projected gradients."""
    fm, (x, y) = _problem(kind, 3, n=8)
    train, test = (x, y), (x[:3], y[:3])
    phi_tr = _kron_features(fm, fm.params, train, 3, "rademacher", 7)
    phi_te = _kron_features(fm, fm.params, test, 3, "rademacher", 7)
    S = grad_dot(fm, proj_dim=3, projection="kronecker", seed=7).score(fm.params, (), train, test)
    torch.testing.assert_close(S, phi_tr @ phi_te.T, rtol=1e-10, atol=1e-12)
    C = grad_cos(fm, proj_dim=3, projection="kronecker", seed=7).score(fm.params, (), train, test)
    unit = lambda p: p / p.norm(dim=1, keepdim=True)
    torch.testing.assert_close(C, unit(phi_tr) @ unit(phi_te).T, rtol=1e-10, atol=1e-12)


def test_tracin_with_kronecker_projection_over_checkpoints():
    """TracIn = sum_c lr_c <phi_i(theta_c), phi_j(theta_c)>, the same factors at every checkpoint."""
    fm, (x, y) = _problem("mlp", 1, n=7)
    p2 = {k: v + 0.1 * torch.randn_like(v) for k, v in fm.params.items()}
    m = tracin(fm, lrs=[0.5, 2.0], proj_dim=(3, 2), projection="kronecker", kind="gaussian")
    S = m.score([fm.params, p2], (), (x, y), (x[:2], y[:2]))
    ref = sum(lr * _kron_features(fm, p, (x, y), (3, 2), "gaussian", 0)
              @ _kron_features(fm, p, (x[:2], y[:2]), (3, 2), "gaussian", 0).T
              for lr, p in ((0.5, fm.params), (2.0, p2)))
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-12)
    self_s = m.self_score([fm.params, p2], (), (x, y))
    torch.testing.assert_close(self_s, m.score([fm.params, p2], (), (x, y), (x, y)).diagonal(),
                               rtol=1e-10, atol=1e-12)


def test_kronecker_projection_needs_a_functional_model():
    """A plain loss function has no layers to factor: the error names projection and loss."""
    fm, _ = _problem("mlp", 0)
    with pytest.raises(ValueError, match=r"grad_dot\(projection=...\): expected 'dense' or"):
        grad_dot(fm, proj_dim=2, projection="sparse")
    with pytest.raises(ValueError, match=r"grad_dot\(loss=...\): expected a FunctionalModel"):
        grad_dot(fm.loss, proj_dim=2, projection="kronecker")
    with pytest.raises(ValueError, match=r"grad_dot\(proj_dim=...\): expected"):
        grad_dot(fm, projection="kronecker")


def test_trak_features_with_kronecker_projection():
    """TRAK's phi_c = kron-projected output gradients with seed + c per checkpoint; Q appended."""
    fm, (x, y) = _problem("seq", 2, n=5)
    p2 = {k: v * 0.9 for k, v in fm.params.items()}
    cfg = FeatureConfig(fm.loss, None, layer_plan(fm), list(fm.params), 4, "gaussian", 11, None,
                        None, None, {}, None, projection="kronecker")
    calls = feature_calls("trak", [fm.params, p2], cfg)
    out = calls.packed((x, y))  # [C, b, d + 1]
    for c, p in enumerate((fm.params, p2)):
        torch.testing.assert_close(out[c, :, :-1], _kron_features(fm, p, (x, y), 4, "gaussian",
                                                                  11 + c), rtol=1e-10, atol=1e-12)
    assert calls.d == out.shape[-1] - 1 and bool((out[..., -1] == 1).all())


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # the vmap reference
def test_gpt2_conv1d_layers_with_dict_batches():
    """Stock GPT-2 (HF Conv1D, [in, out] weights, default attention): Grad-Dot with Kronecker
    projection = <phi_i, phi_j>, phi from autograd gradients times kron(P_out, P_in)."""
    t = pytest.importorskip("transformers")
    from dattri_fn.losses import causal_lm_loss

    torch.manual_seed(0)
    gpt2 = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1,
                                          n_head=2, bos_token_id=0, eos_token_id=0)).to(DT).eval()
    ids = torch.randint(0, 50, (5, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    lm = functional_model(gpt2, causal_lm_loss, params=lambda n: ".mlp." in n or ".attn." in n)
    layers, rest = kronecker_layers(layer_plan(lm), lm.params)
    assert {lay.kind for lay in layers.values()} == {"conv1d"} and rest == ()
    phi = _kron_features(lm, lm.params, batch, 3, "gaussian", 1)
    S = grad_dot(lm, proj_dim=3, projection="kronecker", kind="gaussian", seed=1).score(
        lm.params, (), batch, batch)
    torch.testing.assert_close(S, phi @ phi.T, rtol=1e-10, atol=1e-10 * float(S.abs().max()))
