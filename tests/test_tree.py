"""ravel/unravel and params-dict arithmetic."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dattri_fn.tree import block_slices, num_params, ravel, ravel_batched, tree_add, tree_dot

shapes = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=3), min_size=1, max_size=4)


def _params(shape_list, seed):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(tuple(s), generator=g, dtype=torch.float64)
            for i, s in enumerate(shape_list)}


@given(shapes, st.integers(0, 2**16))
def test_ravel_round_trip(shape_list, seed):
    """unravel(ravel(p)) == p exactly, and len(flat) == P."""
    p = _params(shape_list, seed)
    flat, unravel = ravel(p)
    assert flat.shape == (num_params(p),)
    back = unravel(flat)
    assert list(back) == list(p)
    for k in p:
        assert torch.equal(back[k], p[k])


@given(shapes, st.integers(0, 2**16), st.integers(1, 4))
def test_unravel_batched_inverts_ravel_batched(shape_list, seed, b):
    """ravel_batched(unravel(X)) == X for X of shape [B, P]; slices locate each leaf."""
    p = _params(shape_list, seed)
    _, unravel = ravel(p)
    X = torch.randn(b, num_params(p), dtype=torch.float64)
    tree = unravel(X)
    assert torch.equal(ravel_batched(tree), X)
    for name, sl in block_slices(p).items():
        assert torch.equal(X[:, sl].reshape(b, *p[name].shape), tree[name])


def test_tree_arithmetic():
    """tree_add(a, b, 2) = a + 2b leaf-wise; tree_dot = <ravel a, ravel b>."""
    a, b = _params([[2], [3, 1]], 0), _params([[2], [3, 1]], 1)
    s = tree_add(a, b, alpha=2.0)
    assert torch.allclose(ravel(s)[0], ravel(a)[0] + 2 * ravel(b)[0], atol=1e-15)
    assert torch.allclose(tree_dot(a, b), ravel(a)[0] @ ravel(b)[0], atol=1e-12)


def test_ravel_errors():
    """Bad params and bad vectors are named in the error."""
    with pytest.raises(TypeError, match=r"ravel\(params=...\): expected a non-empty dict"):
        ravel({})
    with pytest.raises(ValueError, match=r"ravel\(params=...\): expected finite values"):
        ravel({"w": torch.tensor([float("nan")])})
    _, unravel = ravel({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unravel\(vec=...\): expected last dim 3"):
        unravel(torch.zeros(4))
