"""Review RH on engineer H's LiSSA checks: zero rows give (0, P) again (LOW-1); the mini-batch
note carries numbers from the settings (the truncated curvature, the depth that reaches the
damping floor) and is silent once that depth is reached (LOW-4)."""

import math
import warnings

import pytest
import torch

from dattri_fn.operators.stochastic import sampled
from dattri_fn.solve import ihvp_lissa

F64 = torch.float64


def _spd(eigs):
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), dtype=F64,
                                       generator=torch.Generator().manual_seed(0)))
    return Q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ Q.T


@pytest.mark.parametrize("mini", [False, True], ids=["full", "mini_batch"])
def test_zero_rows_give_zero_rows(mini):
    # mutation: the V.shape[0] == 0 return removed -> torch's max() error (full batch)
    A = _spd([1.0, 2.0, 3.0])
    op = sampled(lambda b: A, torch.zeros(8), batch_size=4) if mini else A
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mini-batch note
        out = ihvp_lissa(op, damping=0.5, scale=5.0, depth=50)(torch.zeros(0, 3, dtype=F64))
    assert out.shape == (0, 3)


def test_mini_batch_note_names_the_truncated_curvature_and_the_depth_needed():
    # mutation: the old note (no numbers) -> this fails
    A = _spd([1.0, 2.0, 3.0])
    op = sampled(lambda b: A, torch.zeros(8), batch_size=4)
    keep = 1 - 0.5 / 5.0
    need = math.ceil(math.log(1e-3) / math.log(keep)) - 1  # 65
    cut = 5.0 * (1 - 1e-3 ** (1 / 21))
    with pytest.warns(RuntimeWarning, match=rf"ihvp_lissa: on mini-batch curvature \(batch_size=4 "
                      rf"of 8 rows\) the truncation at depth=20 is unchecked by a residual.*"
                      rf"below {cut:.3g}; every direction is reached with depth >= {need}\. .*"
                      rf"depth=40"):
        ihvp_lissa(op, damping=0.5, scale=5.0, depth=20)(torch.ones(1, 3, dtype=F64))
    assert keep ** (need + 1) <= 1e-3 < keep ** need
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deep enough for the damping floor: nothing to say
        ihvp_lissa(op, damping=0.5, scale=5.0, depth=need)(torch.ones(1, 3, dtype=F64))


def test_mini_batch_note_without_damping_asks_for_damping():
    A = _spd([1.0, 2.0, 3.0])
    op = sampled(lambda b: A, torch.zeros(8), batch_size=4)
    with pytest.warns(RuntimeWarning, match=r"every direction is reached with damping > 0\."):
        ihvp_lissa(op, damping=0.0, scale=5.0, depth=20)(torch.ones(1, 3, dtype=F64))
