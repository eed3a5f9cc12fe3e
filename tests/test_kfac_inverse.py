"""The K-FAC/EK-FAC inverse writes each layer's result into one ``[k, P]`` buffer: every entry
of the ravel layout is written, in whatever order the params dict puts weights and biases."""

import pytest
import torch

from dattri_fn.operators.kfac_inverse import _eigen_inverse

DT = torch.float64


def _orth(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]


def _reference(V, QA, QG, Lam, damping, names, sizes, transposed):
    """Each layer's block ``M`` read by param name, ``Q_G ((Q_G^T M Q_A) / (Lambda + damping))
    Q_A^T`` written back by name: one row at a time, no shared code with the operator."""
    offsets, start = {}, 0
    for n in names:
        offsets[n] = slice(start, start + sizes[n])
        start += sizes[n]
    out = torch.full_like(V, float("nan"))
    for r in range(V.shape[0]):
        for layer in QA:
            wk = f"{layer}.weight" if layer else "weight"
            bk = f"{layer}.bias" if layer else "bias"
            o, i = QG[layer].shape[0], QA[layer].shape[0] - (bk in names)
            w = V[r, offsets[wk]]
            W = w.reshape(i, o).T if layer in transposed else w.reshape(o, i)
            M = torch.cat([W, V[r, offsets[bk]][:, None]], 1) if bk in names else W
            X = QG[layer] @ ((QG[layer].T @ M @ QA[layer]) / (Lam[layer] + damping)) @ QA[layer].T
            out[r, offsets[wk]] = (X[:, :i].T if layer in transposed else X[:, :i]).reshape(-1)
            if bk in names:
                out[r, offsets[bk]] = X[:, i]
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("transposed", [(), ("l2",)])
def test_inverse_fills_every_entry_of_an_interleaved_layout(seed, transposed):
    """op(V)[r] == Q_G((Q_G^T M_l Q_A)/(Lambda_l + damping))Q_A^T per layer, read and written by
    param name, to 1e-12, for params ordered bias-before-weight, a root layer and a layer without
    bias; no entry left unwritten (the reference starts from NaN, the buffer from empty)."""
    g = torch.Generator().manual_seed(seed)
    # l1: 5 x 4 with bias, l2: 7 x 3 with bias (Conv1D-like when transposed), root: 2 x 3, no bias
    QA = {"l1": _orth(5, g), "l2": _orth(4, g), "": _orth(3, g)}
    QG = {"l1": _orth(5, g), "l2": _orth(7, g), "": _orth(2, g)}
    Lam = {k: torch.rand(QG[k].shape[0], QA[k].shape[0], generator=g, dtype=DT) for k in QA}
    names = ("l2.bias", "l1.weight", "weight", "l2.weight", "l1.bias")
    sizes = {"l1.weight": 20, "l1.bias": 5, "l2.weight": 21, "l2.bias": 7, "weight": 6}
    op = _eigen_inverse("test", QA, QG, Lam, names, 0.05, transposed)
    V = torch.randn(6, op.dim, generator=g, dtype=DT)
    out = op(V)
    ref = _reference(V, QA, QG, Lam, 0.05, names, sizes, transposed)
    assert op.dim == sum(sizes.values()) and out.is_contiguous()
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for r in range(V.shape[0]):  # a row alone gives the same result
        torch.testing.assert_close(op(V[r:r + 1]), out[r:r + 1], rtol=1e-12, atol=1e-12)
