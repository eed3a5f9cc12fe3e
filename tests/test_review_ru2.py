"""Review RU2 (stop 27) fixes: true-Fisher samplers (H2), required solver options (M1), Hessian
products through SDPA (M4), the empirical Fisher from the layer plan (M2), batches of different
trailing shapes (M3), io.save of an InfluenceState (L1)."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dattri_fn import functional_model, io
from dattri_fn.attribute import influence
from dattri_fn.attribute.influence_config import SOLVERS
from dattri_fn.losses import sample_bernoulli, sample_categorical
from dattri_fn.operators import gauss_newton
from dattri_fn.operators.kfac import ekfac_factors
from problems import SeqNet, dense_hessian, dense_per_sample_grads

D = torch.float64


def _mlp(out: int, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, out)).to(D).eval()


def _closed_form(G, Gt, C, damping):
    return G @ torch.linalg.solve(C + damping * torch.eye(C.shape[0], dtype=D), Gt.T)


# ---- H2: fisher="true" draws targets only where the loss says what they are ----

def _user_mse(out, y):
    return (out - y).pow(2).sum(-1).mean()


@pytest.mark.parametrize("loss_fn", [F.mse_loss, _user_mse])
def test_true_fisher_without_sampler_refused_for_regression(loss_fn):
    """A regression loss with fisher='true' and no sampler is refused at construction naming
    influence(sampler=...) and fisher='true' (it drew class indices as regression targets)."""
    fm = functional_model(_mlp(3), loss_fn)
    with pytest.raises(ValueError, match=r"influence\(sampler=\.\.\.\).*fisher='true'"):
        influence(fm, solver="ekfac", damping=0.1, fisher="true")
    x, y = torch.randn(8, 5, dtype=D), torch.randn(8, 3, dtype=D)
    with pytest.raises(ValueError, match=r"ekfac_factors\(sampler=\.\.\.\)"):
        ekfac_factors(fm.module, loss_fn, fm.params, (x, y), fisher="true")
    gauss = functools.partial(lambda out, y, gen: out + torch.randn(out.shape, generator=gen,
                                                                     dtype=out.dtype))
    m = influence(fm, solver="ekfac", damping=0.1, fisher="true", sampler=gauss)
    assert m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (x, y)).isfinite().all()


def test_sample_categorical_refuses_targets_that_are_not_class_labels():
    logits, g = torch.randn(4, 3, dtype=D), torch.Generator().manual_seed(0)
    for bad in (torch.randn(4, 3, dtype=D), torch.randn(4, dtype=D), torch.zeros(4, 1,
                                                                                 dtype=torch.long)):
        with pytest.raises(ValueError, match=r"sample_categorical\(target=\.\.\.\)"):
            sample_categorical(logits, bad, g)
    assert sample_categorical(logits, torch.zeros(4, dtype=torch.long), g).shape == (4,)
    assert sample_categorical(logits, None, g).shape == (4,)  # target ignored, as documented


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(),
                                     functools.partial(F.cross_entropy, label_smoothing=0.1)])
def test_true_fisher_default_on_cross_entropy_is_sample_categorical(loss_fn):
    """Known softmax cross-entropies keep the categorical default: the same factors, bit for bit,
    as sampler=sample_categorical passed by hand."""
    model = _mlp(3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(12, 5, dtype=D), torch.randint(0, 3, (12,))
    a = ekfac_factors(model, loss_fn, params, (x, y), fisher="true", seed=4)
    b = ekfac_factors(model, loss_fn, params, (x, y), fisher="true", seed=4,
                      sampler=sample_categorical)
    assert all(torch.equal(a.Lambda[k], b.Lambda[k]) for k in a.Lambda)


def test_true_fisher_bce_with_logits_draws_bernoulli():
    """One-logit BCE-with-logits draws y ~ Bernoulli(sigmoid(f)) by default (it raised torch's
    raw shape error); the draws' frequency matches sigmoid."""
    fm = functional_model(_mlp(1), F.binary_cross_entropy_with_logits)
    x = torch.randn(16, 5, dtype=D)
    y = (torch.rand(16, 1) > 0.5).to(D)

    def S(**kw):
        m = influence(fm, solver="ekfac", damping=0.1, fisher="true", seed=2, **kw)
        return m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (x[:3], y[:3]))

    assert torch.equal(S(), S(sampler=sample_bernoulli))
    logits = torch.tensor([[-1.0], [0.3], [2.0]], dtype=D).repeat(20000, 1)
    draws = sample_bernoulli(logits, torch.zeros_like(logits), torch.Generator().manual_seed(0))
    freq = draws.view(20000, 3).mean(0)
    assert draws.dtype == D and (freq - torch.sigmoid(logits[:3, 0])).abs().max() < 0.02
    with pytest.raises(ValueError, match=r"sample_bernoulli\(target=\.\.\.\)"):
        sample_bernoulli(logits, torch.zeros(logits.shape[0], dtype=torch.long), None)


# ---- M1: every solver's required options refused at construction ----

def test_every_solver_refuses_missing_required_options_at_construction():
    """Each solver name, constructed with no options: either influence(<arg>=...) refuses it at
    construction or prepare runs (arnoldi without rank raised a raw TypeError in prepare)."""
    fm = functional_model(_mlp(3), F.cross_entropy)
    x, y = torch.randn(10, 5, dtype=D), torch.randint(0, 3, (10,))
    refused = {}
    for solver in SOLVERS:
        try:
            m = influence(fm, solver=solver, damping=0.1)
        except ValueError as err:
            refused[solver] = str(err)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.prepare(fm.params, (x, y))
    assert set(refused) == {"arnoldi", "lissa"}
    assert refused["arnoldi"].startswith("influence(rank=...)")
    assert refused["lissa"].startswith("influence(scale=...)")
    with pytest.raises(ValueError, match=r"influence\(rank=\.\.\.\)"):
        influence(fm, solver="arnoldi", damping=0.1, rank=0)


# ---- M4: Hessian products through scaled_dot_product_attention ----

class _Attn(nn.Module):
    """q/k projections into SDPA with a key mask (CPU picks the flash kernel, which has no
    double backward), mean over tokens, a Linear head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.register_buffer("keep", torch.ones(5, 5, dtype=torch.bool).tril() | torch.eye(5).bool())

    def forward(self, x):
        a = F.scaled_dot_product_attention(self.q(x)[:, None], self.k(x)[:, None], x[:, None],
                                           attn_mask=self.keep)
        return self.head(a[:, 0].mean(1))


@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_hessian_influence_through_sdpa_equals_brute_force(solver):
    torch.manual_seed(1)
    fm = functional_model(_Attn().to(D).eval(), F.cross_entropy)
    x, y = torch.randn(12, 5, 4, dtype=D), torch.randint(0, 3, (12,))
    train, test = (x[:9], y[:9]), (x[9:], y[9:])
    # damping 1: H's eigenvalues lie in [-0.19, 0.45], so H + I is positive definite
    m = influence(fm, solver=solver, damping=1.0, curvature="hessian")
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    with sdpa_kernel(SDPBackend.MATH):  # the reference's own second derivatives
        H = dense_hessian(fm.params, fm.loss, train)
    ref = _closed_form(dense_per_sample_grads(fm.params, fm.loss, train),
                       dense_per_sample_grads(fm.params, fm.loss, test), H, 1.0)
    tol = 1e-12 if solver == "explicit" else 1e-5
    assert float((S - ref).abs().max()) <= tol * float(ref.abs().max())


# ---- M2: the empirical Fisher from the layer plan (a model vmap cannot run) ----

class _NoVmap(nn.Module):
    """A data-dependent branch (.item()): vmap refuses it, a per-example loop runs it."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h if float(x.abs().sum()) > 0 else -h)


def test_fisher_influence_on_a_model_vmap_cannot_run():
    torch.manual_seed(2)
    fm = functional_model(_NoVmap().to(D).eval(), F.cross_entropy)
    x, y = torch.randn(10, 5, dtype=D), torch.randint(0, 3, (10,))
    train, test = (x[:7], y[:7]), (x[7:], y[7:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = influence(fm, solver="explicit", damping=0.1, curvature="fisher")
        S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    G = dense_per_sample_grads(fm.params, fm.loss, train)
    ref = _closed_form(G, dense_per_sample_grads(fm.params, fm.loss, test),
                       G.T @ G / G.shape[0], 0.1)
    assert float((S - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    m = influence(fm.loss, solver="explicit", damping=0.1, curvature="fisher")
    with pytest.raises(ValueError, match=r"fvp\(loss=\.\.\.\).*FunctionalModel"):
        m.prepare(fm.params, train)


# ---- M3: batches of different trailing shapes (dynamic padding) ----

def _seq_batches():
    torch.manual_seed(3)
    out = []
    for T, n in ((3, 4), (3, 2), (5, 3), (3, 3)):
        out.append((torch.randn(n, T, 4, dtype=D), torch.randint(0, 3, (n,))))
    return out


def test_gauss_newton_merges_only_batches_of_one_shape():
    """batch_rows above every batch: batches of T=3 and T=5 are no longer concatenated (which
    raised); the operator equals the example-weighted mean of the per-batch ones."""
    torch.manual_seed(3)
    fm = functional_model(SeqNet(4, 5, 3, True).to(D).eval(), F.cross_entropy)
    batches = _seq_batches()
    V = torch.randn(3, sum(v.numel() for v in fm.params.values()), dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gauss_newton(fm, batch_rows=100)(fm.params, batches)(V)
        ref = sum(b[1].shape[0] * gauss_newton(fm)(fm.params, [b])(V) for b in batches)
    ref = ref / sum(b[1].shape[0] for b in batches)
    assert float((got - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_lissa_on_batches_of_different_shapes_names_the_cause():
    fm = functional_model(SeqNet(4, 5, 3, True).to(D).eval(), F.cross_entropy)
    m = influence(fm, solver="lissa", damping=0.1, scale=10.0)
    with pytest.raises(ValueError, match=r"if_lissa\(train=\.\.\.\): expected batches that "
                                         r"concatenate.*Pad every batch"):
        m.prepare(fm.params, _seq_batches())


# ---- L1: io.save of a prepared InfluenceState ----

def test_io_save_refuses_an_influence_state_before_writing(tmp_path):
    fm = functional_model(_mlp(3), F.cross_entropy)
    x, y = torch.randn(10, 5, dtype=D), torch.randint(0, 3, (10,))
    m = influence(fm, solver="ekfac", damping=0.1)
    state = m.prepare(fm.params, (x, y))
    target = tmp_path / "sub" / "state.pt"
    with pytest.raises(TypeError, match=r"save\(obj=\.\.\.\).*obj\.ihvp.*state\.factors"):
        io.save(state, target)
    assert not (tmp_path / "sub").exists()
    io.save(state.factors, target)  # the documented route still round-trips
    again = m.prepare(fm.params, io.load(target))
    assert torch.equal(m.score(fm.params, again, (x, y), (x, y)),
                       m.score(fm.params, state, (x, y), (x, y)))
