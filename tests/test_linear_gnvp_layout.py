"""linear_gnvp's product skips identity layer Jacobians and takes any row layout."""

import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.operators import gauss_newton
from dattri_fn.operators.linear_gauss_newton import _eye_like, _lean

DT = torch.float64


def _mlp(hidden: int, C: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, C)).to(DT).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(24, 5, generator=g, dtype=DT), torch.randint(0, C, (24,), generator=g)
    return functional_model(net, F.cross_entropy), (x, y)


def test_lean_drops_only_identity_jacobians():
    """J_l = I exactly (the output layer's d out/dz) becomes None; a square hidden J_l (width C)
    that is not I, and the [B, C, d] one, are kept."""
    A = torch.zeros(3, 4, 4, dtype=DT)
    eye = _eye_like(A).clone()
    square = eye.clone()
    square[1, 0, 2] = 0.5
    wide = torch.ones(3, 4, 7, dtype=DT)
    a, J, A2 = _lean(({"x": A}, {"out": eye, "hid": square, "wide": wide}, A))
    assert J["out"] is None and J["hid"] is square and J["wide"] is wide and A2 is A


def test_product_equals_dense_with_a_square_hidden_layer_and_column_major_rows():
    """G V equals dense(G) V at 1e-12 when the hidden width equals C (a square J kept), and the
    product of a column-major (transposed) V equals that of its contiguous copy bit for bit."""
    fm, data = _mlp(hidden=4)
    op = gauss_newton(fm)(fm.params, data)
    V = torch.randn(op.dim, 6, generator=torch.Generator().manual_seed(3), dtype=DT).T
    assert not V.is_contiguous()
    want = V @ op.dense()  # G symmetric
    got = op.matmat(V)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    assert torch.equal(got, op.matmat(V.contiguous()))
