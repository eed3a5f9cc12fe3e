"""Review RF (stop 27), the operators half: gauss_newton refuses a train-mode Dropout model by
name (M1); hvp(mode="fwd-rev") of a functools.wraps copy of fm.loss with an attributed padding
Embedding runs rev-rev, so H stays symmetric (M2)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, gauss_newton, hvp

F64 = torch.float64


def test_gauss_newton_refuses_train_mode_dropout():
    """Was: G V a random draw per call (RF: two runs differ). Mutation: the check_eval line
    removed -> no error, unequal products."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).to(F64)
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(net.train(), F.cross_entropy)
    with pytest.raises(ValueError, match=r"^gauss_newton\(fm=\.\.\.\): expected a module in "
                                         r"eval mode.*Dropout in training mode at \['2'\]"):
        gauss_newton(fm)
    net.eval()
    gauss_newton(fm)


class _Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(5, 3, padding_idx=0), nn.Linear(3, 2)

    def forward(self, t):
        return self.head(torch.tanh(self.emb(t)).mean(1))


def test_hvp_fwd_rev_of_a_wrapped_loss_keeps_the_padding_row():
    """RF: max|H - H_revrev| 0.0513 and H not symmetric, since bridge_of refuses the wrapper.
    Mutation: hvp reads bridge_of(loss) again -> the asserts fail."""
    torch.manual_seed(0)
    fm = functional_model(_Emb().to(F64).eval(), F.cross_entropy)
    wrapped = functools.wraps(fm.loss)(lambda p, ex: fm.loss(p, ex))
    t, y = torch.randint(0, 5, (6, 4)), torch.randint(0, 2, (6,))
    V = torch.eye(sum(v.numel() for v in fm.params.values()), dtype=F64)
    ref = hvp(fm.loss, fm.params, (t, y), mode="rev-rev")(V)
    H = hvp(wrapped, fm.params, (t, y), mode="fwd-rev")(V)
    torch.testing.assert_close(H, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
