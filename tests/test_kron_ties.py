"""Kronecker projections of a tied weight (review R4 F2, stop 22).

Since ties are captured (GPT-2's ``wte`` = ``lm_head``: ``plan.ties``), the tied key is in no
``plan.layers`` entry, and ``kronecker_layers`` had put its ``V x D`` rows into the dense rest
(a ``V D``-wide dense projection per example, 14x slower, and another sketch than 6c822d2's).
It now gives the key the block of the layer that holds it (the Embedding's ``[V, D]``) and each
other member's own bias a bias block, in module order: 6c822d2's layout, whose numbers were the
dense rows projected block by block. The references here are exactly that: float64 per-example
rows (``vmap(grad)``), cut per block into ``[out, in (+ bias)]``, ``vec(P_out^T G P_in)``.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.attribute.trak import trak
from dattri_fn.transforms.kronecker import KroneckerLayer, kronecker_layers, make_kronecker_projector
from dattri_fn.transforms.layer_grads import layer_plan
from dattri_fn.transforms.project import make_projector

DT = torch.float64
V, T, D = 7, 5, 4


class TiedLM(nn.Module):
    """tok + pos -> LayerNorm -> tanh(fc) -> head, with head.weight = tok.weight (the key is
    ``tok.weight``, or ``head.weight`` when the head is registered first)."""

    def __init__(self, bias: bool = True, head_first: bool = False):
        super().__init__()
        if head_first:
            self.head = nn.Linear(D, V, bias=bias)
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln, self.fc = nn.LayerNorm(D), nn.Linear(D, D)
        if head_first:
            self.tok.weight = self.head.weight
        else:
            self.head = nn.Linear(D, V, bias=bias)
            self.head.weight = self.tok.weight

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[-1])[None])
        return self.head(torch.tanh(self.fc(self.ln(h))))[..., :3].mean(-2)


def _tied(bias=True, head_first=False):
    torch.manual_seed(0)
    m = TiedLM(bias, head_first).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LayerNorm's default ones/zeros would hide a swapped weight/bias
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
    return functional_model(m, F.cross_entropy)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)


def _gpt2(params=None):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(DT).eval()

    def loss(out, labels):
        return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               reduction="sum")

    def unpack(b):
        return (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]

    return functional_model(model, loss, unpack=unpack, params=params)


def _gpt2_data(n, seed):
    ids = torch.randint(1, 40, (n, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _blocks_ref(proj, layers, rest, params, G):
    """6c822d2's projection of dense rows: per block ``vec(P_out^T [W | b] P_in)``, the rest
    projected densely, side by side.  # [b, P] -> [b, d]"""
    at, s = {}, 0
    for k, v in params.items():
        at[k] = (s, s + v.numel())
        s += v.numel()
    out = []
    for n, lay in layers.items():
        parts = []
        if lay.weight is not None:
            W = G[:, slice(*at[lay.weight])]
            W = (W.unflatten(1, (lay.inp, lay.out)).mT if lay.kind in ("conv1d", "embedding")
                 else W.unflatten(1, (lay.out, lay.inp)))
            parts.append(W)
        if lay.bias is not None:
            parts.append(G[:, slice(*at[lay.bias]), None])
        Gb = torch.cat(parts, -1)  # [b, out, in']
        P_in, P_out = proj.matrices(n, DT, "cpu")
        Gb = Gb if P_in is None else Gb @ P_in
        Gb = Gb if P_out is None else P_out.T @ Gb
        out.append(Gb.flatten(1))
    if rest:
        out.append(proj.project_rest(torch.cat([G[:, slice(*at[k])] for k, _ in rest], 1)))
    return torch.cat(out, 1)


def _rows(fm, batch):
    return per_sample_grad(fm.loss, fm.params, batch)


def test_the_tie_is_the_block_of_the_layer_holding_its_key():
    """Tied LM: blocks tok [D, V] (embedding), pos, fc, head's bias [V, 0]; rest = the LayerNorm's 2D."""
    fm = _tied()
    layers, rest = kronecker_layers(layer_plan(fm), fm.params)
    assert layers == {"tok": KroneckerLayer("tok.weight", None, "embedding", D, V),
                      "pos": KroneckerLayer("pos.weight", None, "embedding", D, T),
                      "fc": KroneckerLayer("fc.weight", "fc.bias", "linear", D, D),
                      "head": KroneckerLayer(None, "head.bias", "linear", V, 0)}
    assert rest == (("ln.weight", D), ("ln.bias", D))


def test_a_tie_held_by_its_linear_is_the_linear_block():
    """head registered first (key head.weight): block head [V, D] with its bias; tok has none."""
    fm = _tied(head_first=True)
    assert list(fm.params)[:2] == ["head.weight", "head.bias"]
    layers, rest = kronecker_layers(layer_plan(fm), fm.params)
    assert layers == {"head": KroneckerLayer("head.weight", "head.bias", "linear", V, D),
                      "pos": KroneckerLayer("pos.weight", None, "embedding", D, T),
                      "fc": KroneckerLayer("fc.weight", "fc.bias", "linear", D, D)}
    assert [k for k, _ in rest] == ["ln.weight", "ln.bias"]


@pytest.mark.slow
def test_gpt2_wte_is_a_block_and_the_rest_holds_only_the_layer_norms():
    """Tiny GPT-2 (V = 40, D = 8): wte is block 0, [D, V]; rest = the 3 LayerNorms' 6 x 8 entries."""
    fm = _gpt2()
    plan = layer_plan(fm)
    assert "transformer.wte.weight" in plan.ties
    layers, rest = kronecker_layers(plan, fm.params)
    assert list(layers)[:2] == ["transformer.wte", "transformer.wpe"]
    assert layers["transformer.wte"] == KroneckerLayer("transformer.wte.weight", None, "embedding",
                                                       8, 40)
    assert "lm_head" not in layers
    assert all(".ln_" in k for k, _ in rest) and sum(s for _, s in rest) == 6 * 8


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("head_first", [False, True])
def test_projected_rows_equal_the_dense_rows_projected_per_block(bias, head_first):
    """Grad-Dot (kronecker) = Phi_s Phi_q^T, Phi = per block vec(P_out^T G P_in) of G = vmap(grad)."""
    fm = _tied(bias, head_first)
    layers, rest = kronecker_layers(layer_plan(fm), fm.params)
    proj = make_kronecker_projector(layers, proj_dim=3, seed=4, rest=rest, dtype=DT)
    train, test = [_data(4, 1), _data(3, 2)], _data(3, 3)
    S = grad_dot(fm, proj_dim=3, projection="kronecker", seed=4).score(fm.params, (), train, test)
    phi_s = torch.cat([_blocks_ref(proj, layers, rest, fm.params, _rows(fm, b)) for b in train])
    phi_q = _blocks_ref(proj, layers, rest, fm.params, _rows(fm, test))
    assert phi_s.shape[1] == proj.proj_dim
    torch.testing.assert_close(S, phi_s @ phi_q.T, rtol=1e-10, atol=1e-10)


def test_trak_with_the_kronecker_projection_uses_those_features():
    """TRAK (no weight_fn: Q = 1): s = Phi_s (Phi_s^T Phi_s + lam I)^-1 Phi_q^T, Phi per block as above."""
    fm = _tied()
    layers, rest = kronecker_layers(layer_plan(fm), fm.params)
    proj = make_kronecker_projector(layers, proj_dim=3, seed=2, rest=rest, dtype=DT)
    train, test = [_data(4, 1), _data(3, 2)], _data(3, 3)
    m = trak(fm, damping=0.1, proj_dim=3, projection="kronecker", seed=2)
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    phi_s = torch.cat([_blocks_ref(proj, layers, rest, fm.params, _rows(fm, b)) for b in train])
    phi_q = _blocks_ref(proj, layers, rest, fm.params, _rows(fm, test))
    K = phi_s.T @ phi_s + 0.1 * torch.eye(phi_s.shape[1], dtype=DT)
    torch.testing.assert_close(S, phi_s @ torch.linalg.solve(K, phi_q.T), rtol=1e-9, atol=1e-10)


def _factgrass_ref(fm, train, test, *, proj_dim, k1, seed, damping):
    """Stage 1: the mask projector (k1 per side, rest k1^2) per block; stage 2: seed + 1 + b
    count-sketch where wider than proj_dim; s = sum_b phi_b (F_b + damping I)^-1 phi_b^T."""
    layers, rest = kronecker_layers(layer_plan(fm), fm.params)
    st1 = make_kronecker_projector(layers, proj_dim=k1, kind="mask", seed=seed, rest=rest,
                                   rest_dim=k1 * k1, dtype=DT)
    ref_s = torch.cat([_blocks_ref(st1, layers, rest, fm.params, _rows(fm, b)) for b in train])
    ref_q = _blocks_ref(st1, layers, rest, fm.params, _rows(fm, test))
    S, c = 0, 0
    for i, w in enumerate(st1.dims.values()):
        ps, pq = ref_s[:, c:c + w], ref_q[:, c:c + w]
        c += w
        if w > proj_dim:
            R = make_projector(w, proj_dim=proj_dim, kind="sjlt", seed=seed + 1 + i,
                               packed=False).matrix(DT)
            ps, pq = ps @ R, pq @ R
        Fb = ps.T @ ps / ps.shape[0] + damping * torch.eye(ps.shape[1], dtype=DT)
        S = S + ps @ torch.linalg.solve(Fb, pq.T)
    return S, st1


@pytest.mark.parametrize("bias", [True, False])
def test_factgrass_masks_the_tie_as_its_block(bias):
    """FactGraSS on the tied LM = the per-block masked/count-sketched dense rows, block-diagonal Fisher."""
    fm = _tied(bias)
    train, test = [_data(4, 1), _data(3, 2)], _data(3, 3)
    m = factgrass(fm, proj_dim=8, mask_dim=3, damping=0.1, seed=1)
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    ref, st1 = _factgrass_ref(fm, train, test, proj_dim=8, k1=3, seed=1, damping=0.1)
    assert st1.dims["tok"] == 3 * 3  # k1 x k1 of the [D, V] block, not k1^2 scattered coordinates
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.slow
def test_gpt2_kronecker_grad_dot_and_factgrass_equal_the_per_block_references():
    """Tiny GPT-2, every param, padding: Grad-Dot and TRAK (kronecker), FactGraSS = per-block references."""
    fm = _gpt2()
    train, test = [_gpt2_data(4, 1)], _gpt2_data(3, 3)
    layers, rest = kronecker_layers(layer_plan(fm), fm.params)
    proj = make_kronecker_projector(layers, proj_dim=3, seed=4, rest=rest, dtype=DT)
    S = grad_dot(fm, proj_dim=3, projection="kronecker", seed=4).score(fm.params, (), train, test)
    phi_s = _blocks_ref(proj, layers, rest, fm.params, _rows(fm, train[0]))
    phi_q = _blocks_ref(proj, layers, rest, fm.params, _rows(fm, test))
    torch.testing.assert_close(S, phi_s @ phi_q.T, rtol=1e-10, atol=1e-10 * float(S.abs().max()))
    m = trak(fm, damping=0.1, proj_dim=3, projection="kronecker", seed=4)  # Q = 1, seed + 0
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    K = phi_s.T @ phi_s + 0.1 * torch.eye(phi_s.shape[1], dtype=DT)
    torch.testing.assert_close(S, phi_s @ torch.linalg.solve(K, phi_q.T), rtol=1e-9, atol=1e-10)
    m = factgrass(fm, proj_dim=8, mask_dim=3, damping=0.1, seed=1)
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    ref, _ = _factgrass_ref(fm, train, test, proj_dim=8, k1=3, seed=1, damping=0.1)
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_the_rest_projection_is_no_wider_than_the_untied_keys():
    """Cost: the rest is the LayerNorm's 2D entries, not V D + 2D (V = 7 here, 8000 in R4's case)."""
    fm = _tied()
    layers, rest = kronecker_layers(layer_plan(fm), fm.params)
    proj = make_kronecker_projector(layers, proj_dim=2, seed=0, rest=rest, dtype=DT)
    assert sum(s for _, s in proj.rest) == 2 * D
    assert proj.dims["tok"] == 2 * 2 and proj.dims["<rest>"] == 2 * 2
