"""A tied key kept as its members' factors (stop 23, issue 14): never its ``[B, V D]`` rows.

The references are the dense-row path the factors replace: the same plan's ``LayerGrads`` with
the tie's rows in the dense block (``dense_rows``), projected by the same projector, and
float64 ``vmap(grad)`` rows.
"""
import sys

import pytest
import torch
from test_kron_ties import DT, _data, _gpt2, _gpt2_data, _rows, _tied

from dattri_fn.model import default_unpack
from dattri_fn.transforms.factored_grads import LayerGrads
from dattri_fn.transforms.kronecker import kronecker_layers, make_kronecker_projector
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan
from dattri_fn.transforms.layer_grads_paths import _raw_batched
from dattri_fn.transforms.layer_grads_ties import keep_ties, tie_factors
from dattri_fn.transforms.tie_factors import TieFactors


def _both(fm, batch):
    """``(plan, dense-row LayerGrads, factored LayerGrads)`` of one batch at ``fm.params``."""
    plan = check_plan(layer_plan(fm), fm.params, batch)
    lg = layer_grads_stacked(plan, {k: v[None] for k, v in fm.params.items()}, batch)
    args, kwargs, target = (fm.unpack or default_unpack)(batch)
    raw, _ = _raw_batched(plan, fm.params, args, kwargs, target, None)
    raw = {n: (a[None], g[None]) for n, (a, g) in raw.items()}
    return plan, lg, keep_ties(lg, tie_factors(plan, raw, 2))


@pytest.mark.parametrize("head_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_factored_tie_gives_the_same_gradients_without_its_rows(bias, head_first):
    """to_dense, columns, scores, row_dots, sq_norms, scale, rows, select, cat: factored == dense (1e-12)."""
    fm = _tied(bias, head_first)
    plan, lg, ft = _both(fm, _data(5, 1))
    key = "head.weight" if head_first else "tok.weight"
    assert dict(ft.layout)[key][:2] == ("t", key) and key in ft.ties and not lg.ties
    assert ft.dense.shape[-1] == lg.dense.shape[-1] - 7 * 4  # the V D columns are not held
    G = _rows(fm, _data(5, 1))
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    close(ft.to_dense()[0], G)
    close(ft.to_dense(), lg.to_dense())
    P = G.shape[1]
    for s, e in ((0, P), (3, 17), (P - 9, P)):
        close(ft.columns(s, e), lg.columns(s, e))
    _, lg2, ft2 = _both(fm, _data(3, 2))
    close(ft.scores(ft2), lg.scores(lg2))
    close(ft.scores(ft2), G @ _rows(fm, _data(3, 2)).T)
    close(ft.row_dots(ft), lg.row_dots(lg))
    close(ft.sq_norms(), lg.sq_norms())
    w = torch.linspace(0.5, 2.0, 5, dtype=DT)[None]
    close(ft.scale(w).to_dense(), lg.scale(w).to_dense())
    close(ft.rows(1, 4).to_dense(), lg.rows(1, 4).to_dense())
    close(ft.select(0).to_dense(), lg.select(0).to_dense())
    close(LayerGrads.cat([ft, ft2]).to_dense(), LayerGrads.cat([lg, lg2]).to_dense())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt", "mask"])
@pytest.mark.parametrize("head_first", [False, True])
@pytest.mark.parametrize("proj_dim", [3, 8])
def test_projection_from_the_factors_equals_the_dense_rows_projected(kind, head_first, proj_dim):
    """layer_grads: vec(P_out^T G P_in) from gathers and products == from the dense rows (1e-10)."""
    fm = _tied(True, head_first)
    plan, lg, ft = _both(fm, _data(5, 3))
    layers, rest = kronecker_layers(plan, fm.params)
    kp = make_kronecker_projector(layers, proj_dim=proj_dim, kind=kind, seed=7, rest=rest,
                                  dtype=DT)
    want = kp.layer_grads(lg)
    torch.testing.assert_close(kp.layer_grads(ft), want, rtol=1e-10, atol=1e-12)


def test_negative_ids_add_nothing():
    """An Embedding member's id < 0 (a dropped row, as capture.weight_grad drops it) adds nothing
    to the rows and to the gathers P[id]."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[[2, -1, 0]]])
    gr = torch.randn(1, 1, 3, 4, generator=g, dtype=DT)
    tie = TieFactors((5, 4), (("embedding", ids, gr),))
    want = torch.zeros(5, 4, dtype=DT)
    want[2] += gr[0, 0, 0]
    want[0] += gr[0, 0, 2]
    torch.testing.assert_close(tie.rows(0, 5)[0, 0], want.flatten(), rtol=0, atol=0)
    from dattri_fn.transforms.kronecker import KroneckerLayer
    for kind in ("gaussian", "mask"):
        kp = make_kronecker_projector({"e": KroneckerLayer("e.weight", None, "embedding", 4, 5)},
                                      proj_dim=3, kind=kind, seed=1, dtype=DT)
        P_in, P_out = kp.matrices("e", DT, "cpu")
        ref = (P_out.T @ want.T @ P_in).flatten()
        torch.testing.assert_close(kp.project_tie("e", tie)[0, 0], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_gpt2_wte_projected_from_its_factors_equals_its_dense_rows_projected():
    """Tiny GPT-2 (V = 40, D = 8), every param, padding: Kronecker projection (gaussian, mask) and
    to_dense from the wte/lm_head factors == the dense-row path (1e-10) == vmap(grad) rows."""
    fm = _gpt2()
    batch = _gpt2_data(4, 1)
    plan, lg, ft = _both(fm, batch)
    assert dict(ft.layout)["transformer.wte.weight"][:2] == ("t", "transformer.wte.weight")
    torch.testing.assert_close(ft.to_dense()[0], _rows(fm, batch), rtol=1e-10, atol=1e-12)
    layers, rest = kronecker_layers(plan, fm.params)
    for kind in ("gaussian", "mask"):
        kp = make_kronecker_projector(layers, proj_dim=3, kind=kind, seed=4, rest=rest, dtype=DT)
        want = kp.layer_grads(lg)
        torch.testing.assert_close(kp.layer_grads(ft), want, rtol=1e-10,
                                   atol=1e-10 * float(want.abs().max()))


def test_the_kronecker_consumers_never_form_the_tie_rows(monkeypatch):
    """Grad-Dot and TRAK (kronecker), FactGraSS on the tied LM: tie rows (dense_rows' or
    TieFactors.rows) are formed only for the plan check's <= 3 compared examples (batches of 5, 6,
    4); project_tie is used; scores == the dense-row path's (1e-10)."""
    from dattri_fn.attribute.factgrass import factgrass
    from dattri_fn.attribute.gradsim import grad_dot
    from dattri_fn.attribute.trak import trak
    from dattri_fn.transforms import layer_grads, layer_grads_ties, tie_factors
    from dattri_fn.transforms.kronecker import KroneckerProjector

    fm = _tied(True)
    train, test = [_data(5, 1), _data(6, 2)], _data(4, 3)
    methods = [lambda: grad_dot(fm, proj_dim=3, projection="kronecker", seed=4),
               lambda: trak(fm, damping=0.1, proj_dim=3, projection="kronecker", seed=2),
               lambda: factgrass(fm, proj_dim=8, mask_dim=3, damping=0.1, seed=1)]
    scores = lambda m: m.score(fm.params, m.prepare(fm.params, train), train, test)
    with monkeypatch.context() as mp:  # the dense-row path: the plan keeps no tie factored
        mp.setattr(layer_grads, "keep_tie_factors", lambda plan: plan)
        for mod in ("gradsim", "factgrass", "trak_features"):
            mp.setattr(sys.modules[f"dattri_fn.attribute.{mod}"], "keep_tie_factors",
                       lambda plan: plan)
        want = [scores(make()) for make in methods]

    calls, widths = [], []
    real_tie, real_rows = KroneckerProjector.project_tie, tie_factors.TieFactors.rows
    real_layer = layer_grads_ties._layer_rows
    monkeypatch.setattr(KroneckerProjector, "project_tie",
                        lambda self, *a: calls.append(1) or real_tie(self, *a))
    monkeypatch.setattr(tie_factors.TieFactors, "rows",
                        lambda self, *a: widths.append(self.members[0][2].shape[1])
                        or real_rows(self, *a))
    monkeypatch.setattr(layer_grads_ties, "_layer_rows",
                        lambda spec, a, g, lead, shape: widths.append(g.shape[1])
                        or real_layer(spec, a, g, lead, shape))
    for make, ref in zip(methods, want, strict=True):
        calls.clear()
        widths.clear()
        got = scores(make())
        assert calls and max(widths, default=0) <= 3
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
