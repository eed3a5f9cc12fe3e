"""K-FAC/EK-FAC on a tied weight (issue 16): one tensor W [V, d] read by an Embedding and by a
Linear head (GPT-2's wte = lm_head). Pooled factors, EK-FAC's eigenvalue correction and the
scores against brute-force float64 references built without the capture engine."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute import influence
from dattri_fn.model import functional_model
from dattri_fn.operators.kfac import ekfac_factors, ihvp_ekfac, ihvp_kfac, kfac_factors, kfac_tap
from dattri_fn.transforms.capture import check, probe_shapes, tap, weight_grad

DT = torch.float64
V, D, T = 7, 3, 5


def _rows(out, labels):
    """Per-sequence sum of token cross-entropies, -100 ignored.  # [B, T, V], [B, T] -> [B]"""
    keep = labels >= 0
    lp = out.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return -(lp * keep).sum(1)


def lm_loss(out, labels):
    return _rows(out, labels).sum()


lm_loss.per_example = _rows


class TiedLM(nn.Module):
    """emb (V -> d) -> tanh(fc) -> head (d -> V), head.weight IS emb.weight."""

    def __init__(self, head_bias: bool = False, padding_idx: int | None = None):
        super().__init__()
        self.emb, self.fc = nn.Embedding(V, D, padding_idx=padding_idx), nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=head_bias)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.fc(self.emb(idx))))


def _problem(seed: int, head_bias: bool = False, padding_idx: int | None = None):
    """A float64 TiedLM, ids [8, T] with some labels ignored (-100)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TiedLM(head_bias, padding_idx).double().eval()
    with torch.no_grad():  # larger weights: gradients of both uses well above rounding
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    ids = torch.randint(0, V, (8, T), generator=g)
    labels = torch.randint(0, V, (8, T), generator=g)
    labels[1, 3:] = -100
    labels[4, 0] = -100
    return model, ids, labels


def _parts(model, ids, labels):
    """Per-position h (head input), g = dloss/dlogits, u = dloss/d(embedding output), by
    autograd on a hand-written forward (no capture engine).  # [B, T, d], [B, T, V], [B, T, d]"""
    W = model.emb.weight.detach()
    e = W[ids].clone().requires_grad_(True)
    h = torch.tanh(F.linear(e, model.fc.weight.detach(), model.fc.bias.detach()))
    logits = h @ W.T
    u, g = torch.autograd.grad(_rows(logits, labels).sum(), [e, logits])
    if model.emb.padding_idx is not None:  # F.embedding passes no gradient to that row
        u = u.masked_fill((ids == model.emb.padding_idx)[..., None], 0)
    return h.detach(), g, u


def _per_example_grads(model, ids, labels) -> dict:
    """vmap(grad) of each sequence's loss w.r.t. the params (emb.weight holds both uses)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, y):
        return _rows(torch.func.functional_call(model, p, (x[None],)), y[None]).sum()

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, ids, labels)


def _blocks(grads: dict) -> dict:
    """Each factor layer's per-example [B, out, in(+1)] block (bias as the last column)."""
    return {"emb": grads["emb.weight"],
            "fc": torch.cat([grads["fc.weight"], grads["fc.bias"][..., None]], -1)}


def _dense_scores(factors, damping, train_blocks, test_blocks):
    """sum_l <Q_G^T M_i Q_A, (Q_G^T M_j Q_A) / (Lambda + damping)>: the dense EK-FAC inverse in
    its eigenbasis applied to dense per-example gradients.  # -> [n_train, n_test]"""
    S = 0
    for layer in factors.QA:
        qa, qg, lam = factors.QA[layer], factors.QG[layer], factors.Lambda[layer]
        Ri = qg.T @ train_blocks[layer] @ qa
        Rj = qg.T @ test_blocks[layer] @ qa / (lam + damping)
        S = S + torch.einsum("ioc,joc->ij", Ri, Rj)
    return S


def _close(S, R, tol=1e-10):
    torch.testing.assert_close(S, R, rtol=0, atol=tol * float(R.abs().max()))


def test_tied_capture_records_both_uses_and_their_sum_is_the_gradient():
    """tap(tied=True): weight_grad(emb) + weight_grad(head) == d loss_n / dW (vmap(grad)) at
    1e-12; without tied=True both members are named problems."""
    model, ids, labels = _problem(0)
    state = {k: v.detach() for k, v in model.named_parameters()}
    assert set(check(tap(model, ["emb", "head"]), state, ids)) == {"emb", "head"}
    tapped = tap(model, ["emb", "fc", "head"], tied=True)
    assert tapped.tied == (("emb", "head"),)
    assert check(tapped, state, ids) == {}
    _, acts = tapped(state, {n: torch.zeros((), dtype=DT) for n in tapped.layers}, ids)
    probes = {n: torch.zeros(s, dtype=DT) for n, s in probe_shapes(tapped, acts).items()}

    def total(pr):
        out, acts = tapped(state, pr, ids)
        return lm_loss(out, labels), acts

    g, acts = torch.func.grad(total, has_aux=True)(probes)
    got = sum(weight_grad(tapped.specs[m], acts[m], g[m], (V, D)) for m in ("emb", "head"))
    ref = _per_example_grads(model, ids, labels)["emb.weight"]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("pad", [None, 2])
def test_pooled_factors_equal_brute_force_sums(pad):
    """A = (1/N) sum_n (1/2T) (sum_t h h^T + sum_t u u^T), G = (1/N) sum_n (sum_t g g^T +
    sum_t e_id e_id^T) over both uses of the tied W (1e-12), e_id = 0 and u = 0 where the
    embedding's padding_idx takes no gradient."""
    model, ids, labels = _problem(1, padding_idx=pad)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batches = [(ids[:5], labels[:5]), (ids[5:], labels[5:])]
    kf = kfac_factors(model, lm_loss, params, batches)
    assert list(kf.A) == ["emb", "fc"] and kf.param_names == ("emb.weight", "fc.weight", "fc.bias")
    h, g, u = _parts(model, ids, labels)
    N = ids.shape[0]
    A = (torch.einsum("bti,btj->ij", h, h) + torch.einsum("bti,btj->ij", u, u)) / (2 * T * N)
    onehot = F.one_hot(ids, V).to(DT)
    if pad is not None:
        assert bool((ids == pad).any())
        onehot[..., pad] = 0
    G = (torch.einsum("bti,btj->ij", g, g) + torch.einsum("bti,btj->ij", onehot, onehot)) / N
    _close(kf.A["emb"], A, 1e-12)
    _close(kf.G["emb"], G, 1e-12)


@pytest.mark.parametrize("pad", [None, 2])
def test_ekfac_correction_is_the_fisher_diagonal_in_the_pooled_basis(pad):
    """Lambda = diag(Q^T F Q) with F from vmap(grad) per-example gradients of the tied W (both
    uses), Q = Q_A (x) Q_G the eigenvectors of the pooled factors (1e-10)."""
    model, ids, labels = _problem(2, padding_idx=pad)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ef = ekfac_factors(model, lm_loss, params, [(ids[:3], labels[:3]), (ids[3:], labels[3:])])
    kf = kfac_factors(model, lm_loss, params, (ids, labels))
    for layer in ("emb", "fc"):
        qa, qg = ef.QA[layer], ef.QG[layer]
        for Q, M in ((qa, kf.A[layer]), (qg, kf.G[layer])):  # eigenvectors of the pooled factors
            R = Q.T @ M @ Q
            off = R - torch.diag(R.diagonal())
            assert float(off.abs().max()) <= 1e-10 * float(M.abs().max())
        blocks = _blocks(_per_example_grads(model, ids, labels))[layer]
        ref = (qg.T @ blocks @ qa).square().mean(0)
        _close(ef.Lambda[layer], ref)


@pytest.mark.filterwarnings("ignore:layer_grads")  # the raveled test side: emb by vmap(grad)
@pytest.mark.parametrize("chunk,l2", [(None, 0.0), (3, 0.0), (None, 0.01)])
def test_influence_ekfac_scores_equal_the_dense_reference(chunk, l2):
    """influence(solver='ekfac', l2=...) score == sum_l <Q^T (DW_i + 2 l2 W), (Q^T DW_j) /
    (Lambda + damping + 2 l2)> from vmap(grad) gradients (1e-10), the layer-by-layer path and
    the raveled ihvp alike; per-layer scores sum to it; self_score is its diagonal (l2 = 0)."""
    model, ids, labels = _problem(3)
    fm = functional_model(model, lm_loss)
    assert list(fm.params) == ["emb.weight", "fc.weight", "fc.bias"]
    train = [(ids[:4], labels[:4]), (ids[4:], labels[4:])]
    test = (ids[:3].flip(1), labels[:3])
    damping = 0.05
    m = influence(fm, solver="ekfac", damping=damping, chunk_size=chunk, l2=l2)
    state = m.prepare(fm.params, train)
    Gtr = _per_example_grads(model, ids, labels)
    Gte = _per_example_grads(model, *test)
    if l2:  # the training objective's gradient, 2 l2 p added (the test side stays the loss)
        Gtr = {k: v + 2 * l2 * fm.params[k] for k, v in Gtr.items()}
    # the l2 term's curvature 2 l2 I joins the damping (F + 2 l2 I + damping I)
    ref = _dense_scores(state.factors, damping + 2 * l2, _blocks(Gtr), _blocks(Gte))
    S = m.score(fm.params, state, train, test)
    _close(S, ref)
    rav = lambda G: torch.cat([G[k].flatten(1) for k in fm.params], 1)  # noqa: E731
    _close(rav(Gtr) @ state.ihvp(rav(Gte)).T, ref)
    per = influence(fm, solver="ekfac", damping=damping, per_layer=True, l2=l2).score(
        fm.params, state, train, test)
    assert list(per) == ["emb", "fc"]
    _close(per["emb"] + per["fc"], ref)
    if not l2:
        self_ref = _dense_scores(state.factors, damping, _blocks(Gtr), _blocks(Gtr)).diagonal()
        _close(m.self_score(fm.params, state, train), self_ref)


def test_pooled_kfac_inverse_is_the_damped_kronecker_inverse():
    """ihvp_kfac on pooled factors == (G (x) A + damping I)^-1 on the tied W's block (row-major
    vec), the K-FAC-expand approximation (1e-10)."""
    model, ids, labels = _problem(4)
    params = {"emb.weight": model.emb.weight.detach()}
    kf = kfac_factors(model, lm_loss, params, (ids, labels))
    assert list(kf.A) == ["emb"]
    Vm = torch.randn(3, V * D, generator=torch.Generator().manual_seed(0), dtype=DT)
    K = torch.kron(kf.G["emb"], kf.A["emb"]) + 0.1 * torch.eye(V * D, dtype=DT)
    _close(ihvp_kfac(kf, damping=0.1)(Vm), torch.linalg.solve(K, Vm.T).T)
    ef = ekfac_factors(model, lm_loss, params, (ids, labels))
    blocks = _blocks(_per_example_grads(model, ids, labels))["emb"]
    Kd = sum(torch.outer(b.flatten(), b.flatten()) for b in blocks) / len(blocks)
    Q = torch.kron(ef.QG["emb"], ef.QA["emb"])
    # the EK-FAC inverse is the damped inverse of F's diagonal in the pooled basis
    Fd = Q @ torch.diag((Q.T @ Kd @ Q).diagonal()) @ Q.T + 0.1 * torch.eye(V * D, dtype=DT)
    _close(ihvp_ekfac(ef, damping=0.1)(Vm), torch.linalg.solve(Fd, Vm.T).T)


def test_tied_weights_that_cannot_be_pooled_are_refused():
    """A tied head whose bias is in params (others='error'; by default both keys take the
    diagonal block, tests/test_kfac_diag.py), fisher='expected' and a tap without tied=True are
    refused with errors naming the argument and the reason."""
    model, ids, labels = _problem(5, head_bias=True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=r"kfac_factors\(params=...\): expected tied weights "
                                         r"that K-FAC/EK-FAC can pool.*'emb.weight' shared by "
                                         r"'emb' \(Embedding\), 'head' \(Linear\): the bias "
                                         r"\['head.bias'\]"):
        kfac_factors(model, lm_loss, params, (ids, labels), others="error")
    model, ids, labels = _problem(5)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=r"ekfac_factors\(fisher=...\): expected 'empirical' "
                                         r"or 'true' with a tied weight"):  # [B] ids: [B, V] logits
        ekfac_factors(model, F.cross_entropy, params, (ids[:, 0], labels[:, 0]), fisher="expected")
    plain = tap(model, ["emb", "fc", "head"])
    with pytest.raises(ValueError, match=r"kfac_factors\(tapped=...\): expected tap_layers.*"
                                         r"without tied=True"):
        kfac_factors(model, lm_loss, params, (ids, labels), tapped=plain)
    tapped = kfac_tap(model, params)
    assert tapped.layers == ["emb", "fc", "head"] and tapped.tied == (("emb", "head"),)
    a = kfac_factors(model, lm_loss, params, (ids, labels), tapped=tapped)
    b = kfac_factors(model, lm_loss, params, (ids, labels))
    assert all(torch.equal(a.A[k], b.A[k]) and torch.equal(a.G[k], b.G[k]) for k in a.A)


def test_true_fisher_runs_on_the_tied_group():
    """fisher='true' (targets drawn from the model) pools the tied uses too: Lambda equals the
    mean of (Q_G^T DW_n Q_A)^2 of the drawn targets' per-example gradients (1e-10)."""
    from dattri_fn.losses import sample_categorical

    model, ids, labels = _problem(6)
    params = {"emb.weight": model.emb.weight.detach()}

    def draw(out, target, gen):
        return sample_categorical(out.flatten(0, 1), None, gen).view(target.shape)

    ef = ekfac_factors(model, lm_loss, params, (ids, labels), fisher="true", seed=3, sampler=draw)
    with torch.no_grad():
        drawn = draw(model(ids), labels, torch.Generator().manual_seed(3))
    blocks = _blocks(_per_example_grads(model, ids, drawn))["emb"]
    ref = (ef.QG["emb"].T @ blocks @ ef.QA["emb"]).square().mean(0)
    _close(ef.Lambda["emb"], ref)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=6, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (6, 5), generator=g)
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[2, 3:] = 0  # right padding, its labels ignored
    return model, {"input_ids": ids, "attention_mask": mask,
                   "labels": ids.masked_fill(mask == 0, -100)}


def test_stock_gpt2_ekfac_with_tied_wte_equals_the_dense_reference():
    """Tiny stock GPT-2 (default attention), params = wte (= lm_head) and every Conv1D:
    influence(solver='ekfac') runs with the tied weight, its wte Lambda is the Fisher diagonal
    in the pooled basis and its scores equal the dense EK-FAC in that basis applied to
    per-example autograd gradients (1e-9)."""
    from dattri_fn.losses import causal_lm_loss

    model, batch = _gpt2()
    fm = functional_model(model, causal_lm_loss, params=lambda n: "wte" in n or n.startswith(
        "transformer.h.0.") and ("c_" in n))
    assert "transformer.wte.weight" in fm.params
    damping = 0.1
    m = influence(fm, solver="ekfac", damping=damping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the raveled test side loops where sdpa cannot vmap
        state = m.prepare(fm.params, batch)
        S = m.score(fm.params, state, batch, batch)
    ef = state.factors
    assert "transformer.wte" in ef.QA and ef.QG["transformer.wte"].shape == (20, 20)
    own = dict(model.named_parameters())
    blocks = {layer: [] for layer in ef.QA}
    for i in range(6):
        model.zero_grad()
        one = {k: v[i:i + 1] for k, v in batch.items()}
        causal_lm_loss(model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]),
                       one["labels"]).backward()
        for layer in ef.QA:
            w = own[f"{layer}.weight"].grad
            w = w if layer == "transformer.wte" else w.T  # Conv1D stores [in, out]
            b = own.get(f"{layer}.bias")
            if f"{layer}.bias" in fm.params:
                w = torch.cat([w, b.grad[:, None]], -1)
            blocks[layer].append(w.clone())
    blocks = {k: torch.stack(v) for k, v in blocks.items()}
    wte = blocks["transformer.wte"]
    lam = (ef.QG["transformer.wte"].T @ wte @ ef.QA["transformer.wte"]).square().mean(0)
    _close(ef.Lambda["transformer.wte"], lam)
    _close(S, _dense_scores(ef, damping, blocks, blocks), 1e-9)


@pytest.mark.filterwarnings("ignore:layer_grads")
@pytest.mark.filterwarnings("ignore:gauss_newton")  # a tied Embedding: the autodiff GN product
def test_ekfac_preconditioned_cg_with_the_tied_weight_solves_the_gauss_newton():
    """CG on the Gauss-Newton with M='ekfac' built on the tied model (pooled layer included)
    gives the scores of the explicit solve, G_i^T (GN + damping I)^-1 G_j (1e-8)."""
    model, ids, labels = _problem(7)
    fm = functional_model(model, lm_loss)
    train, test = (ids, labels), (ids[:3], labels[:3])
    ref_m = influence(fm, solver="explicit", damping=0.1)
    ref = ref_m.score(fm.params, ref_m.prepare(fm.params, train), train, test)
    m = influence(fm, solver="cg", damping=0.1, M="ekfac", rtol=1e-13, max_iter=200)
    state = m.prepare(fm.params, train)
    _close(m.score(fm.params, state, train, test), ref, 1e-8)


def test_token_scores_split_the_tied_weight_over_positions():
    """token_scores with the tied W in params: position t scores both uses there (g_t^T M h_t +
    M[id_t] . u_t); summed over t, grad_i . p_j with grad_i from vmap(grad) (1e-10), for the toy
    model and for stock GPT-2's wte (per-sequence autograd)."""
    from dattri_fn.attribute.tokens import token_scores

    model, ids, labels = _problem(8)
    fm = functional_model(model, lm_loss)
    G = _per_example_grads(model, ids, labels)
    G = torch.cat([G[k].flatten(1) for k in fm.params], 1)
    p = torch.randn(2, G.shape[1], generator=torch.Generator().manual_seed(0), dtype=DT)
    S = token_scores(fm, fm.params, (ids, labels), p)
    assert S.shape == (8, T, 2)
    _close(S.sum(1), G @ p.T)
    h, g, u = _parts(model, ids, labels)  # position t's two terms, for the W block of p
    M = p[:, :V * D].reshape(2, V, D)
    W_part = torch.einsum("bto,jod,btd->btj", g, M, h) + torch.einsum("jbtd,btd->btj",
                                                                        M[:, ids], u)
    rest = token_scores(functional_model(model, lm_loss, params=lambda n: "fc" in n),
                        {k: v for k, v in fm.params.items() if "fc" in k}, (ids, labels),
                        p[:, V * D:])
    _close(S, W_part + rest)
    from dattri_fn.losses import causal_lm_loss

    gpt2, batch = _gpt2()
    fm = functional_model(gpt2, causal_lm_loss, params=lambda n: "wte" in n or ".mlp." in n)
    own = dict(gpt2.named_parameters())
    rows = []
    for i in range(6):
        gpt2.zero_grad()
        causal_lm_loss(gpt2(input_ids=batch["input_ids"][i:i + 1],
                            attention_mask=batch["attention_mask"][i:i + 1]),
                       batch["labels"][i:i + 1]).backward()
        rows.append(torch.cat([own[k].grad.flatten() for k in fm.params]))
    G = torch.stack(rows)
    p = torch.randn(2, G.shape[1], generator=torch.Generator().manual_seed(1), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        S = token_scores(fm, fm.params, batch, p)
    _close(S.sum(1), G @ p.T, 1e-9)


def test_flat_inputs_pool_two_positions():
    """[B] token ids (the embedding's a is [B], the head's [B, d]): Lambda of the pooled layer
    == mean_n (Q_G^T DW_n Q_A)^2 with DW_n = d CE_n / dW by vmap(grad) (1e-10)."""
    model, ids, labels = _problem(9)
    x, y = ids[:, 0], labels[:, 1]
    params = {"emb.weight": model.emb.weight.detach()}
    ef = ekfac_factors(model, F.cross_entropy, params, (x, y))

    def one(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    blocks = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)["emb.weight"]
    blocks = blocks.detach()  # the module's own fc params require grad
    ref = (ef.QG["emb"].T @ blocks @ ef.QA["emb"]).square().mean(0)
    _close(ef.Lambda["emb"], ref)


@pytest.mark.parametrize("pad", [None, 2])
def test_pooled_parts_products_equal_the_one_hot_products(pad):
    """PooledParts (no one-hot vectors): gram() = out^T out and rotated_out(Q) = out Q of
    pooled_io's materialised [g, one_hot(ids)] (padding_idx rows zero), ins() = its a (1e-12)."""
    from dattri_fn.operators.kfac_tied import pooled_io, pooled_parts
    from dattri_fn.transforms.layers import batched_io

    model, ids, labels = _problem(9, padding_idx=pad)
    if pad is not None:
        ids[0, :2] = pad
    state = {k: v.detach() for k, v in model.named_parameters()}
    tapped = tap(model, ["emb", "fc", "head"], tied=True)
    io = batched_io(tapped, lm_loss, state, (ids,), {}, labels, None, state["emb.weight"])
    members = ("emb", "head")
    a, g = pooled_io(tapped.specs, members, io, V)
    parts = pooled_parts(tapped.specs, members, io)
    Q = torch.linalg.qr(torch.randn(V, V, generator=torch.Generator().manual_seed(1),
                                    dtype=DT))[0]
    g2 = g.reshape(-1, V)
    _close(parts.gram(), g2.T @ g2, 1e-12)
    rot = parts.rotated_out(Q, slice(2, 6))  # the head's positions first, then the embedding's
    _close(rot, torch.cat([g[2:6, T:], g[2:6, :T]], 1) @ Q, 1e-12)
    _close(parts.ins(), torch.cat([a[:, T:], a[:, :T]], 1), 1e-12)
