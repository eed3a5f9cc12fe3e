"""gradsim_pass.one_pass_scores: the flat-factor blocks (test side transposed once) are
torch.equal to LayerGrads.scores per block, which every other layout still takes."""

import pytest
import torch

from dattri_fn.attribute.gradsim_pass import _flat_sides, one_pass_scores
from dattri_fn.attribute.pipeline import merge_topk
from dattri_fn.transforms.factored_grads import LayerGrads

F64 = torch.float64


def _rows(C, B, dense_width, layers, seed, T=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    factors, layout = {}, []
    for i, (n_in, n_out) in enumerate(layers):
        shape = (C, B) if T is None else (C, B, T)
        factors[f"l{i}"] = (torch.cat([r(*shape, n_in), torch.ones(*shape, 1, dtype=F64)], -1),
                            r(*shape, n_out))
        layout += [(f"l{i}.weight", ("w", f"l{i}", 1)), (f"l{i}.bias", ("b", f"l{i}"))]
    if dense_width:
        layout.append(("rest", ("d", 0, dense_width)))
    return LayerGrads(factors, r(C, B, dense_width), tuple(layout))


CASES = {"one flat layer": dict(dense_width=0, layers=[(6, 3)]),
         "two flat layers": dict(dense_width=0, layers=[(6, 4), (4, 3)]),
         "flat layers and a dense block": dict(dense_width=5, layers=[(6, 4), (4, 3)]),
         "sequence layer (fallback)": dict(dense_width=0, layers=[(6, 3)], T=2),
         "two checkpoints (fallback)": dict(dense_width=2, layers=[(6, 3)], C=2)}


@pytest.mark.parametrize("case", list(CASES))
def test_one_pass_scores_equal_the_blocks_of_layer_grads_scores(case):
    kw = dict(CASES[case])
    C = kw.pop("C", 1)
    train, test = _rows(C, 11, seed=1, **kw), _rows(C, 4, seed=2, **kw)
    assert (_flat_sides(train, test) is None) == (case.endswith("(fallback)"))
    sizes = [5, 4, 2]
    want = torch.cat([train.rows(s, s + n).scores(test)
                      for s, n in zip([0, 5, 9], sizes, strict=True)])
    got = one_pass_scores("grad_dot", train, test, sizes, None, True)
    assert torch.equal(got, want)
    best = None
    for s, n in zip([0, 5, 9], sizes, strict=True):
        best = merge_topk(best, want[s:s + n], s, 3, True)
    top = one_pass_scores("grad_dot", train, test, sizes, 3, True)
    assert torch.equal(top.values, best.values) and torch.equal(top.indices, best.indices)
