"""TRAK's hand-built LayerGrads conversions carry a tie kept as factors (review R6 F3, stop 23).

``trak_state._moved`` (device / feature dtype) and ``trak_kernel.factored_gram`` (float64
widening) rebuild a ``LayerGrads`` from its factors and dense block; a ``("t", key,
TieFactors)`` source in its layout must be converted with them, or the tie stays in its old
dtype. The reference is the same float32 gradients widened factor by factor by hand.
"""
import torch
import torch.nn.functional as F
from test_kron_ties import TiedLM, _data

from dattri_fn import functional_model
from dattri_fn.attribute.trak_kernel import factored_gram
from dattri_fn.attribute.trak_state import _moved
from dattri_fn.model import default_unpack
from dattri_fn.transforms.factored_grads import LayerGrads
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan
from dattri_fn.transforms.layer_grads_paths import _raw_batched
from dattri_fn.transforms.layer_grads_ties import keep_ties, tie_factors


def _factored32(n, seed):
    """A float32 tied LM's LayerGrads of one batch (C = 1) with tok.weight kept as factors."""
    torch.manual_seed(0)
    fm = functional_model(TiedLM().float().eval(), F.cross_entropy)
    batch = _data(n, seed)
    plan = check_plan(layer_plan(fm), fm.params, batch)
    lg = layer_grads_stacked(plan, {k: v[None] for k, v in fm.params.items()}, batch)
    args, kwargs, target = (fm.unpack or default_unpack)(batch)
    raw, _ = _raw_batched(plan, fm.params, args, kwargs, target, None)
    ft = keep_ties(lg, tie_factors(plan, {k: (a[None], g[None]) for k, (a, g) in raw.items()}, 2))
    assert "tok.weight" in ft.ties
    return ft


def _by_hand(lg):
    """Every float factor widened to float64 by hand; ids kept."""
    wide = lambda t: t.double() if t.is_floating_point() else t
    layout = tuple((k, ("t", s[1], s[2].map(wide, wide)) if s[0] == "t" else s) for k, s in lg.layout)
    return LayerGrads({k: (a.double(), g.double()) for k, (a, g) in lg.factors.items()},
                      lg.dense.double(), layout)


def test_moved_converts_the_tie_factors_and_keeps_their_ids():
    """_moved(lg, cpu, float64): the tie's g and a in float64, ids int64; to_dense == by hand (exact)."""
    lg = _factored32(4, 1)
    moved = _moved(lg, "cpu", torch.float64)
    (kind, ids, g), (_, a2, g2) = moved.ties["tok.weight"].members
    assert (kind, ids.dtype, g.dtype, a2.dtype, g2.dtype) == (
        "embedding", torch.int64, torch.float64, torch.float64, torch.float64)
    assert torch.equal(moved.to_dense(), _by_hand(lg).to_dense())


def test_factored_gram_widens_the_tie_to_float64():
    """factored_gram of float32 blocks with a tie == G G^T of the rows formed from the factors
    widened by hand (float64, 1e-12 relative): the tie's inner products are float64 too."""
    blocks = [_factored32(4, 1), _factored32(3, 2)]
    rows = torch.cat([_by_hand(b).to_dense()[0] for b in blocks])
    want = rows @ rows.T
    got = factored_gram(blocks)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
