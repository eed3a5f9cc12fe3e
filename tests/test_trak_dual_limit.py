"""Review RA (stop 26) on the dual forms' overflow check (85d105a): the limit is that of the dtype
the scores are computed in (M1), and with several checkpoints the row named is one that overflows
at a checkpoint, not one whose norms summed over checkpoints do (L2)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.trak import trak
from dattri_fn.model import functional_model

_TRAIN = r"^trak\.prepare\(train=\.\.\.\): .*squared norm finite in {}.*example {} "


def _scaled(s: float, dtype, n: int = 8):
    """Linear(6, 4) without bias, W / s and x * s: the logits are those of s = 1, the rows
    (gradients ~ x) have squared norms ~ s^2 (d = 24 > n = 8: the dual form)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():
        net.weight.div_(s)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * s
    y = torch.randint(0, 4, (n,), generator=g)
    return functional_model(net.to(dtype), F.cross_entropy), x.to(dtype), y


def _scores(s: float, dtype, fdt):
    fm, x, y = _scaled(s, dtype)
    m = trak(fm, proj_dim=None, damping=1e-3 * s * s, feature_dtype=fdt)
    st = m.prepare(fm.params, (x, y))
    # the dual form; float32 rows under float64 params are kept dense (the fix's path)
    assert tuple(st.kernel.shape[1:]) != (24, 24) and (st.train_features is not None or fdt is None)
    return m.score(fm.params, st, None, (x[:3], y[:3])), m.self_score(fm.params, st, None)


@pytest.mark.parametrize("s", [1e19, 3e19])
def test_float32_rows_under_float64_params_are_scored_not_refused(s):
    """float32 feature rows of squared norm ~1e38-1e40 (over float32's max, each entry finite)
    are scored in float64, K's dtype: taken, and the scores are the all-float64 run's to
    float32's rounding of the rows. Before: refused against float32's max."""
    ref = _scores(s, torch.float64, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _scores(s, torch.float64, torch.float32)
    for a, b in zip(got, ref, strict=True):
        assert bool(torch.isfinite(a).all())
        assert float((a - b).norm() / b.norm()) < 1e-5


def test_float32_rows_under_float32_params_are_still_refused():
    """The same rows with float32 params are scored in float32 (NaN scores at ec5103f): refused,
    naming float32 and example 0 (the first row over the limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=_TRAIN.format("float32", 0)):
            _scores(1e19, torch.float32, torch.float32)


@pytest.mark.parametrize("C", [1, 3])
def test_the_row_named_overflows_at_a_checkpoint(C):
    """Row 0 has squared norm 2e38 at every checkpoint (within float32's 3.4e38), row 5 1e40:
    example 5 is named at C = 1 and C = 3. Before: at C = 3 the norms summed over checkpoints
    (6e38) named example 0, a row the check takes on its own."""
    torch.manual_seed(0)
    net = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        net.weight.zero_()  # uniform p: |p - e_y|^2 = 0.75, row norm^2 = 0.75 |x|^2
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    x = x / x.norm(dim=1, keepdim=True)
    x[0] *= (2e38 / 0.75) ** 0.5
    x[5] *= (1e40 / 0.75) ** 0.5
    params = [fm.params] * C if C > 1 else fm.params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=_TRAIN.format("float32", 5)):
            trak(fm, proj_dim=None, damping=1.0).prepare(params, (x.float(), y))
    x[5] /= 1e3  # no other row over: row 0 alone is taken at C = 3 too
    st = trak(fm, proj_dim=None, damping=1.0).prepare(params, (x.float(), y))
    assert bool(torch.isfinite(st.kernel).all())


def test_row_norms_are_the_largest_over_checkpoints():
    """The dense rows' branch (a [C, n, d] tensor or [C, b, d] chunks): the largest squared norm
    of each row over its checkpoints, NaN kept."""
    from dattri_fn.attribute.trak_kernel import _row_norms2

    f = torch.randn(3, 5, 4)
    f[1, 2] = float("nan")
    want = (f.double() ** 2).sum(-1).amax(0)
    for got in (_row_norms2(f), _row_norms2([f[:, :2], f[:, 2:]])):
        assert torch.allclose(got, want, equal_nan=True) and bool(got[2].isnan())
