"""Projector.apply_columns(out=...): the product written into a given tensor (rows of a cache)."""

import pytest
import torch

from dattri_fn.transforms.project import make_projector


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_out_equals_returned_product(kind, dtype):
    """apply_columns(X, out=view) == apply_columns(X) bit for bit, written into the view only."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(7, 41, generator=g, dtype=torch.float64).to(dtype)
    proj = make_projector(41, proj_dim=12, kind=kind, seed=5, nnz=3 if kind == "sjlt" else 1)
    want = proj.apply_columns(lambda a, b: X[:, a:b], 7, dtype=dtype, device="cpu")
    cache = torch.full((2, 9, 12), 7.0, dtype=dtype)
    got = proj.apply_columns(lambda a, b: X[:, a:b], 7, dtype=dtype, device="cpu",
                             out=cache[1, 1:8])
    assert got.data_ptr() == cache[1, 1:8].data_ptr()
    assert torch.equal(cache[1, 1:8], want)
    assert torch.equal(cache[0], torch.full((9, 12), 7.0, dtype=dtype))  # nothing else written
    assert torch.equal(cache[1, [0, 8]], torch.full((2, 12), 7.0, dtype=dtype))


def test_out_of_the_wrong_shape_is_refused():
    """out must be [rows, d]."""
    proj = make_projector(10, proj_dim=4, seed=0, dtype=torch.float64)
    X = torch.ones(3, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Projector.apply_columns\(out=...\): expected a Tensor "
                                         r"of shape \[3, 4\], got \[3, 5\]"):
        proj.apply_columns(lambda a, b: X[:, a:b], 3, dtype=torch.float64, device="cpu",
                           out=torch.empty(3, 5, dtype=torch.float64))
