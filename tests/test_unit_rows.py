"""attribute.unit_rows: x / |x| bit for bit wherever |x|^2 is a normal number (review RF F2,
stop 25: a threshold of sqrt(tiny) / eps rescaled rows of norm 1e-19..9e-13 in float32 and
moved their values by an ulp); exact directions where |x|^2 overflows or is subnormal."""

import pytest
import torch

from dattri_fn.attribute.unit_rows import unit_rows

SMALL = {torch.float32: 1e-15, torch.float64: 1e-100}  # |x|^2 still a normal number
HUGE = {torch.float32: 1e25, torch.float64: 1e200}
TINY = {torch.float32: 1e-25, torch.float64: 1e-170}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_with_a_normal_square_keep_the_plain_formula(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=g, dtype=torch.float64).to(dtype)
    x[::2] *= SMALL[dtype]
    assert torch.equal(unit_rows(x), x / x.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", ["huge", "tiny"])
def test_overflowing_and_subnormal_rows_keep_their_direction(dtype, scale):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64)
    want = x / x.norm(dim=-1, keepdim=True)
    y = x.to(dtype)
    y[1] = (x[1] * (HUGE if scale == "huge" else TINY)[dtype]).to(dtype)
    got = unit_rows(y).double()
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert torch.equal(unit_rows(y)[0], unit_rows(x.to(dtype))[0])
    assert torch.equal(unit_rows(torch.zeros(2, 3, dtype=dtype)), torch.zeros(2, 3, dtype=dtype))
