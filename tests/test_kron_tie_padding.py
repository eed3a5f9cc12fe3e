"""A tied key's factors at dropped positions, and their conversions (review R6 F1, F3; stop 23).

An Embedding with ``padding_idx`` takes no gradient at its padding positions (the engine's id
-1), so the model's output gradient there may be NaN (a zero padding row normalised, ``e /
|e|``, then masked by ``where``) while every parameter's gradient is finite. The references
are float64 ``vmap(grad)`` rows and the dense-row path (the tie's rows formed by the capture
engine, which drops those positions), with the same projector and seeds.
"""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.model import default_unpack
from dattri_fn.transforms import tie_factors as tie_mod
from dattri_fn.transforms.kronecker import KroneckerLayer, kronecker_layers, make_kronecker_projector
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan
from dattri_fn.transforms.layer_grads_paths import _raw_batched
from dattri_fn.transforms.layer_grads_ties import keep_ties, tie_factors
from dattri_fn.transforms.tie_factors import TieFactors, layout_to

DT = torch.float64
V, D, T = 11, 4, 6


class UnitTied(nn.Module):
    """tok (padding_idx 0) tied to head; token vectors unit-normalised, padding masked by where:
    d loss / d tok(ids) is NaN at the padding positions, every parameter's gradient finite."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D, padding_idx=0)
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, V)
        self.head.weight = self.tok.weight

    def forward(self, x):
        e = self.tok(x)
        u = torch.where((x != 0)[..., None], e / e.norm(dim=-1, keepdim=True), 0.0)
        return self.head(torch.tanh(self.fc(u)))


def _loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum", ignore_index=-100)


def _model():
    torch.manual_seed(0)
    m = UnitTied().to(DT).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
        m.tok.weight[0] = 0  # the padding row, as nn.Embedding leaves it
    return functional_model(m, _loss)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (n, T), generator=g)
    y = torch.randint(0, V, (n, T), generator=g)
    x[:, -1], y[:, -1] = 0, -100  # a padding position per example
    return x, y


def _both(fm, batch):
    """``(plan, dense-row LayerGrads, factored LayerGrads)`` of one batch at ``fm.params``."""
    plan = check_plan(layer_plan(fm), fm.params, batch)
    lg = layer_grads_stacked(plan, {k: v[None] for k, v in fm.params.items()}, batch)
    args, kwargs, target = (fm.unpack or default_unpack)(batch)
    raw, _ = _raw_batched(plan, fm.params, args, kwargs, target, None)
    raw = {n: (a[None], g[None]) for n, (a, g) in raw.items()}
    return plan, lg, keep_ties(lg, tie_factors(plan, raw, 2))


def _nan_tie():
    """One Embedding member, ids [[2, -1, 0, -1]] with NaN and inf g at the two -1s."""
    ids = torch.tensor([[[2, -1, 0, -1]]])
    g = torch.randn(1, 1, 4, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    g[0, 0, 1], g[0, 0, 3] = float("nan"), float("inf")
    want = torch.zeros(5, 3, dtype=DT)
    want[2], want[0] = g[0, 0, 0], g[0, 0, 2]
    return TieFactors((5, 3), (("embedding", ids, g),)), want


def test_a_non_finite_g_at_a_dropped_id_is_zeroed_where_the_factors_are_built():
    """g at id < 0 -> 0 (torch.where, not * 0): tensors() finite, rows == sum_{t: id_t >= 0} e_id g_t^T
    exactly, project_tie == P_out^T dW^T P_in (gaussian, mask, a side kept whole; 1e-12)."""
    tie, want = _nan_tie()
    assert all(bool(torch.isfinite(t).all()) for t in tie.tensors())
    torch.testing.assert_close(tie.rows(0, 5)[0, 0], want.flatten(), rtol=0, atol=0)
    for kind, k in (("gaussian", 2), ("mask", 2), ("gaussian", 8)):
        kp = make_kronecker_projector({"e": KroneckerLayer("e.weight", None, "embedding", 3, 5)},
                                      proj_dim=k, kind=kind, seed=1, dtype=DT)
        P_in, P_out = (torch.eye(n, dtype=DT) if M is None else M
                       for M, n in zip(kp.matrices("e", DT, "cpu"), (5, 3), strict=True))
        got = kp.project_tie("e", tie)[0, 0]
        torch.testing.assert_close(got, (P_out.T @ want.T @ P_in).flatten(), rtol=1e-12, atol=1e-12)


def test_padding_nan_leaves_the_factored_tie_finite_and_equal_to_the_dense_rows():
    """The unit-norm tied LM: the factored LayerGrads' to_dense == vmap(grad) rows, and its Kronecker
    projection == the dense rows' (gaussian, mask; 1e-10), both finite."""
    fm = _model()
    batch = _data(5, 1)
    G = per_sample_grad(fm.loss, fm.params, batch)
    assert bool(torch.isfinite(G).all())
    plan, lg, ft = _both(fm, batch)
    assert "tok.weight" in ft.ties
    torch.testing.assert_close(ft.to_dense()[0], G, rtol=1e-10, atol=1e-12)
    layers, rest = kronecker_layers(plan, fm.params)
    for kind in ("gaussian", "mask"):
        kp = make_kronecker_projector(layers, proj_dim=3, kind=kind, seed=7, rest=rest, dtype=DT)
        want = kp.layer_grads(lg)
        assert bool(torch.isfinite(want).all())
        torch.testing.assert_close(kp.layer_grads(ft), want, rtol=1e-10, atol=1e-12)


def test_grad_dot_and_trak_kronecker_score_a_padding_nan_model_as_the_dense_rows_do(monkeypatch):
    """Grad-Dot and TRAK (projection="kronecker") and FactGraSS on the unit-norm tied LM: finite
    scores == the dense-row path's (the tie's factors turned off; 1e-10), no NaN blamed on
    tok.weight."""
    from dattri_fn.attribute.factgrass import factgrass
    from dattri_fn.attribute.gradsim import grad_dot
    from dattri_fn.attribute.trak import trak
    from dattri_fn.transforms import layer_grads

    fm = _model()
    train, test = [_data(5, 1), _data(4, 2)], _data(3, 3)
    methods = [lambda: grad_dot(fm, proj_dim=3, projection="kronecker", seed=4),
               lambda: trak(fm, damping=0.1, proj_dim=3, projection="kronecker", seed=2)]
    methods.append(lambda: factgrass(fm, proj_dim=8, mask_dim=3, damping=0.1, seed=1))
    mods = ["gradsim", "trak_features", "factgrass"]
    scores = lambda m: m.score(fm.params, m.prepare(fm.params, train), train, test)
    with monkeypatch.context() as mp:  # the dense-row path: the plan keeps no tie factored
        mp.setattr(layer_grads, "keep_tie_factors", lambda plan: plan)
        for mod in mods:
            mp.setattr(sys.modules[f"dattri_fn.attribute.{mod}"], "keep_tie_factors",
                       lambda plan: plan)
        want = [scores(make()) for make in methods]
    calls = []
    real = tie_mod.TieFactors.__new__
    monkeypatch.setattr(tie_mod.TieFactors, "__new__",
                        lambda cls, *a: calls.append(1) or real(cls, *a))
    for make, ref in zip(methods, want, strict=True):
        calls.clear()
        got = scores(make())
        assert calls and bool(torch.isfinite(ref).all())  # the factored path was taken
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_to_converts_the_factors_and_keeps_ids_integer():
    """TieFactors.to / layout_to: g and a Linear's a in the new dtype, ids int64; values equal."""
    tie, _ = _nan_tie()
    lin = torch.randn(1, 1, 4, 3, dtype=DT), torch.randn(1, 1, 4, 5, dtype=DT)
    tie = tie._replace(members=(*tie.members, ("linear", *lin)))
    narrow = tie.to(dtype=torch.float32)
    assert [(a.dtype, g.dtype) for _, a, g in narrow.members] == [
        (torch.int64, torch.float32), (torch.float32, torch.float32)]
    assert torch.equal(narrow.members[0][1], tie.members[0][1])
    torch.testing.assert_close(narrow.rows(0, 5), tie.rows(0, 5).float(), rtol=1e-6, atol=1e-6)
    layout = (("x", ("d", 0, 3)), ("w", ("t", "w", tie)))
    moved = layout_to(layout, "cpu", torch.float32)
    assert moved[0] == layout[0] and moved[1][1][:2] == ("t", "w")
    assert moved[1][1][2].members[1][2].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_write_forms_the_rows_a_few_at_a_time_into_any_dtype(monkeypatch, dtype):
    """TieFactors.write(out): out == rows(0, V) rounded once to out's dtype, formed at most
    _WRITE_ENTRIES // (C B D) rows at a time (no full-width [C, B, V D] temporary)."""
    ids = torch.randint(-1, 7, (2, 3, 5), generator=torch.Generator().manual_seed(3))
    g = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(4), dtype=DT)
    a2, g2 = (torch.randn(2, 3, 5, n, generator=torch.Generator().manual_seed(n), dtype=DT)
              for n in (4, 7))
    tie = TieFactors((7, 4), (("embedding", ids, g), ("linear", a2, g2)))
    widths = []
    real = TieFactors.rows
    monkeypatch.setattr(tie_mod, "_WRITE_ENTRIES", 2 * 3 * 4 * 2)  # two rows at a time
    monkeypatch.setattr(TieFactors, "rows", lambda self, r0, r1: widths.append(r1 - r0)
                        or real(self, r0, r1))
    out = tie.write(torch.empty(2, 3, 28, dtype=dtype))
    assert widths[:-1] == [2, 2, 2] and max(widths) <= 2
    monkeypatch.setattr(TieFactors, "rows", real)
    full = tie.rows(0, 7)
    tol = 1e-12 if dtype == DT else 0
    torch.testing.assert_close(out, full.to(dtype), rtol=tol, atol=tol)
