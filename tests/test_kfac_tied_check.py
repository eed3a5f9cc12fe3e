"""K-FAC/EK-FAC's once-per-pass check on a tied Embedding/Linear group (review R1 F2): the pooled
group's per-example gradient ``sum_t g_t h_t^T + sum_s e_{id_s} u_s^T`` of its first rows is
compared with autodiff of the tied weight. A sequence-first LM (``emb(idx.t())``, PyTorch's
word_language_model layout) with ``S = B`` gave EK-FAC's ``Lambda`` 0.23 off with no warning;
now the group's weight takes the exact Fisher-diagonal block, named in the one warning. With
``S != B`` the capture engine refuses a use: the group moves the same way (it raised before).
References are float64 ``vmap(grad)`` per-example gradients (no capture engine)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dattri_fn.operators.kfac import ekfac_factors, kfac_factors

DT = torch.float64
V, D, S = 7, 4, 5


class _LM(nn.Module):
    """Embedding -> tanh(fc) -> head tied to the embedding; ``seq_first`` runs it on [S, B]."""

    def __init__(self, seq_first: bool):
        super().__init__()
        self.emb, self.fc = nn.Embedding(V, D), nn.Linear(D, D)
        self.dec = nn.Linear(D, V, bias=False)
        self.dec.weight = self.emb.weight
        self.seq_first = seq_first

    def forward(self, idx):
        if self.seq_first:
            return self.dec(torch.tanh(self.fc(self.emb(idx.t())))).transpose(0, 1)
        return self.dec(torch.tanh(self.fc(self.emb(idx))))


def _rows(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)


def _loss(out, y):
    return _rows(out, y).sum()


_loss.per_example = _rows
_loss.sample = lambda out, y, gen: torch.multinomial(  # noqa: E731 (one draw per position)
    out.flatten(0, 1).softmax(-1), 1, generator=gen).view(y.shape)


def _problem(seq_first: bool, B: int):
    g = torch.Generator().manual_seed(0)
    model = _LM(seq_first).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    ids = torch.randint(0, V, (2 * B, S), generator=g)
    y = torch.randint(0, V, (2 * B, S), generator=g)
    return model, {k: v.detach() for k, v in model.named_parameters()}, ids, y


def _grads(model, params, ids, y) -> dict:
    def one(p, x, t):
        return _rows(functional_call(model, p, (x[None],)), t[None]).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, ids, y)


def _fit(model, params, ids, y, B, fit=ekfac_factors, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        f = fit(model, _loss, params, (ids, y), chunk_size=B, **kw)
    return f, [str(x.message) for x in w]


def test_batch_first_tied_group_passes_silently():
    """The batch-first twin (B = S): no warning, the group stays Kronecker, and Lambda_emb ==
    mean_n (Q_G^T DW_n Q_A)^2 of the autodiff gradients at 1e-12 relative."""
    model, params, ids, y = _problem(False, S)
    f, warned = _fit(model, params, ids, y, S)
    assert warned == [] and "emb" in f.Lambda
    dW = _grads(model, params, ids, y)["emb.weight"]
    ref = (f.QG["emb"].T @ dW @ f.QA["emb"]).square().mean(0)
    torch.testing.assert_close(f.Lambda["emb"], ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("B", [S, S - 1])
@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_sequence_first_tied_group_takes_the_diagonal_block(B, fit):
    """Sequence-first, S = B (silently wrong before) and S != B (raised before): the group's
    weight leaves the Kronecker layers, ONE warning names 'emb' and 'emb.weight', and its
    block is D = mean_n g_n^2 of the autodiff gradients at 1e-12 relative."""
    model, params, ids, y = _problem(True, B)
    f, warned = _fit(model, params, ids, y, B, fit)
    assert len(warned) == 1
    assert "tied group 'emb'" in warned[0] and "'emb.weight'" in warned[0]
    kron = f.A if fit is kfac_factors else f.Lambda
    assert "emb" not in kron
    G = _grads(model, params, ids, y)
    for key in ("emb.weight", "fc.weight", "fc.bias"):  # fc reads [S, B, d] too
        ref = G[key].square().mean(0)
        torch.testing.assert_close(f.diagonal[key], ref, rtol=0,
                                   atol=1e-12 * float(ref.abs().max()))


def test_others_error_refuses_the_sequence_first_tied_group_by_name():
    """others='error' refuses it, naming the tied group (S = B)."""
    model, params, ids, y = _problem(True, S)
    with pytest.raises(ValueError, match=r"ekfac_factors\(others=\.\.\.\): .*tied group 'emb'"):
        ekfac_factors(model, _loss, params, (ids, y), chunk_size=S, others="error")


def test_true_fisher_checks_the_tied_group_with_the_drawn_targets():
    """fisher='true': the batch-first twin passes silently (the reference takes the drawn
    targets, not the observed ones); the sequence-first model moves the group."""
    model, params, ids, y = _problem(False, S)
    f, warned = _fit(model, params, ids, y, S, fisher="true", seed=3)
    assert warned == [] and "emb" in f.Lambda
    model, params, ids, y = _problem(True, S)
    f, warned = _fit(model, params, ids, y, S, fisher="true", seed=3)
    assert len(warned) == 1 and "tied group 'emb'" in warned[0] and "emb" not in f.Lambda
