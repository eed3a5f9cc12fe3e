"""Packed rademacher signs kept one byte each for a small R: the same R, the same products."""

import pytest
import torch

import dattri_fn.transforms.projector as projector_mod
from dattri_fn.transforms.project import make_projector

F64 = torch.float64


def _x(seed: int, rows: int, P: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, P, generator=g, dtype=F64).to(dtype)


@pytest.mark.parametrize("d", [64, 65, 67, 71, 125])
def test_sign_bytes_are_the_unpacked_signs(d, monkeypatch):
    """int8 signs == the table-unpacked rows (+-1, padding included), any row range and shift."""
    proj = make_projector(53, proj_dim=d, kind="rademacher", seed=4)
    cpu = torch.device("cpu")
    small = proj._unpacked(5, 40, torch.float32, cpu)
    half = proj._unpacked(0, 53, torch.float16, cpu, 0.0625)
    assert proj._sign_bytes(cpu).dtype == torch.int8
    monkeypatch.setattr(projector_mod, "_SIGN_BYTES", 0)
    fresh = make_projector(53, proj_dim=d, kind="rademacher", seed=4)
    assert fresh._sign_bytes(cpu) is None
    assert torch.equal(small, fresh._unpacked(5, 40, torch.float32, cpu))
    assert torch.equal(half, fresh._unpacked(0, 53, torch.float16, cpu, 0.0625))
    assert torch.equal(small * proj.scale, fresh.matrix(torch.float32)[5:40])


@pytest.mark.parametrize("d", [64, 67, 125])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16])
def test_products_from_sign_bytes_equal_table_unpacked(d, dtype, monkeypatch):
    """X R from the one-byte signs == X R from the table-unpacked packed signs (torch.equal),
    called and held; in float64 both equal X @ matrix() at 1e-12."""
    P, rows = 97, 11
    X = _x(d, rows, P, dtype)
    proj = make_projector(P, proj_dim=d, kind="rademacher", seed=1)
    got = [proj(X)]
    with proj.kept(dtype, "cpu"):
        got.append(proj(X))
    assert torch.device("cpu") in proj._bytes
    monkeypatch.setattr(projector_mod, "_SIGN_BYTES", 0)
    table = make_projector(P, proj_dim=d, kind="rademacher", seed=1)
    want = table(X)
    with table.kept(dtype, "cpu"):
        assert torch.equal(table(X), want)
    assert table._bytes == {}
    for g in got:
        assert torch.equal(g, want)
    if dtype == F64:
        assert torch.allclose(want, X @ proj.matrix(F64), rtol=0, atol=1e-12)
