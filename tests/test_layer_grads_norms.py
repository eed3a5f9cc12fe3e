"""LayerNorms in the layer plan as dense rows (issue 14): their per-example gradients come from
the capture pass (``dw = sum_t g_t * xhat_t``, ``db = sum_t g_t``) and are written into the dense
block, so every consumer of the plan gives the scores of the dense float64 ``vmap(grad)``
reference. Each consumer family is compared with a *twin*: the same model and parameters with
every ``nn.LayerNorm`` replaced by a layer norm the capture engine does not know, whose
parameters take ``vmap(grad)`` (the path every LayerNorm took before)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.attribute.gradsim import grad_cos, grad_dot, tracin
from dattri_fn.attribute.influence import influence
from dattri_fn.attribute.trak import classification_margin_loss, classification_weight_loss, trak
from dattri_fn.transforms import layer_grads_paths as paths
from dattri_fn.transforms.kronecker import kronecker_layers, make_kronecker_projector
from dattri_fn.transforms.layer_grads import (
    check_plan,
    decided_plan,
    layer_grads_stacked,
    layer_plan,
    plan_decisions,
)

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


class _DenseNorm(nn.Module):
    """``F.layer_norm`` with its own parameters, not an ``nn.LayerNorm``: not captured."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x):
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


def _twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every nn.LayerNorm a _DenseNorm (same keys, same values)."""
    twin = copy.deepcopy(model)
    for mod in list(twin.modules()):
        for child, sub in list(mod.named_children()):
            if isinstance(sub, nn.LayerNorm):
                setattr(mod, child, _DenseNorm(sub))
    assert [k for k, _ in twin.named_parameters()] == [k for k, _ in model.named_parameters()]
    return twin


class _MLP(nn.Module):
    """x [B, 6] -> LayerNorm -> Linear -> tanh -> [B, 2, 4] -> LayerNorm over (2, 4), no bias ->
    Linear head."""

    def __init__(self):
        super().__init__()
        self.ln0, self.fc = nn.LayerNorm(6), nn.Linear(6, 8)
        self.ln1, self.head = nn.LayerNorm((2, 4), bias=False), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(self.ln0(x)))
        return self.head(self.ln1(h.unflatten(-1, (2, 4))).flatten(-2))


class _Block(nn.Module):
    """Pre-LN causal transformer block on tokens [B, T]: tok + pos (ids [1, T], shared by the
    batch) -> ln1 -> one attention head -> residual -> ln2 -> MLP -> residual -> ln_f (used
    twice) -> mean over T -> head. ``extra``: "bare" multiplies the logits by a bare Parameter
    (vmap(grad) next to the capture), "loop" too, with a data-dependent branch (vmap cannot run
    it: a loop of backward passes computes the bare Parameter alone)."""

    def __init__(self, V=7, T=5, D=4, C=3, extra=None):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln1, self.qkv, self.proj = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 6), nn.Linear(6, D)
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, C)
        self.extra = extra
        if extra is not None:
            self.temp = nn.Parameter(torch.ones(C))
        self.register_buffer("causal", torch.ones(T, T).tril().bool(), persistent=False)

    def forward(self, idx):
        T = idx.shape[-1]
        h = self.tok(idx) + self.pos(torch.arange(T)[None])
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = (q @ k.transpose(-1, -2)).masked_fill(~self.causal[:T, :T], float("-inf"))
        h = h + self.proj(att.softmax(-1) @ v)
        h = h + self.fc2(torch.tanh(self.fc1(self.ln2(h))))
        out = self.head(self.ln_f(self.ln_f(h)).mean(-2))
        if self.extra is not None:
            out = out * self.temp
        if self.extra == "loop" and bool(out.sum() != out.sum()):  # vmap refuses the branch
            out = out * 0
        return out


class _TiedLM(nn.Module):
    """tok (an Embedding) + pos -> LayerNorm -> Linear -> tanh -> head, a Linear whose weight IS
    tok's (tied, GPT-2's wte/lm_head) with a bias of its own -> logits [B, T, V] -> mean over T
    of the logits of class ids 0..2 (a 3-way classifier on sequences)."""

    def __init__(self, V=7, T=5, D=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln, self.fc, self.head = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, V)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[-1])[None])
        return self.head(torch.tanh(self.fc(self.ln(h))))[..., :3].mean(-2)


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / 2 + (p.ndim == 1))
    return model


def _data(case: str, seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 6, generator=g, dtype=DT) if case == "mlp"
         else torch.randint(0, 7, (n, 5), generator=g))
    return x, torch.randint(0, 3, (n,), generator=g)


CASES = {"mlp": lambda: _MLP(), "block": lambda: _Block(), "bare": lambda: _Block(extra="bare"),
         "loop": lambda: _Block(extra="loop"), "tied": lambda: _TiedLM()}
NORMS = {"mlp": ["ln0", "ln1"], "block": ["ln1", "ln2", "ln_f"], "tied": ["ln"]}
AUTODIFF = {"bare": ("temp",), "loop": ("temp",)}  # the tied head's own bias: captured (sum_t g_t)


def _model(case: str, seed: int = 0) -> nn.Module:
    return _init(CASES[case](), seed)


def _ckpts(fm, C: int) -> list[dict]:
    g = torch.Generator().manual_seed(9)
    return [dict(fm.params)] + [{k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=DT)
                                 for k, v in fm.params.items()} for _ in range(C - 1)]


def _rows(fm, params: dict, batch) -> torch.Tensor:
    """The dense reference: vmap(grad) per-example gradients, raveled (a loop of grad where
    vmap cannot run the model).  # [B, P]"""
    try:
        return per_sample_grad(fm.loss, params, batch)
    except RuntimeError:
        x, y = batch
        return torch.stack([torch.cat([v.reshape(-1) for v in torch.func.grad(fm.loss)(
            params, (x[i], y[i])).values()]) for i in range(len(y))])


@pytest.mark.parametrize("C", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_rows_of_layer_norms_equal_vmap_grad(case, C):
    """G_i of a checked plan == vmap(grad) rows (1e-10) at C checkpoints, the LayerNorms' keys
    (and a tied weight's: the sum over its Embedding and Linear uses) among them; they are
    captured (not in plan.layers, not autodiff), no fallback warning other than the loop's."""
    fm = functional_model(_model(case), F.cross_entropy)
    plan = layer_plan(fm)
    norms = NORMS.get(case, NORMS["block"])
    assert list(plan.norms) == norms and not set(norms) & set(plan.layers)
    owned = {k for pair in plan.norms.values() for k in pair if k is not None}
    assert owned <= set(plan.rest) and not owned & set(plan.autodiff)
    # a bare parameter is a candidate until the check: temp (out * temp) is not read by rows
    assert plan.bare == AUTODIFF.get(case, ()) and plan.autodiff == ()
    assert plan.ties == ({"tok.weight": ("tok", "head")} if case == "tied" else {})
    assert plan.tie_biases == ({"head.bias": "head"} if case == "tied" else {})
    ckpts = _ckpts(fm, C)
    stacked = {k: torch.stack([p[k] for p in ckpts]) for k in fm.params}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        checked = check_plan(plan, stacked, _data(case, 1, 3))
        got = layer_grads_stacked(checked, stacked, _data(case, 2, 5)).to_dense()
    assert [str(w.message) for w in record if "vmap cannot run" not in str(w.message)] == []
    assert (case == "loop") == bool(record) and not checked.dense
    assert checked.loop == (case == "loop") and list(checked.norms) == norms
    assert checked.autodiff == AUTODIFF.get(case, ()) and checked.bare == ()
    for c in range(C):
        torch.testing.assert_close(got[c], _rows(fm, ckpts[c], _data(case, 2, 5)), **TOL)
    again = decided_plan(plan, plan_decisions(checked))
    assert list(again.norms) == norms and again.autodiff == checked.autodiff
    assert plan_decisions(checked).layers == tuple(n for n in plan.captured
                                                   if n not in AUTODIFF.get(case, ()))


def test_decisions_without_norms_take_vmap_grad_for_them():
    """Decisions naming no norm (saved before norms were captured) give a plan whose norm keys
    are autodiff again, with the same rows (1e-10)."""
    fm = functional_model(_model("block"), F.cross_entropy)
    plan = layer_plan(fm)
    d = plan_decisions(check_plan(plan, fm.params, _data("block", 1, 3)))
    old = d._replace(layers=tuple(n for n in d.layers if n not in plan.norms))
    applied = decided_plan(plan, old)
    assert not applied.norms and set(applied.autodiff) == set(plan.rest)
    batch = _data("block", 2, 4)
    torch.testing.assert_close(
        layer_grads_stacked(applied, {k: v[None] for k, v in fm.params.items()}, batch)
        .to_dense()[0], _rows(fm, fm.params, batch), **TOL)


@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("row", [0, 1, 2])
@pytest.mark.parametrize("case, key", [("block", "ln2.weight"), ("tied", "tok.weight")])
def test_the_plan_check_covers_the_norm_rows(monkeypatch, case, key, row, n):
    """A fault in one example's LayerNorm (or tied weight's) row alone (the first, a middle one,
    the last of the compared three) fails the check (first/last rows + sum identity, or three
    rows): the checked plan is dense after a warning, its rows are vmap(grad)'s."""
    fm = functional_model(_model(case), F.cross_entropy)
    real = paths.dense_rows

    def faulty(plan, raw, lead):
        rows = real(plan, raw, lead)
        rows[key] = rows[key].clone()
        rows[key][:, row] *= 1.001
        return rows

    monkeypatch.setattr(paths, "dense_rows", faulty)
    batch = _data(case, 1, n)
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        checked = check_plan(layer_plan(fm), fm.params, batch)
    assert checked.dense
    got = layer_grads_stacked(checked, {k: v[None] for k, v in fm.params.items()}, batch)
    torch.testing.assert_close(got.to_dense()[0], _rows(fm, fm.params, batch), **TOL)


def _silent(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


@pytest.mark.parametrize("case", ["mlp", "block", "tied"])
def test_gradsim_scores_with_layer_norms_equal_the_dense_reference(case):
    """Grad-Dot = G_q G_s^T, Grad-Cos = normalised, TracIn = sum_c lr_c G_q^c G_s^c^T (vmap(grad)
    rows, 1e-10), no warning; Grad-Dot with the Kronecker projection == the twin's."""
    fm = functional_model(_model(case), F.cross_entropy)
    train, test = [_data(case, 1, 4), _data(case, 2, 3)], _data(case, 3, 3)
    Gs = torch.cat([_rows(fm, fm.params, b) for b in train])
    Gq = _rows(fm, fm.params, test)
    S = _silent(lambda: grad_dot(fm).score(fm.params, (), train, test))
    torch.testing.assert_close(S, Gs @ Gq.T, **TOL)
    unit = lambda G: G / G.norm(dim=1, keepdim=True)
    S = _silent(lambda: grad_cos(fm).score(fm.params, (), train, test))
    torch.testing.assert_close(S, unit(Gs) @ unit(Gq).T, **TOL)
    ckpts, lrs = _ckpts(fm, 2), [0.5, 0.25]
    m = tracin(fm, lrs=lrs)
    S = _silent(lambda: m.score(ckpts, m.prepare(ckpts, train), train, test))
    want = sum(lr * torch.cat([_rows(fm, p, b) for b in train]) @ _rows(fm, p, test).T
               for lr, p in zip(lrs, ckpts, strict=True))
    torch.testing.assert_close(S, want, **TOL)
    twin = functional_model(_twin(fm.module), F.cross_entropy)
    assert not layer_plan(twin).norms
    kw = dict(proj_dim=3, projection="kronecker", seed=4)
    S = grad_dot(fm, **kw).score(fm.params, (), train, test)
    torch.testing.assert_close(S, grad_dot(twin, **kw).score(twin.params, (), train, test), **TOL)


@pytest.mark.parametrize("setting", [dict(), dict(proj_dim=6), dict(proj_dim=3, projection="kronecker")])
def test_trak_with_layer_norms_equals_the_twin(setting):
    """TRAK (no projection: factored rows/state; a dense projection; the Kronecker projection)
    scores and self-scores == the twin's, whose LayerNorms take vmap(grad) (1e-9)."""
    out = functional_model(_model("block"), classification_margin_loss)
    w = functional_model(out.module, classification_weight_loss)
    tw = _twin(out.module)
    t_out = functional_model(tw, classification_margin_loss)
    t_w = functional_model(tw, classification_weight_loss)
    train, test = [_data("block", 1, 4), _data("block", 2, 3)], _data("block", 3, 3)
    m = trak(out, weight_fn=w, damping=0.1, seed=2, **setting)
    t = trak(t_out, weight_fn=t_w, damping=0.1, seed=2, **setting)
    state = _silent(lambda: m.prepare(out.params, train))
    t_state = t.prepare(t_out.params, train)
    torch.testing.assert_close(m.score(out.params, state, train, test),
                               t.score(t_out.params, t_state, train, test), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m.self_score(out.params, state, train),
                               t.self_score(t_out.params, t_state, train), rtol=1e-9, atol=1e-10)


def test_factgrass_and_influence_with_layer_norms_equal_the_twin():
    """FactGraSS (Kronecker mask sketch, the norms in its rest block) and influence with the
    explicit inverse (plan rows of train and test) == the twin's scores (1e-9)."""
    fm = functional_model(_model("block"), F.cross_entropy)
    twin = functional_model(_twin(fm.module), F.cross_entropy)
    train, test = [_data("block", 1, 4), _data("block", 2, 3)], _data("block", 3, 3)
    for make in (lambda f: factgrass(f, proj_dim=8, mask_dim=3, damping=0.1, seed=1),
                 lambda f: influence(f, solver="explicit", damping=0.1)):
        m, t = make(fm), make(twin)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")  # the factored Gauss-Newton's refusal is not ours
            S = m.score(fm.params, m.prepare(fm.params, train), train, test)
        assert not [w for w in record if "layer_grads" in str(w.message)]
        # the twin's norms are no module the capture recognises: that costs vmap(grad), warned
        # since stop 28 (review RU5 M3); its scores are the reference all the same
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "layer_grads: the parameters", RuntimeWarning)
            want = t.score(twin.params, t.prepare(twin.params, train), train, test)
        torch.testing.assert_close(S, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["block", "tied"])
def test_kronecker_projector_reads_norm_rows_from_the_dense_block(case):
    """KroneckerProjector.layer_grads(plan rows) == per block vec(P_out^T G P_in) of the vmap(grad)
    rows, the rest projected densely (1e-10); norms are no Kronecker layers, and a tie's rows
    (read from the dense block) are wherever kronecker_layers puts them: a block or the rest."""
    fm = functional_model(_model(case), F.cross_entropy)
    plan = layer_plan(fm)
    layers, rest = kronecker_layers(plan, fm.params)
    owned = ({k for pair in plan.norms.values() for k in pair if k} | set(plan.ties)
             | set(plan.tie_biases))
    members = {m for group in plan.ties.values() for m in group}
    in_blocks = {k for lay in layers.values() for k in (lay.weight, lay.bias) if k}
    assert set(plan.layers) <= set(layers) <= set(plan.layers) | members
    assert {k for k, _ in rest} | in_blocks >= owned and "ln1" not in layers
    proj = make_kronecker_projector(layers, proj_dim=3, seed=5, rest=rest, rest_dim=7, dtype=DT)
    batch = _data(case, 1, 5)
    got = proj.layer_grads(layer_grads_stacked(check_plan(plan, fm.params, batch),
                                               {k: v[None] for k, v in fm.params.items()}, batch))
    ref = per_sample_grad(fm.loss, fm.params, batch)
    cols, off = {}, 0
    for k, v in fm.params.items():
        cols[k], off = ref[:, off:off + v.numel()], off + v.numel()
    want = []
    for n, lay in layers.items():
        W = [] if lay.weight is None else [
            cols[lay.weight].unflatten(-1, (lay.inp, lay.out)).mT if lay.kind == "embedding"
            else cols[lay.weight].unflatten(-1, (lay.out, lay.inp))]
        if lay.bias is not None:
            W.append(cols[lay.bias][..., None])
        want.append(proj.project_dense(n, torch.cat(W, -1)))
    want.append(proj.project_rest(torch.cat([cols[k] for k, _ in rest], -1)))
    torch.testing.assert_close(got[0], torch.cat(want, -1), **TOL)


@pytest.mark.slow
def test_grad_dot_on_a_tiny_gpt2_captures_its_layer_norms():
    """Tiny stock GPT-2 (local config), every param, a padding mask (vmap cannot run it):
    Grad-Dot == G G^T from per-sequence autograd (1e-9); the plan captures every LayerNorm, wpe
    and the tied wte/lm_head, no warning, no per-example loop."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0)).double().eval()

    def loss(out, labels):
        rows = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               reduction="none")
        return rows.sum()

    fm = functional_model(gpt2, loss)
    plan = layer_plan(fm)
    assert list(plan.norms) == ["transformer.h.0.ln_1", "transformer.h.0.ln_2",
                                "transformer.h.1.ln_1", "transformer.h.1.ln_2",
                                "transformer.ln_f"]
    assert "transformer.wpe" in plan.layers and not plan.autodiff
    assert plan.ties == {"transformer.wte.weight": ("transformer.wte", "lm_head")}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (4, 5), generator=g)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    looped, real = [], paths._loop_grads

    def spy(fn, params, b):
        looped.append(list(params))
        return real(fn, params, b)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setattr(paths, "_loop_grads", spy)
        warnings.simplefilter("error")
        S = grad_dot(fm).score(fm.params, (), batch, batch)
    assert not looped
    params = dict(gpt2.named_parameters())
    rows = []
    for i in range(4):
        gpt2.zero_grad()
        loss(gpt2(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]),
             batch["labels"][i:i + 1]).backward()
        rows.append(torch.cat([params[k].grad.flatten() for k in fm.params]))
    G = torch.stack(rows)
    torch.testing.assert_close(S, G @ G.T, rtol=1e-9, atol=1e-11)


def test_kronecker_layers_refuses_a_norm_among_the_layers():
    """A plan whose layers hold a LayerNorm (built by hand) is refused by name: its rows are
    elementwise, not sum_t g_t a_t^T."""
    fm = functional_model(_model("mlp"), F.cross_entropy)
    plan = layer_plan(fm)
    bad = plan._replace(layers={**plan.layers, **plan.norms}, norms={})
    with pytest.raises(ValueError, match=r"kronecker_layers\(plan=...\): expected layers of "
                                         r"Kronecker form .* got 'ln0' of kind 'layernorm'"):
        kronecker_layers(bad, fm.params)


class _Reread(nn.Module):
    """_TiedLM whose LayerNorm weight and tied weight ("weight"), or its head's bias ("bias":
    the tie loses its Linear member, then its Embedding reads a weight another call reads),
    are read again by another op (a scale): narrowed out of the plan after a warning."""

    def __init__(self, what):
        super().__init__()
        self.lm, self.what = _TiedLM(), what

    def forward(self, idx):
        lm = self.lm
        other = lm.tok.weight.mean() if self.what == "weight" else lm.head.bias.mean()
        return lm(idx) * (1 + 0.1 * lm.ln.weight.tanh().sum() + 0.1 * other)


@pytest.mark.parametrize("what", ["weight", "bias"])
def test_a_norm_or_tie_the_capture_refuses_takes_vmap_grad_after_a_warning(what):
    """A LayerNorm weight and a tie the capture refuses: check_plan warns naming them, keeps the
    other layers captured, and the rows still equal vmap(grad) (1e-10)."""
    fm = functional_model(_init(_Reread(what), 0), F.cross_entropy)
    batch = _data("tied", 1, 4)
    with pytest.warns(RuntimeWarning, match=r"densely \(vmap\(grad\)\) instead of from captured "
                                            r"factors: (?=.*lm\.ln: )(?=.*lm\.head: )(?=.*lm\.tok: )"):
        checked = check_plan(layer_plan(fm), fm.params, batch)
    assert not checked.dense and not checked.norms and not checked.ties
    assert set(checked.layers) == {"lm.pos", "lm.fc"} and "lm.tok.weight" in checked.autodiff
    got = layer_grads_stacked(checked, {k: v[None] for k, v in fm.params.items()}, batch)
    torch.testing.assert_close(got.to_dense()[0], _rows(fm, fm.params, batch), **TOL)
