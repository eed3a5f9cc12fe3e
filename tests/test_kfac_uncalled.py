"""K-FAC/EK-FAC where a param's gradient is zero because the loss never reads it on some data
(review R1 stop 22, F1 and F2).

F1: the diagonal block's autodiff rows (``vmap(grad)``) of a param the loss never reads are
zeros expanded over the examples (stride 0); ``diagonal_sums`` squared them in place and
crashed (an unused ``nn.Parameter``, a layer called on some batches only). Now ``D = 0`` for
such a param and the per-example Fisher diagonal of a sometimes-called layer is exact.

F2: a Kronecker layer of the state that a test (or train) batch never calls made ``score``
raise the capture engine's bare "fc2: not called in this forward". Its gradient rows there are
zero: they are, where autograd finds that the loss reads none of its params; a weight that
reaches a call as a copy (which the capture also calls "not called") is refused naming the
argument."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dattri_fn.attribute.influence import influence
from dattri_fn.model import functional_model
from dattri_fn.operators.kfac import ekfac_factors, kfac_factors
from dattri_fn.tree import ravel

DT = torch.float64


class _Unused(nn.Module):
    """A declared ``nn.Parameter`` (``temp``) that the forward never reads."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.temp = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


class _Branch(nn.Module):
    """``fc2`` runs only for sequences longer than 3 (``copy``: on shorter ones its params reach
    ``F.linear`` where the capture engine cannot see the call: "not called", yet read)."""

    def __init__(self, copy: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.copy = copy

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if x.shape[1] > 3:
            h = h + torch.tanh(self.fc2(h))
        elif self.copy:
            with torch._C.DisableTorchFunction():  # a call the capture engine cannot see
                h = h + torch.tanh(F.linear(h, self.fc2.weight, self.fc2.bias))
        return self.head(h.mean(1))


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _seq(g, n: int, T: int):
    return torch.randn(n, T, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def _rows(model, batches, keys=None):
    """Per-example gradients ``[N, P]`` (raveled, the model's key order), one backward per
    example: the dense reference."""
    p = {k: v.detach() for k, v in model.named_parameters() if keys is None or k in keys}
    flat, unravel = ravel(p)

    def one(f, x, y):
        return F.cross_entropy(functional_call(model, unravel(f), (x[None],)), y[None])

    return torch.cat([torch.stack([grad(one)(flat, x[i], y[i]) for i in range(len(x))])
                      for x, y in batches]).detach()


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_an_unused_param_has_a_zero_diagonal_block(fit):
    """D_temp = 0 (was a RuntimeError from square_ on stride-0 rows); the Kronecker factors
    equal those of the params without temp (torch.equal)."""
    g = torch.Generator().manual_seed(0)
    model = _seeded(_Unused(), 1)
    x, y = torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = fit(model, F.cross_entropy, params, (x, y), others="diagonal")
    assert list(f.diagonal) == ["temp"] and torch.equal(f.diagonal["temp"], torch.zeros(4, dtype=DT))
    ref = fit(model, F.cross_entropy, {k: v for k, v in params.items() if k != "temp"}, (x, y))
    for field in ("A", "G") if fit is kfac_factors else ("QA", "QG", "Lambda"):
        got, want = getattr(f, field), getattr(ref, field)
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_scores_with_an_unused_param_equal_those_without_it(solver):
    """score/self_score with temp == with the other params (temp's rows are 0, its block
    diagonal), at 1e-12; both nonzero."""
    g = torch.Generator().manual_seed(2)
    model = _seeded(_Unused(), 3)
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 2, (10,), generator=g)
    train, test = [(x[:6], y[:6])], (x[6:], y[6:])
    out = []
    for sel in (None, ["fc.weight", "fc.bias", "head.weight", "head.bias"]):
        fm = functional_model(model, F.cross_entropy, params=sel)
        m = influence(fm, solver=solver, damping=0.1, others="diagonal")
        st = m.prepare(fm.params, train)
        out.append((m.score(fm.params, st, train, test), m.self_score(fm.params, st, train)))
    (S, D), (S0, D0) = out
    assert float(S0.abs().max()) > 1e-2 and float(D0.abs().max()) > 1e-2
    torch.testing.assert_close(S, S0, rtol=0, atol=1e-12)
    torch.testing.assert_close(D, D0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_a_layer_called_on_some_batches_takes_the_exact_diagonal(fit):
    """fc2 runs on the T=5 batches only: it is moved to the diagonal block (one warning naming
    it), and D = (1/N) sum_n g_n^2 of the per-example autodiff gradients at 1e-12 relative."""
    g = torch.Generator().manual_seed(4)
    model = _seeded(_Branch(), 5)
    train = [_seq(g, 6, 5), _seq(g, 5, 3), _seq(g, 4, 5)]
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        f = fit(model, F.cross_entropy, params, train)
    assert len(w) == 1 and "'fc2'" in str(w[0].message)
    keys = ["fc2.weight", "fc2.bias"]
    assert sorted(f.diagonal) == sorted(keys)
    G = _rows(model, train, keys)  # [15, 20]
    ref = G.square().mean(0)
    got = torch.cat([f.diagonal[k].reshape(-1) for k in keys])
    assert float(G[6:11].abs().max()) == 0.0 and float(ref.max()) > 1e-3
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12 * float(ref.max()))


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
@pytest.mark.parametrize(("order", "kw"), [("short_first", {}), ("long_first", {}),
                                           ("short_first", {"chunk_size": 2}),
                                           ("short_first", {"per_layer": True})])
def test_a_test_batch_that_skips_a_kronecker_layer_scores_it_zero(solver, order, kw):
    """Train calls fc2 (a Kronecker layer); a T=3 test batch does not: score = G_tr (C+dI)^-1
    G_te^T and self_score = g^T (C+dI)^-1 g with the dense per-example gradients (fc2's test
    rows 0), at 1e-10 relative; no warning. per_layer: fc2's columns of that batch are 0."""
    g = torch.Generator().manual_seed(6)
    model = _seeded(_Branch(), 7)
    train = [_seq(g, 6, 5), _seq(g, 4, 5)]
    short, long_ = _seq(g, 3, 3), _seq(g, 2, 5)
    test = [short, long_] if order == "short_first" else [long_, short]
    fm = functional_model(model, F.cross_entropy)
    m = influence(fm, solver=solver, damping=0.1, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = m.prepare(fm.params, train)
        S = m.score(fm.params, st, train, test)
        D = m.self_score(fm.params, st, test)
    if kw.get("per_layer"):
        assert sorted(S) == ["fc1", "fc2", "head"] and not S["fc2"][:, :3].any()
        S = sum(S.values())
    assert "fc2" in st.ihvp.eigen[0] and not getattr(st.factors, "diagonal", {})
    Gtr, Gte = _rows(model, train), _rows(model, test)
    ref = Gtr @ st.ihvp(Gte).T
    ref_self = (Gte * st.ihvp(Gte)).sum(1)
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    torch.testing.assert_close(D, ref_self, rtol=0, atol=1e-10 * float(ref_self.abs().max()))


@pytest.mark.parametrize("arg", ["test", "train"])
def test_a_layer_read_where_the_capture_cannot_see_is_refused_naming_the_argument(arg):
    """On T=3 rows fc2's params are read (nonzero gradient) by a call the capture cannot see:
    not taken as zero; if_kfac(test=...) / (train=...) names the batch."""
    g = torch.Generator().manual_seed(8)
    model = _seeded(_Branch(copy=True), 9)
    train, short = [_seq(g, 6, 5)], _seq(g, 3, 3)
    fm = functional_model(model, F.cross_entropy)
    m = influence(fm, solver="kfac", damping=0.1)
    st = _quiet(m.prepare, fm.params, train)
    with pytest.raises(ValueError, match=rf"if_kfac\({arg}=\.\.\.\): expected batches on which "
                       r"the capture engine can take every Kronecker layer .* fc2: not called"):
        if arg == "test":
            m.score(fm.params, st, train, [short])
        else:
            m.self_score(fm.params, st, [short])


def test_vmap_rows_of_an_unused_param_own_their_memory():
    """The autodiff rows of temp are writable zeros [B, 4] (vmap(grad) alone gives stride 0)."""
    from dattri_fn.operators.kfac_diag import diagonal_rows

    g = torch.Generator().manual_seed(10)
    model = _seeded(_Unused(), 11)
    x, y = torch.randn(5, 3, generator=g, dtype=DT), torch.randint(0, 2, (5,), generator=g)
    state = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, {**state, **p}, (xi[None],)), yi[None])

    raw = vmap(grad(one), in_dims=(None, 0, 0))({"temp": state["temp"]}, x, y)["temp"]
    assert raw.stride(0) == 0  # what the fix guards against
    rows = diagonal_rows(model, F.cross_entropy, state, ["temp"], (x,), {}, y)["temp"]
    assert rows.shape == (5, 4) and rows.stride(0) == 4 and not rows.any()
    rows.square_()  # the in-place op diagonal_sums takes


def test_an_ensemble_scores_a_batch_that_skips_a_layer_as_the_mean_of_its_checkpoints():
    """score([p, p2]) on a test set with a T=3 batch == (score(p) + score(p2)) / 2 at 1e-12
    relative (each checkpoint's capture without fc2 is its own)."""
    g = torch.Generator().manual_seed(14)
    model = _seeded(_Branch(), 15)
    train, test = [_seq(g, 6, 5)], [_seq(g, 3, 3), _seq(g, 2, 5)]
    fm = functional_model(model, F.cross_entropy)
    p = fm.params
    p2 = {k: v + 0.05 for k, v in p.items()}
    m = influence(fm, solver="ekfac", damping=0.1)
    S = m.score([p, p2], m.prepare([p, p2], train), train, test)
    mean = sum(m.score(q, m.prepare(q, train), train, test) for q in (p, p2)) / 2
    assert float(mean.abs().max()) > 1e-2
    torch.testing.assert_close(S, mean, rtol=0, atol=1e-12 * float(mean.abs().max()))
