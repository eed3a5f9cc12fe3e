"""gram_of's one-block path (one GEMM on the whole widened rows) against its blocked path."""

import pytest
import torch

from dattri_fn.attribute import trak_kernel
from dattri_fn.attribute.trak_kernel import gram_of


def _blocked(x: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """gram_of with the one-block path shut off: ``out`` given (a zero accumulator) takes the
    blocked loop, the path every Gram took before the one-block path."""
    return gram_of(x, wide, out=x.new_zeros((x.shape[1],) * 2, dtype=torch.float64))


@pytest.mark.parametrize(("n", "d", "dtype", "wide"), [
    (500, 125, torch.float32, torch.float64),  # TRAK's digits-lr rows
    (37, 192, torch.float32, torch.float64),   # d at _GRAM_WHOLE
    (512, 64, torch.float64, torch.float64),   # n at the block's rows
    (60, 40, torch.bfloat16, torch.float32),   # half-precision rows widened to float32
    (0, 5, torch.float32, torch.float64),      # no rows: zeros
])
def test_one_block_equals_blocked_path(n, d, dtype, wide, monkeypatch):
    """gram_of(x) (one block: n <= rows, d <= 192) == the blocked path's x^T x bit for bit
    (same GEMM on the same widened block; adding it to zeros is exact), float64, and equal to
    the float64 product within 1e-12 relative (float32 sums of bfloat16 rows: 1e-5)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d)).to(dtype)
    calls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(1) or real(a, b))
    g = gram_of(x, wide)
    assert not calls  # the one-block path (torch.mm), not the blocked loop's products
    monkeypatch.undo()
    assert g.dtype == torch.float64 and g.shape == (d, d)
    assert torch.equal(g, _blocked(x, wide))
    want = x.double().mT @ x.double()
    tol = 1e-12 if wide == torch.float64 else 1e-5
    assert float((g - want).abs().max()) <= tol * max(1.0, float(want.abs().max()))


def test_larger_inputs_keep_the_blocked_path(monkeypatch):
    """Over one block of rows or over _GRAM_WHOLE columns the blocked loop runs (the counted
    GEMMs of the loop: more than one), and still gives x^T x (1e-12 relative)."""
    calls = []
    real = torch.Tensor.__matmul__

    def counted(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counted)
    for n, d, rows in [(40, 10, 16), (20, 200, 512)]:
        calls.clear()
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
        g = gram_of(x, rows=rows)
        assert len(calls) > 1, (n, d)
        want = x.mT @ x
        assert float((g - want).abs().max()) <= 1e-12 * float(want.abs().max())
    assert trak_kernel._GRAM_WHOLE == 192



@pytest.mark.parametrize("d", [3, 64, 125])
def test_a_transposed_input_equals_the_blocked_path(d):
    """The dual kernel's gram_of(f.mT): a transposed float32 x widened on the one-block path is
    laid out row-major as the blocked path's buffer, so the Grams are equal bit for bit (review
    R5 F1: with the transposed layout kept, 3e-14..1e-13 apart at n = 127)."""
    x = torch.randn(d, 127, generator=torch.Generator().manual_seed(d)).mT  # [127, d], transposed
    assert torch.equal(gram_of(x, torch.float64), _blocked(x, torch.float64))
