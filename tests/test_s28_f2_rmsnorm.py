"""RMSNorm scales are captured as a LayerNorm's elementwise scale (review RU5 M3).

``y = w * x_hat`` (HF's ``LlamaRMSNorm``/``Qwen2RMSNorm``, T5's ``T5LayerNorm``, torch's
``nn.RMSNorm``, a user's own norm with one 1-D scale): ``dw_i = sum_t g_it * x_hat_it``, checked
against vmap(grad) (float64 1e-12, float32 at rounding); a norm the capture does not recognise
warns, naming its keys and ``params=``."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import grad_dot, influence
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan

transformers = pytest.importorskip("transformers")


class _UserRMSNorm(nn.Module):
    """A user's own RMSNorm, its scale named ``g`` (recognised by its one 1-D parameter)."""

    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(1 + 0.3 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.g


class _Scaler(_UserRMSNorm):
    """The same computation under a class name without "norm": not a candidate (dense twin)."""


class _GemmaNorm(_UserRMSNorm):
    """Gemma's ``(1 + w) * x_hat``: the scale reaches an add first, refused (dense, warned)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.g)


class _BiasNorm(nn.Module):
    """A hand-written norm with a scale and a shift: not recognised (warned)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) + self.bias


def _norm(kind, d):
    if kind == "torch":
        n = nn.RMSNorm(d, eps=1e-6)
        with torch.no_grad():
            n.weight.add_(0.3 * torch.randn(d))
        return n
    if kind in ("llama", "t5"):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        n = (LlamaRMSNorm if kind == "llama" else T5LayerNorm)(d)
        with torch.no_grad():
            n.weight.add_(0.3 * torch.randn(d))
        return n
    return {"user": _UserRMSNorm, "scaler": _Scaler, "gemma": _GemmaNorm, "bias": _BiasNorm}[kind](d)


class _Net(nn.Module):
    """ids [B, T] -> Embedding -> norm -> Linear -> tanh -> norm (on [B, T, 6]) -> Linear head."""

    def __init__(self, kind):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.n1 = _norm(kind, 6)
        self.fc = nn.Linear(6, 6)
        self.n2 = _norm(kind, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, ids):
        h = self.n1(self.emb(ids))
        return self.head(self.n2(torch.tanh(self.fc(h))))


def _lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")


def _data(seed, n, T=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, T), generator=g)
    return ids, torch.randint(0, 11, (n, T), generator=g)


def _fm(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return functional_model(_Net(kind).to(dtype).eval(), _lm_loss)


def _vmap_rows(fm, batch):
    """Reference per-example gradients [B, P]: vmap(grad) of the real module."""
    def one(x, y):
        g = torch.func.grad(fm.loss)(fm.params, (x, y))
        return torch.cat([g[k].reshape(-1) for k in fm.params])
    return torch.vmap(one)(*batch)


def _rows(fm, batch, record):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stacked = {k: v.detach()[None] for k, v in fm.params.items()}
        plan = check_plan(layer_plan(fm), stacked, batch)
        got = layer_grads_stacked(plan, stacked, batch).to_dense()[0]
    record.extend(str(x.message) for x in w)
    return plan, got


@pytest.mark.parametrize("kind", ["torch", "llama", "t5", "user"])
def test_rmsnorm_scales_are_captured_and_exact_in_float64(kind):
    """Each RMSNorm-like scale is a captured norm (no dense key, no warning), and its rows are
    vmap(grad)'s to 1e-12 of their scale."""
    fm = _fm(kind)
    plan = layer_plan(fm)
    assert list(plan.norms) == ["n1", "n2"] and plan.autodiff == () and plan.bare == ()
    record = []
    checked, got = _rows(fm, _data(1, 5), record)
    assert record == [] and not checked.dense and list(checked.norms) == ["n1", "n2"]
    want = _vmap_rows(fm, _data(1, 5))
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


@pytest.mark.parametrize("kind", ["torch", "llama"])
def test_rmsnorm_scales_in_float32_match_at_rounding(kind):
    fm = _fm(kind, torch.float32)
    record = []
    checked, got = _rows(fm, _data(2, 6), record)
    assert record == [] and not checked.dense and checked.autodiff == ()
    torch.testing.assert_close(got, _vmap_rows(fm, _data(2, 6)), rtol=1e-5, atol=1e-5)


def test_the_dense_twin_gives_the_same_scores_for_grad_dot_and_ekfac():
    """A class without "norm" in its name (same computation) keeps vmap(grad): Grad-Dot and
    EK-FAC (norm scales in its diagonal block, as a LayerNorm's) give the captured model's
    scores (1e-10): the captured rows feed the same blocks."""
    fm, twin = _fm("user"), _fm("scaler")
    assert layer_plan(twin).norms == {} and set(layer_plan(twin).bare) == {"n1.g", "n2.g"}
    train, test = [_data(3, 4), _data(4, 3)], _data(5, 3)
    for make in (lambda f: grad_dot(f),
                 lambda f: influence(f, solver="ekfac", damping=0.1, fisher="empirical")):
        m, t = make(fm), make(twin)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            S = m.score(fm.params, m.prepare(fm.params, train), train, test)
        assert not [x for x in w if "layer_grads" in str(x.message)]
        want = t.score(twin.params, t.prepare(twin.params, train), train, test)
        torch.testing.assert_close(S, want, rtol=1e-10, atol=1e-12)


def test_a_refused_norm_scale_warns_with_the_params_remedy_and_stays_exact():
    """Gemma's ``(1 + w)``: the scale reaches an add, so the norm is computed densely after one
    warning naming it and ``params=``; the rows stay vmap(grad)'s."""
    fm = _fm("gemma")
    record = []
    _, got = _rows(fm, _data(6, 4), record)
    texts = [t for t in record if "layer_grads" in t]
    assert len(texts) == 1 and "n1: its tensors are used by add" in texts[0] \
        and "params=" in texts[0], texts
    want = _vmap_rows(fm, _data(6, 4))
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_an_unrecognised_norm_warns_naming_its_keys_and_params():
    """A norm with a scale and a shift read by hand: its scales keep vmap(grad), warned once with
    the keys and ``params=`` (it was silent: review RU5 M3); the shift, added to the batch, is
    captured as a bare weight's rows."""
    fm = _fm("bias")
    record = []
    _, got = _rows(fm, _data(7, 4), record)
    texts = [t for t in record if "does not recognise" in t]
    assert len(texts) == 1 and "['n1.weight', 'n2.weight']" in texts[0] \
        and "params=" in texts[0], record
    want = _vmap_rows(fm, _data(7, 4))
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


@pytest.mark.parametrize("qwen", [False, True])
def test_llama_and_qwen2_default_params_take_no_vmap_grad(qwen):
    """A tied GQA Llama / Qwen2 with every parameter: its RMSNorms are captured norms, nothing is
    dense, and Grad-Dot equals the per-example gradients' Gram (vmap(grad) rows, 1e-12)."""
    torch.manual_seed(0)
    kw = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cfg = (transformers.Qwen2Config if qwen else transformers.LlamaConfig)(**kw)
    model = (transformers.Qwen2ForCausalLM if qwen else transformers.LlamaForCausalLM)(cfg)
    from dattri_fn.losses import causal_lm_loss

    fm = functional_model(model.double().eval(), causal_lm_loss)
    plan = layer_plan(fm)
    assert len(plan.norms) == 3 and plan.autodiff == ()
    ids = torch.randint(1, 32, (4, 6))
    batch = {"input_ids": ids, "labels": ids}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        g = grad_dot(fm)
        S = g.score(fm.params, g.prepare(fm.params, batch), batch, batch)
    assert not [x for x in w if "layer_grads" in str(x.message)]
    rows = []
    for i in range(4):
        grads = torch.func.grad(fm.loss)(fm.params, {k: v[i] for k, v in batch.items()})
        rows.append(torch.cat([grads[k].reshape(-1) for k in fm.params]))
    G = torch.stack(rows)
    assert (S - G @ G.T).abs().max() <= 1e-12 * (G @ G.T).abs().max()


def test_token_scores_take_rmsnorm_scales_and_sum_to_the_gradient_scores():
    """token_scores refused the RMSNorm keys by name; captured, position t scores
    ``(g_t * x_hat_t) . m_w`` and the positions sum to ``grad_i . p_j`` (1e-12)."""
    from dattri_fn.attribute.tokens import token_scores

    fm = _fm("llama")
    batch = _data(8, 4)
    P = sum(v.numel() for v in fm.params.values())
    p = torch.randn(2, P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = token_scores(fm, fm.params, batch, p)
    want = _vmap_rows(fm, batch) @ p.T
    assert s.shape == (4, 5, 2) and (s.sum(1) - want).abs().max() <= 1e-12 * want.abs().max()
