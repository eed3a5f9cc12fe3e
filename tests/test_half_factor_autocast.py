"""Half-precision factorisations (RU3 M4) round their basis back to the input's dtype, except
under autocast, where torch's own eigh/QR return float32 for half inputs: the basis then stays
in the dtype of the params (a float32 model under bf16 autocast, as before stop 27's change)."""

import pytest
import torch

from dattri_fn.attribute.logra_basis import _eigvecs as logra_eigvecs
from dattri_fn.operators.kfac_ekfac import _eigvecs as ekfac_eigvecs
from dattri_fn.solve.block_cg import _orth


def _spd(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 6, generator=g)
    return (X @ X.T + torch.eye(6)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ekfac_basis_dtype(dtype):
    """Mutation: the autocast condition removed -> a bf16 basis under autocast."""
    assert ekfac_eigvecs(_spd(dtype)).dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ekfac_eigvecs(_spd(dtype)).dtype == torch.float32


def test_logra_basis_dtype():
    S = _spd(torch.bfloat16)
    assert logra_eigvecs({"l": (S, S)})["l"][0].dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert logra_eigvecs({"l": (S, S)})["l"][0].dtype == torch.float32


def test_block_cg_basis_dtype():
    S = _spd(torch.bfloat16)
    W = torch.cat([S[:, :2], S[:, :1]], dim=1)  # a dependent column: the Householder QR path
    assert _orth(W).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _orth(W).dtype == torch.float32
