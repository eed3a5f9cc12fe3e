"""K-FAC / EK-FAC / LoGra factors and scores do not depend on padding (review RU2 H1, stop 27).

A Mapping batch's ``attention_mask`` (zero at pads) keeps pad positions out of ``A`` and each
example's ``A`` is normalised by its own count of real positions
(:mod:`dattri_fn.transforms.padding`). The references: the same examples padded otherwise,
batches of different lengths (dynamic padding), each example alone and unpadded (the unmasked
path, built from the real tokens only) and, on a plain ``[B, T, D]`` model whose first layer
reads the data itself, the factors written out from the data and ``vmap(grad)``. Float64.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from dattri_fn import functional_model
from dattri_fn.attribute import influence, logra
from dattri_fn.operators.kfac import kfac_factors
from dattri_fn.transforms.padding import padding_mask, real_gram

DT = torch.float64
N, D_IN, HID, C = 7, 5, 6, 3
LENS = [4, 6, 1, 5, 3, 6, 2]  # real positions per example


class Pooled(nn.Module):
    """``[B, T, D]`` inputs, a per-position layer, a masked mean pool and a head: pad positions
    take no gradient, their inputs are junk."""

    def __init__(self):
        super().__init__()
        self.lin1, self.head = nn.Linear(D_IN, HID), nn.Linear(HID, C)

    def forward(self, x, attention_mask=None):
        h = torch.tanh(self.lin1(x))
        if attention_mask is None:
            return self.head(h.mean(1))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _pooled():
    torch.manual_seed(0)
    return Pooled().to(DT).eval()


_X = torch.randn(N, 6, D_IN, generator=torch.Generator().manual_seed(1), dtype=DT)
_Y = torch.tensor([0, 2, 1, 1, 0, 2, 1])


def _padded(rows, width, seed=0, mask=True):
    """Examples ``rows`` right-padded to ``width`` with junk inputs (``seed``'s) at the pads."""
    junk = torch.randn(len(rows), width, D_IN, generator=torch.Generator().manual_seed(seed),
                       dtype=DT) * 7
    x, m = junk.clone(), torch.zeros(len(rows), width, dtype=torch.long)
    for j, r in enumerate(rows):
        x[j, :LENS[r]], m[j, :LENS[r]] = _X[r, :LENS[r]], 1
    out = {"x": x, "attention_mask": m, "labels": _Y[list(rows)]}
    if not mask:
        del out["attention_mask"]
    return out


def _alone(rows):
    """Each example its own batch, unpadded and without a mask."""
    return [{"x": _X[r:r + 1, :LENS[r]], "labels": _Y[r:r + 1]} for r in rows]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def test_pooled_factors_equal_written_out_real_token_factors():
    model = _pooled()
    p = _params(model)
    got = kfac_factors(model, _ce, p, _padded(range(N), 9, seed=3))
    # A of lin1: its input is the data; (1/N) sum_n (1/T_n) sum_{t < T_n} [x, 1][x, 1]^T
    A = torch.zeros(D_IN + 1, D_IN + 1, dtype=DT)
    G = torch.zeros(HID, HID, dtype=DT)
    for r in range(N):
        xa = torch.cat([_X[r, :LENS[r]], torch.ones(LENS[r], 1, dtype=DT)], 1)
        A += xa.T @ xa / LENS[r]

        def loss_of_out(z, r=r):  # z: lin1's output at the example's real positions
            h = torch.tanh(z)
            return _ce(functional_call(model.head, {"weight": p["head.weight"],
                                                    "bias": p["head.bias"]}, h.mean(0)[None]),
                       _Y[r:r + 1])

        z = _X[r, :LENS[r]] @ p["lin1.weight"].T + p["lin1.bias"]
        g = grad(loss_of_out)(z)
        G += g.T @ g
    assert _rel(got.A["lin1"], A / N) < 1e-13
    assert _rel(got.G["lin1"], G / N) < 1e-13
    # the head reads [B, HID] (no positions): nothing to mask
    alone = kfac_factors(model, _ce, p, _alone(range(N)))
    for k in got.A:
        assert _rel(got.A[k], alone.A[k]) < 1e-13 and _rel(got.G[k], alone.G[k]) < 1e-13


def _method(fm, solver):
    if solver == "logra":
        return logra(fm, proj_dim=3)
    return influence(fm, solver=solver, damping=1e-3)


@pytest.mark.parametrize("solver", ["kfac", "ekfac", "logra"])
def test_pooled_scores_do_not_depend_on_padding(solver):
    model = _pooled()
    fm = functional_model(model, _ce)
    te = _padded([0, 3, 5], 6, seed=9)
    runs = {"T=6": _padded(range(N), 6, seed=1),
            "T=11": _padded(range(N), 11, seed=2),
            "dynamic": [_padded([0, 1, 2], 6, seed=4), _padded([3, 4, 5, 6], 8, seed=5)],
            "alone": _alone(range(N))}
    S = {}
    for name, tr in runs.items():
        m = _method(fm, solver)
        # LoGra scores the rows it cached: train=None (its train print refuses the same examples
        # padded otherwise, since their bits differ)
        at_score = None if solver == "logra" else _alone(range(N))
        S[name] = m.score(fm.params, m.prepare(fm.params, tr), at_score, te)
    for name in ("T=11", "dynamic", "alone"):
        assert _rel(S[name], S["T=6"]) < 1e-12, name
    # the train side padded too
    m = _method(fm, solver)
    tr = runs["T=11"]
    assert _rel(m.score(fm.params, m.prepare(fm.params, tr), tr, te), S["T=6"]) < 1e-12


def test_chunks_take_their_own_rows_of_the_mask():
    model = _pooled()
    p = _params(model)
    tr = _padded(range(N), 9, seed=3)
    whole = kfac_factors(model, _ce, p, tr)
    for chunk in (1, 2, 3):
        part = kfac_factors(model, _ce, p, tr, chunk_size=chunk)
        assert _rel(part.A["lin1"], whole.A["lin1"]) < 1e-13
    merged = kfac_factors(model, _ce, p, [_padded([0, 1], 9), _padded([2, 3, 4, 5, 6], 9)],
                          batch_rows=4)
    assert _rel(merged.A["lin1"], whole.A["lin1"]) < 1e-13


def test_unpadded_batches_take_the_old_path_bit_for_bit():
    model = _pooled()
    p = _params(model)
    full = {"x": _X, "attention_mask": torch.ones(N, 6, dtype=torch.long), "labels": _Y}
    plain = {"x": _X, "labels": _Y}
    a, b = kfac_factors(model, _ce, p, full), kfac_factors(model, _ce, p, plain)
    for k in a.A:
        assert torch.equal(a.A[k], b.A[k]) and torch.equal(a.G[k], b.G[k])
    assert padding_mask(full) is None and padding_mask(plain) is None
    assert padding_mask((_X, _Y)) is None
    # without the mask the pads are read: the statistic moves (what the mask prevents)
    bare = kfac_factors(model, _ce, p, _padded(range(N), 9, seed=3, mask=False))
    masked = kfac_factors(model, _ce, p, _padded(range(N), 9, seed=3))
    assert _rel(bare.A["lin1"], masked.A["lin1"]) > 0.1


def test_real_gram_skips_non_finite_pads_and_empty_examples():
    a = torch.randn(3, 4, 2, dtype=DT)
    real = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    a[0, 2:] = float("nan")
    a[1] = float("inf")
    want = a[0, :2].T @ a[0, :2] / 2 + a[2].T @ a[2] / 4
    assert _rel(real_gram(a, real), want) < 1e-14
    ab = torch.cat([a, torch.ones(3, 4, 1, dtype=DT)], -1)
    want_b = ab[0, :2].T @ ab[0, :2] / 2 + ab[2].T @ ab[2] / 4
    assert _rel(real_gram(a, real, bias=True), want_b) < 1e-14


class Prefixed(nn.Module):
    """Prepends a learned token: ``lin1`` reads ``T + 1`` positions, the mask has ``T``."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, D_IN))
        self.lin1, self.head = nn.Linear(D_IN, HID), nn.Linear(HID, C)

    def forward(self, x, attention_mask=None):
        x = torch.cat([self.cls.expand(x.shape[0], 1, D_IN), x], 1)
        return self.head(torch.tanh(self.lin1(x))[:, 0])


def test_unaligned_layer_warned_once_by_name():
    torch.manual_seed(0)
    model = Prefixed().to(DT).eval()
    p = {k: v.detach() for k, v in model.named_parameters() if k != "cls"}
    data = [_padded(range(4), 9, seed=1), _padded(range(4, N), 9, seed=2)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        kfac_factors(model, _ce, p, data, chunk_size=2)
    msgs = [str(w.message) for w in rec if "attention_mask" in str(w.message)]
    assert len(msgs) == 1 and "'lin1'" in msgs[0] and "10 positions" in msgs[0], msgs


# --- a tiny Hugging Face GPT-2 (local config, no downloads) ---------------------------------

transformers = pytest.importorskip("transformers")
from dattri_fn.losses import causal_lm_loss  # noqa: E402

V, L_MAX = 23, 9
_IDS = torch.randint(1, V, (10, L_MAX), generator=torch.Generator().manual_seed(5))
_LEN = [9, 4, 7, 2, 9, 5, 6, 3, 8, 5]


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=24, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(DT).eval()


def _lm(rows, width, pad_id=0):
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    m, lab = torch.zeros_like(ids), torch.full_like(ids, -100)
    for j, r in enumerate(rows):
        n = _LEN[r]
        ids[j, :n], m[j, :n], lab[j, :n] = _IDS[r, :n], 1, _IDS[r, :n]
    return {"input_ids": ids, "attention_mask": m, "labels": lab}


def _lm_alone(rows):
    return [{"input_ids": _IDS[r:r + 1, :_LEN[r]], "labels": _IDS[r:r + 1, :_LEN[r]]}
            for r in rows]


@pytest.mark.parametrize("solver", ["kfac", "ekfac", "logra"])
@pytest.mark.parametrize("params", ["mlp", "tied"])
def test_gpt2_scores_do_not_depend_on_padding(solver, params):
    gpt2 = _gpt2()
    # "tied": wte = lm_head, one pooled layer (its embedding use's pad ids are not counted in G)
    sel = (lambda n: ".mlp." in n) if params == "mlp" else (
        lambda n: ".mlp." in n or n == "transformer.wte.weight")
    lm = functional_model(gpt2, causal_lm_loss, params=sel)
    te = _lm([8, 9], 9)
    runs = {"T=9": _lm(range(8), 9), "T=14": _lm(range(8), 14, pad_id=5),
            "dynamic": [_lm([0, 1, 2], 9), _lm([3, 4, 5, 6, 7], 12)],
            "alone": _lm_alone(range(8))}
    S = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # others="diagonal"'s note on the params outside
        for name, tr in runs.items():
            m = _method(lm, solver)
            S[name] = m.score(lm.params, m.prepare(lm.params, tr), tr, te)
    for name in ("T=14", "dynamic", "alone"):
        assert _rel(S[name], S["T=9"]) < 1e-11, (name, _rel(S[name], S["T=9"]))
