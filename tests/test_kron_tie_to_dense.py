"""LayerGrads.to_dense of a tie kept as factors writes its rows a few at a time (review R6 F3).

A narrower ``dtype`` (or ``out``) receives each row block rounded once: no full-precision
``[C, B, V D]`` temporary, as the docstring promises. The reference is the dense-row path's
``to_dense()`` (float64), rounded.
"""
import pytest
import torch
from test_kron_tie_factors import _both
from test_kron_ties import _data, _tied

from dattri_fn.transforms import tie_factors as tie_mod


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_to_dense_forms_a_tie_two_rows_at_a_time_in_any_dtype(monkeypatch, dtype):
    """to_dense(dtype) and to_dense(out=) of the factored tie == the dense rows' to_dense() rounded
    to dtype (float64: 1e-12), with TieFactors.rows called for <= 2 of the V = 7 rows at a time."""
    fm = _tied(True)
    _, lg, ft = _both(fm, _data(5, 1))
    want = lg.to_dense()
    C, B = want.shape[:2]
    monkeypatch.setattr(tie_mod, "_WRITE_ENTRIES", 2 * C * B * 4)  # D = 4: two rows
    widths = []
    real = tie_mod.TieFactors.rows
    monkeypatch.setattr(tie_mod.TieFactors, "rows", lambda self, r0, r1: widths.append(r1 - r0)
                        or real(self, r0, r1))
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for make in (lambda: ft.to_dense(dtype), lambda: ft.to_dense(out=torch.empty_like(want, dtype=dtype))):
        got = make()
        assert got.dtype == dtype and widths and max(widths) <= 2
        torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol * float(want.abs().max()))
        widths.clear()
