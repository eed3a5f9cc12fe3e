"""LinOp as a value: ``@`` (vectors, columns, composition), ``/ c`` and 0-d tensor scalars;
refused forms named (review RU4 L1)."""

import pytest
import torch

from dattri_fn import LinOp, as_linop

F64 = torch.float64


def _pair(P=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=F64)  # not symmetric: A and A^T differ
    return A, as_linop(A, name="A")


def test_matmul_is_the_matrix_product():
    A, op = _pair()
    B, opB = _pair(seed=1)
    x = torch.randn(5, dtype=F64)
    X = torch.randn(5, 3, dtype=F64)
    torch.testing.assert_close(op @ x, A @ x, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(op @ X, A @ X, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close((op @ opB).dense(), A @ B, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close((op @ B).shape, (5, 5))  # a [P, P] tensor is columns here


def test_division_and_tensor_scalars():
    A, op = _pair()
    for c in (2.0, torch.tensor(2.0, dtype=F64), torch.tensor(2)):
        torch.testing.assert_close((op / c).dense(), A / 2, rtol=1e-15, atol=0)
        torch.testing.assert_close((op * c).dense(), 2 * A, rtol=0, atol=0)
        torch.testing.assert_close((c * op).dense(), 2 * A, rtol=0, atol=0)
        torch.testing.assert_close((op + c).dense(), A + 2 * torch.eye(5, dtype=F64), rtol=0,
                                   atol=0)
        torch.testing.assert_close((op - c).dense(), A - 2 * torch.eye(5, dtype=F64), rtol=0,
                                   atol=0)
    t = torch.tensor(3.0, dtype=F64, requires_grad=True)
    x = torch.randn(5, dtype=F64)
    ((op * t) @ x).sum().backward()  # a scalar in autograd keeps its graph
    torch.testing.assert_close(t.grad, (A @ x).sum(), rtol=1e-14, atol=1e-14)


def test_refused_forms_are_named():
    A, op = _pair()
    with pytest.raises(TypeError, match=r"LinOp.__rmatmul__\(X=...\): X @ op needs A's "
                       r"transpose.*op @ X"):
        torch.randn(2, 5, dtype=F64) @ op
    with pytest.raises(ValueError, match=r"LinOp.__matmul__\(X=...\): expected \[5\] or columns "
                       r"\[5, m\] .* got \[2, 5\]"):
        op @ torch.randn(2, 5, dtype=F64)
    with pytest.raises(TypeError, match=r"LinOp.__truediv__\(c=...\): expected a real number or "
                       r"a 0-d tensor, got LinOp"):
        op / op
    with pytest.raises(ZeroDivisionError, match=r"LinOp.__truediv__\(c=...\)"):
        op / 0
    with pytest.raises(TypeError, match=r"LinOp.__mul__\(c=...\): expected a real number or a "
                       r"0-d tensor, got a tensor of shape \[5\]"):
        op * torch.ones(5, dtype=F64)
    with pytest.raises(TypeError, match=r"LinOp.__mul__\(c=...\)"):
        torch.ones(5, dtype=F64) * op
    assert isinstance(LinOp.identity(3) @ LinOp.identity(3), LinOp)
