"""LoGra's projections: an explicit value drawn from the seed, not a memo, the same in every state."""

import pytest
import torch
import torch.nn.functional as F
from test_logra import _problem
from torch import nn

from dattri_fn.attribute.logra import _projections, logra
from dattri_fn.model import functional_model

DT = torch.float64


def _same(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(
        (p is None and q is None) or (p is not None and q is not None and torch.equal(p, q))
        for ln in want for p, q in zip(got[ln], want[ln], strict=True))


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_projections_are_the_seeds_draws_in_the_params_dtype(kind):
    """state.projections == _projections(widths, k_in, k_out, seed) in the params' dtype, any instance."""
    fm, (x, y) = _problem(kind, 0, 8)
    train = [(x[:4], y[:4]), (x[4:], y[4:])]
    widths = {n: (fm.params[f"{n}.weight"].shape[1] + 1, fm.params[f"{n}.weight"].shape[0])
              for n in logra(fm, proj_dim=(3, 2), seed=5).prepare(fm.params, train).projections}
    want = _projections(widths, 3, 2, 5)
    assert _same(logra(fm, proj_dim=(3, 2), seed=5).prepare(fm.params, train).projections, want)
    again = logra(fm, proj_dim=(3, 2), seed=5)
    assert _same(again.prepare(fm.params, train).projections, want)
    if kind == "mlp":  # (the sequence net keeps float64 LayerNorm weights outside params)
        p32 = {k: v.float() for k, v in fm.params.items()}
        got = again.prepare(p32, [(x.float(), y)]).projections
        assert _same(got, {n: tuple(None if P is None else P.float() for P in pair)
                           for n, pair in want.items()})
    assert _same(again.prepare(fm.params, train).projections, want)  # the float64 draws untouched


class _ReadTwice(nn.Module):
    """Layer b's weight is also read by another linear call: the capture engine cannot factor b."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(h) + F.linear(h, self.b.weight)))


def test_a_narrowed_layer_set_draws_its_own_projections():
    """b dropped (one warning): layers (a, c) are drawn as indices 0, 1 of their own set, not c as index 2."""
    torch.manual_seed(0)
    fm = functional_model(_ReadTwice().to(DT).eval(), F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 6, generator=g, dtype=DT), torch.randint(0, 4, (10,), generator=g)
    with pytest.warns(RuntimeWarning, match="b: its weight is used without its bias"):
        s = logra(fm, proj_dim=3, seed=2).prepare(fm.params, [(x[:5], y[:5]), (x[5:], y[5:])])
    want = _projections({"a": (7, 6), "c": (7, 4)}, 3, 3, 2)
    assert _same(s.projections, want)
    full = _projections({"a": (7, 6), "b": (7, 6), "c": (7, 4)}, 3, 3, 2)
    assert not torch.equal(s.projections["c"][0], full["c"][0])
