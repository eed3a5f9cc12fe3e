"""The K-FAC/EK-FAC diagonal block's per-example gradients from the capture engine (LayerNorm,
broadcast position embeddings): no per-example loop on a stock GPT-2 with an attention mask,
float64 against per-sequence autograd and vmap(grad) (dattri_fn/operators/kfac_diag.py)."""

import warnings

import pytest
import torch
from test_kfac_diag import _autograd_rows, _gpt2, _grads, _offsets, _problem, lm_loss

from dattri_fn.attribute import influence
from dattri_fn.model import functional_model
from dattri_fn.operators import kfac_diag
from dattri_fn.operators.kfac import ekfac_factors, kfac_factors

OUTSIDE = ["transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
           "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias", "transformer.ln_f.weight",
           "transformer.ln_f.bias"]


def test_gpt2_diagonal_rows_come_from_one_capture_pass():
    """Stock GPT-2 with a padding mask (vmap refuses it): diagonal_rows of wpe and every
    LayerNorm's weight and bias equal per-sequence autograd (1e-10), with no warning (no
    per-example loop) and no backward per example (the one-example loss is never called)."""
    from dattri_fn.losses import causal_lm_loss

    model, batch = _gpt2()
    state = {k: v.detach() for k, v in model.named_parameters()}
    calls = []
    real = kfac_diag._example_loss

    def counted(*a):
        calls.append(1)
        return real(*a)

    kfac_diag._example_loss = counted
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rows = kfac_diag.diagonal_rows(
                model, causal_lm_loss, state, OUTSIDE, (),
                {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                batch["labels"])
    finally:
        kfac_diag._example_loss = real
    assert not calls
    got = torch.cat([rows[k].flatten(1) for k in OUTSIDE], 1)
    ref = _autograd_rows(model, batch, OUTSIDE, causal_lm_loss)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_gpt2_every_param_scores_equal_the_dense_reference(solver):
    """Tiny stock GPT-2, every param, others='diagonal': prepare runs with no warning and the
    score passes' diagonal rows without the per-example loop; D = mean autograd g^2 of wpe and
    the LayerNorms (1e-10) and the scores = the restricted run's + g_i^T diag(1/(D+damping)) g_j
    (1e-9), for K-FAC and EK-FAC."""
    from dattri_fn.losses import causal_lm_loss

    model, batch = _gpt2()
    fm = functional_model(model, causal_lm_loss)
    m = influence(fm, solver=solver, damping=0.1, others="diagonal")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the factor passes: no loop, no fallback
        state = m.prepare(fm.params, batch)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        S = m.score(fm.params, state, batch, batch)
        self_scores = m.self_score(fm.params, state, batch)
    # the diagonal block's rows never loop (the raveled test side's layer plan still does
    # for the tied wte: its own warning, "layer_grads: ...")
    assert not [w for w in got if "(params=...): vmap cannot run" in str(w.message)]
    assert list(state.factors.diagonal) == OUTSIDE
    kron = functional_model(model, causal_lm_loss, params=lambda n: n not in OUTSIDE)
    mk = influence(kron, solver=solver, damping=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = mk.prepare(kron.params, batch)
        Sk = mk.score(kron.params, sk, batch, batch)
    G = _autograd_rows(model, batch, OUTSIDE, causal_lm_loss)
    d = torch.cat([state.factors.diagonal[k].reshape(-1) for k in OUTSIDE])
    torch.testing.assert_close(d, G.square().mean(0), rtol=1e-10, atol=1e-14)
    ref = Sk + G / (d + 0.1) @ G.T
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-9 * float(ref.abs().max()))
    torch.testing.assert_close(self_scores, ref.diagonal(), rtol=0,
                               atol=1e-9 * float(ref.abs().max()))


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_position_ids_with_as_many_positions_as_rows_fall_back_exactly(fit):
    """PosLM reads pos with arange(T) ids, T = 5: a chunk of 5 rows makes them look like one row
    per example, which the capture refuses (a broadcast of flat rows), so that chunk's pos
    gradients come from vmap(grad); a chunk of 3 is captured. D = mean g^2 (1e-10) either way."""
    model, ids, labels = _problem(4, n=8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = fit(model, lm_loss, params, (ids, labels), chunk_size=5)
    G = _grads(model, params, ids, labels)
    off = _offsets(params)
    assert "pos.weight" in f.diagonal
    for k, d in f.diagonal.items():
        ref = G[:, off[k]:off[k] + d.numel()].square().mean(0).reshape(d.shape)
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)


class _PosUnsqueezed(torch.nn.Module):
    """PosLM whose position table is read with [T] ids and broadcast after an unsqueeze: with
    T = B the lookup looks like one id per example to the capture (review R1 F1)."""

    def __init__(self, model):
        super().__init__()
        self.tok, self.pos, self.ln, self.fc, self.head = (model.tok, model.pos, model.ln,
                                                           model.fc, model.head)

    def forward(self, idx):
        p = self.pos(torch.arange(idx.shape[1])).unsqueeze(0)
        return self.head(torch.tanh(self.fc(self.ln(self.tok(idx) + p))))


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
@pytest.mark.parametrize("chunk", [5, 8])
def test_flat_ids_equal_to_the_batch_take_autodiff(fit, chunk):
    """[T] position ids with T = 5 = a chunk's B (the first chunk, or the last of 8 + 5): D of
    the position table = mean_n g_n^2 of per-sequence autograd at 1e-12 (0.72-0.89 off before)."""
    base, ids, labels = _problem(4, n=13)
    model = _PosUnsqueezed(base).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        f = fit(model, lm_loss, params, (ids, labels), chunk_size=chunk)
    G, off = _grads(model, params, ids, labels), _offsets(params)
    d = f.diagonal["pos.weight"]
    ref = G[:, off["pos.weight"]:off["pos.weight"] + d.numel()].square().mean(0).reshape(d.shape)
    torch.testing.assert_close(d, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
