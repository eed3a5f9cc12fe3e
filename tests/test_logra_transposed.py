"""LoGra's one-position products formed transposed (stop 28, engineer C): the projected factors
and the rotated train rows come from ``[k, B]`` GEMMs (a third to half faster at k = 8 on
digits-mlp), read through transposed views; the scores are the row-form ones to rounding."""

import torch
from test_logra import _problem

from dattri_fn.attribute.logra import logra


def _row_form_scores(state, test_io):
    """<DW'_i, (F' + damping)^-1 DW'_j> from the state's factors, every product in row form."""
    S = 0
    for ln, (a, g) in state.train_factors.items():
        QA, QG = state.eigvecs[ln]
        ta, tg = a.contiguous() @ QA, g.contiguous() @ QG  # [n, k]
        ea, eg = test_io[ln]
        rows = (tg[:, :, None] * ta[:, None, :]).flatten(1)
        pre = ((eg @ QG)[:, :, None] * (ea @ QA)[:, None, :] / state.eigvals[ln]).flatten(1)
        S = S + rows @ pre.T
    return S


def test_one_position_factors_are_laid_out_transposed_and_score_as_the_row_form():
    """train_factors of an MLP: [n, k] views of [k, n] buffers (stride (1, n)); scores == row form (1e-12)."""
    fm, (x, y) = _problem("mlp", 2, 21, hidden=6, classes=4)
    m = logra(fm, proj_dim=3)
    state = m.prepare(fm.params, [(x[:11], y[:11]), (x[11:], y[11:])])
    for a, g in state.train_factors.values():
        for t in (a, g):
            if t.shape[1] == 3:  # (a projected side; an unprojected one is the layer's own)
                assert t.stride() == (1, 21)
    test = (x[:5] * 1.3, y[:5])
    test_state = m.prepare(fm.params, test)  # the test rows' projected factors, same projections
    got = m.score(fm.params, state, None, test)
    want = _row_form_scores(state, test_state.train_factors)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
