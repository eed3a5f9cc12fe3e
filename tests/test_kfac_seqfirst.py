"""K-FAC/EK-FAC on a layer applied to a sequence-first ``[S, B, d]`` tensor with ``S = B``
(issue 14, review of stop 20): the capture engine takes such an input as batch-first, so its
per-example gradients ``sum_t g_t a_t^T`` mix the examples, silently. The factor pass compares
the captured gradients of its first rows with autodiff once; a layer that disagrees takes the
exact Fisher-diagonal block (:mod:`dattri_fn.operators.kfac_diag`) after one warning naming it.
References are float64, built from ``vmap(grad)`` per-example gradients (no capture engine)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute import influence
from dattri_fn.model import functional_model
from dattri_fn.operators.kfac import ekfac_factors, kfac_factors

DT = torch.float64
B = S = 4  # the batch size equals the sequence length: the silent case
D_IN, H, C = 3, 5, 3


class SeqFirst(nn.Module):
    """``x [B, S, d]`` -> sequence-first ``[S, B, d]`` -> tanh(enc) -> mean over S -> head."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(D_IN, H), nn.Linear(H, C)

    def forward(self, x):
        h = torch.tanh(self.enc(x.transpose(0, 1)))  # [S, B, H]: positions first
        return self.head(h.mean(0))


class BatchFirst(SeqFirst):
    """The same function with ``enc`` applied batch-first (what the capture assumes)."""

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x)).mean(1))


def _problem(seed: int, cls=SeqFirst, n: int = 2 * B):
    g = torch.Generator().manual_seed(seed)
    model = cls().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x = torch.randn(n, S, D_IN, generator=g, dtype=DT)
    y = torch.randint(0, C, (n,), generator=g)
    return model, x, y


def _batches(x, y, b: int = B):
    """Batches of ``b`` rows: each batch's sequence-first input is ``[S, b, d]`` (S = b: the
    silent case; else the capture engine refuses it as not batch-first)."""
    return [(x[i:i + b], y[i:i + b]) for i in range(0, len(x), b)]


def _grads(model, params, x, y) -> torch.Tensor:
    """Raveled per-example gradients, vmap(grad) over examples one at a time.  # -> [n, P]"""
    def one(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].flatten(1) for k in params], 1)


def _block(G: torch.Tensor, params, layer: str) -> torch.Tensor:
    """The ``[n, out, in + 1]`` blocks ``[DW | db]`` of ``layer`` from raveled rows ``G``."""
    at, parts = 0, {}
    for k, v in params.items():
        parts[k] = G[:, at:at + v.numel()]
        at += v.numel()
    w = parts[f"{layer}.weight"].reshape(len(G), *params[f"{layer}.weight"].shape)
    return torch.cat([w, parts[f"{layer}.bias"][:, :, None]], 2)


def _dense_inverse(params, damping, kron: dict, diagonal: dict) -> torch.Tensor:
    """blockdiag over params' ravel order: each ``kron[layer]`` (a ``[(out (in+1))^2]`` matrix
    over row-major ``[W | b]``) at its weight/bias indices, each diagonal key
    ``1 / (D + damping)``."""
    off, at = {}, 0
    for k, v in params.items():
        off[k] = at
        at += v.numel()
    M = torch.zeros(at, at, dtype=DT)
    for layer, K in kron.items():
        out, inp = params[f"{layer}.weight"].shape
        idx = torch.tensor([off[f"{layer}.weight"] + o * inp + i if i < inp
                            else off[f"{layer}.bias"] + o
                            for o in range(out) for i in range(inp + 1)])
        M[idx[:, None], idx[None]] = K
    for k, d in diagonal.items():
        sl = torch.arange(off[k], off[k] + d.numel())
        M[sl, sl] = 1 / (d.reshape(-1) + damping)
    return M


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _reference(solver, model, params, x, y, damping):
    """The inverse the factor passes must give, from autodiff gradients: ``enc`` (the
    sequence-first layer) in the diagonal block, ``D = mean_n g_n^2``; ``head`` Kronecker:
    K-FAC ``(G (x) A + damping I)^-1`` from the dense second moments, EK-FAC ``Q diag(1 /
    (Lambda + damping)) Q^T`` with ``Lambda = mean_n (Q_G^T DW_n Q_A)^2`` in the eigenbasis of
    those moments."""
    G = _grads(model, params, x, y)
    n = len(G)
    enc = {k: v for k, v in zip(["enc.weight", "enc.bias"],
                                G[:, :H * D_IN + H].split([H * D_IN, H], 1), strict=True)}
    diagonal = {k: v.square().mean(0) for k, v in enc.items()}
    h = torch.tanh(model.enc(x)).mean(1).detach()  # head's input, per example
    a = torch.cat([h, torch.ones(n, 1, dtype=DT)], 1)
    A = a.T @ a / n
    DW = _block(G, params, "head")  # [n, C, H + 1] = g_n a_n^T
    g = DW[:, :, -1]  # the bias column is g itself
    Gm = g.T @ g / n
    if solver == "kfac":
        K = torch.linalg.inv(torch.kron(Gm, A) + damping * torch.eye(len(A) * len(Gm), dtype=DT))
    else:
        qa, qg = torch.linalg.eigh(A)[1], torch.linalg.eigh(Gm)[1]
        lam = (qg.T @ DW @ qa).square().mean(0)
        Q = torch.kron(qg, qa)
        K = Q @ torch.diag(1 / (lam.reshape(-1) + damping)) @ Q.T
    return G, _dense_inverse(params, damping, {"head": K}, diagonal), diagonal


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
@pytest.mark.parametrize("b", [B, B - 1])
def test_sequence_first_layer_scores_equal_the_autodiff_reference(solver, b):
    """S = g_i^T M g_j and self_score = g_i^T M g_i with g by vmap(grad) and M the
    block-diagonal inverse with the sequence-first layer's exact Fisher diagonal (1e-10);
    batches of b = S rows: wrong before the check (that layer's captured rows mixed the
    examples); b != S: refused by the capture engine before, now the same diagonal block."""
    model, x, y = _problem(0, n=2 * b)
    fm = functional_model(model, F.cross_entropy)
    params = fm.params
    train, test = _batches(x, y, b), _batches(x[:b], y[:b], b)
    m = influence(fm, solver=solver, damping=0.1)
    state = _quiet(m.prepare, params, train)
    G, M, _ = _reference(solver, model, params, x, y, 0.1)
    ref = G @ M @ G[:b].T
    S = _quiet(m.score, params, state, train, test)
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    self_ref = ((G @ M) * G).sum(1)
    torch.testing.assert_close(_quiet(m.self_score, params, state, train), self_ref,
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_one_warning_names_the_layer_and_its_block_is_the_fisher_diagonal(fit):
    """The factor pass warns once, naming 'enc' and why; enc's keys take D = mean_n g_n^2
    (1e-12) and only 'head' stays Kronecker; others='diagonal' gives the same factors with no
    warning; others='error' refuses, naming the layer."""
    model, x, y = _problem(1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f = fit(model, F.cross_entropy, params, _batches(x, y))
    assert len(got) == 1
    text = str(got[0].message)
    for word in ("'enc.weight'", "'enc.bias'", "'enc'", "autodiff", "sequence-first"):
        assert word in text
    _, _, diagonal = _reference("kfac", model, params, x, y, 0.1)
    assert list(f.diagonal) == ["enc.weight", "enc.bias"]
    for k, d in diagonal.items():
        torch.testing.assert_close(f.diagonal[k], d.reshape(f.diagonal[k].shape), rtol=1e-12,
                                   atol=0)
    kron = f.A if hasattr(f, "A") else f.QA
    assert list(kron) == ["head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = fit(model, F.cross_entropy, params, _batches(x, y), others="diagonal")
    for field in ("A", "G") if hasattr(f, "A") else ("QA", "QG", "Lambda"):
        assert all(torch.equal(getattr(f, field)[k], getattr(g, field)[k]) for k in kron)
    assert all(torch.equal(f.diagonal[k], g.diagonal[k]) for k in f.diagonal)
    with pytest.raises(ValueError, match=rf"{fit.__name__}\(others=...\).*'enc'.*autodiff"):
        fit(model, F.cross_entropy, params, _batches(x, y), others="error")


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_batch_first_model_passes_the_check_silently(fit):
    """The same function with enc applied batch-first: no warning, both layers Kronecker, and
    EK-FAC's Lambda = mean_n (Q_G^T DW_n Q_A)^2 of the autodiff blocks (1e-12)."""
    model, x, y = _problem(2, BatchFirst)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = fit(model, F.cross_entropy, params, _batches(x, y))
    assert f.diagonal == {}
    if fit is ekfac_factors:
        G = _grads(model, params, x, y)
        for layer in ("enc", "head"):
            DW = _block(G, params, layer)
            ref = (f.QG[layer].T @ DW @ f.QA[layer]).square().mean(0)
            torch.testing.assert_close(f.Lambda[layer], ref, rtol=1e-12, atol=1e-14)


def test_true_fisher_checks_against_the_drawn_targets():
    """fisher='true': the check's autodiff takes the pass's drawn targets y~ (a batch-first
    model passes it silently), and the sequence-first layer's D = mean_n g_n(y~_n)^2 (1e-12)."""
    drawn = []

    def sampler(out, target, generator):
        y = torch.multinomial(out.softmax(-1), 1, generator=generator)[:, 0]
        drawn.append(y)
        return y

    model, x, y = _problem(3, BatchFirst)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ekfac_factors(model, F.cross_entropy, params, _batches(x, y), fisher="true",
                      sampler=sampler)
    model, x, y = _problem(3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    drawn.clear()
    with pytest.warns(UserWarning, match="'enc'.*autodiff"):
        f = ekfac_factors(model, F.cross_entropy, params, _batches(x, y), fisher="true",
                          sampler=sampler)
    y_tilde = torch.cat(drawn[:2])  # the K-FAC pass's draws, one per batch
    G = _grads(model, params, x, y_tilde)
    ref = G[:, :H * D_IN + H].square().mean(0)
    got = torch.cat([f.diagonal["enc.weight"].reshape(-1), f.diagonal["enc.bias"]])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_expected_fisher_refuses_the_layer_and_checks_its_first_direction(fit):
    """fisher='expected': the check compares J^T b_0 (the first output-Hessian direction) with
    autodiff of <out, b_0> (a batch-first model passes silently); the sequence-first layer
    cannot take the diagonal block (it needs targets) and is refused, naming it."""
    model, x, y = _problem(4, BatchFirst)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(model, F.cross_entropy, params, _batches(x, y), fisher="expected")
    model, x, y = _problem(4)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"{fit.__name__}\(fisher=...\).*'enc'.*autodiff"):
        fit(model, F.cross_entropy, params, _batches(x, y), fisher="expected")


def test_lambda_second_pass_skips_the_moved_layer(monkeypatch):
    """Past the held-entries budget (two passes): the same EK-FAC factors as the replay
    (torch.equal), the moved layer left out of the Lambda pass."""
    from dattri_fn.operators import kfac_stats

    model, x, y = _problem(5)
    params = {k: v.detach() for k, v in model.named_parameters()}
    held = _quiet(ekfac_factors, model, F.cross_entropy, params, _batches(x, y))
    monkeypatch.setattr(kfac_stats, "_HELD_ENTRIES", 0)
    two = _quiet(ekfac_factors, model, F.cross_entropy, params, _batches(x, y))
    for field in ("QA", "QG", "Lambda", "diagonal"):
        a, b = getattr(held, field), getattr(two, field)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


class _Conv(nn.Module):
    """Conv2d (patches at positions) -> tanh -> mean pool -> Linear: checked, batch-first."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3), nn.Linear(3, C)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv2d_and_float32_pass_the_check(dtype):
    """A batch-first Conv2d (its patches are positions: checked) passes in float64 and float32
    (tolerance 10 sqrt(eps) of the gradient scale): no warning, no diagonal block."""
    g = torch.Generator().manual_seed(6)
    model = _Conv().to(dtype).eval()
    x = torch.randn(B, 2, 5, 5, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = ekfac_factors(model, F.cross_entropy, params, (x, y))
    assert f.diagonal == {} and list(f.QA) == ["conv", "head"]


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_a_layer_the_capture_refuses_takes_the_diagonal_block_with_one_warning(fit):
    """Batches of S - 1 rows (the [S, B, d] input is not batch-first): one warning naming
    'enc' and the engine's reason, its D = mean_n g_n^2 (1e-12), 'head' Kronecker; others=
    'error' refuses it, naming it."""
    model, x, y = _problem(7, n=2 * (B - 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = _batches(x, y, B - 1)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f = fit(model, F.cross_entropy, params, data)
    assert len(got) == 1
    text = str(got[0].message)
    for word in ("'enc.weight'", "'enc.bias'", "'enc'", "capture engine cannot take it",
                 "not batch-first"):
        assert word in text
    _, _, diagonal = _reference("kfac", model, params, x, y, 0.1)
    for k, d in diagonal.items():
        torch.testing.assert_close(f.diagonal[k], d.reshape(f.diagonal[k].shape), rtol=1e-12,
                                   atol=0)
    assert list(f.A if hasattr(f, "A") else f.QA) == ["head"]
    with pytest.raises(ValueError, match=rf"{fit.__name__}\(others=...\).*'enc'.*not batch-first"):
        fit(model, F.cross_entropy, params, data, others="error")


class _SeqFirstNorm(SeqFirst):
    """A LayerNorm on the sequence-first ``[S, B, H]`` hidden state (S = B), then the head."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(H)

    def forward(self, x):
        h = torch.tanh(self.enc(x.transpose(0, 1)))  # [S, B, H]
        return self.head(self.norm(h).mean(0))


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_a_sequence_first_layernorm_in_the_diagonal_block_is_exact(fit):
    """Default params: the LayerNorm (diagonal block, captured by the engine where it can) and
    the moved 'enc' read [S, B, H] with S = B; their D = mean_n g_n^2 of vmap(grad) rows
    (1e-12), as the capture's first-rows check sends them to autodiff."""
    model, x, y = _problem(8, _SeqFirstNorm)
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = _quiet(fit, model, F.cross_entropy, params, _batches(x, y))

    def one(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    assert set(f.diagonal) == {"enc.weight", "enc.bias", "norm.weight", "norm.bias"}
    for k, d in f.diagonal.items():
        torch.testing.assert_close(d, g[k].square().mean(0), rtol=1e-12, atol=0)
