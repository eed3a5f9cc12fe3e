"""LayerGrads.scores takes its first term as the sum so far (stop 23, no ``0 + term`` add): the
same values as the former ``out = 0`` formula (kept here as the reference), torch.equal."""

import pytest
import torch

from dattri_fn.transforms.factored_grads import LayerGrads


def _former(self: LayerGrads, other: LayerGrads) -> torch.Tensor:
    out = 0
    total = (lambda t: t[0]) if self.dense.shape[0] == 1 else (lambda t: t.sum(0))
    if self.dense.shape[-1]:
        out = total(torch.bmm(self.dense, other.dense.transpose(1, 2)))
    for name, (a, g) in self.factors.items():
        a2, g2 = other.factors[name]
        if a.ndim == 3:
            out = out + total(torch.bmm(a, a2.transpose(1, 2)) * torch.bmm(g, g2.transpose(1, 2)))
        else:
            aa = torch.einsum("cbti,cnsi->cbnts", a, a2)
            out = out + (aa * torch.einsum("cbto,cnso->cbnts", g, g2)).sum((0, 3, 4))
    if isinstance(out, int):
        return self.dense.new_zeros(self.num_rows, other.num_rows)
    return out


def _grads(seed, C, B, parts):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    factors, layout, dense = {}, [], r(C, B, 5 if "dense" in parts else 0)
    if "dense" in parts:
        layout.append(("d.w", ("d", 0, 5)))
    if "flat" in parts:
        factors["f"] = (r(C, B, 4), r(C, B, 3))
        layout.append(("f.weight", ("w", "f", 0)))
    if "seq" in parts:
        factors["s"] = (r(C, B, 2, 4), r(C, B, 2, 3))
        layout.append(("s.weight", ("w", "s", 0)))
    return LayerGrads(factors, dense, tuple(layout))


@pytest.mark.parametrize("parts", [("dense",), ("flat",), ("seq",), ("flat", "seq"),
                                   ("dense", "flat", "seq"), ()])
@pytest.mark.parametrize("C", [1, 2])
def test_scores_equal_the_former_sum(parts, C):
    """scores(other) == 0 + sum of the per-block terms, bit for bit (an empty layout: zeros)."""
    a, b = _grads(0, C, 4, parts), _grads(1, C, 3, parts)
    got, want = a.scores(b), _former(a, b)
    assert got.shape == (4, 3) and torch.equal(got, want)
