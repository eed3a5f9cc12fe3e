"""FactGraSS refuses a state sketched in other blocks (stop 22, B2): a state saved when the
Kronecker layout split the parameters otherwise (GPT-2's tied wte in the rest block, between
bdee2db and d0969fc) would meet test rows sketched another way, silently."""
import pytest
import torch
from test_factgrass import _problem

from dattri_fn.attribute.factgrass import factgrass


def test_a_state_of_other_blocks_is_refused_by_score_and_self_score():
    """blocks (('0', 0, 16), ...) renamed or moved -> ValueError naming both; its own blocks score."""
    fm, (x, y) = _problem("mlp")
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2, cache_features=False)
    state = m.prepare(fm.params, (x, y))
    assert [b for b, _, _ in state.blocks] == ["0", "2"]
    assert torch.isfinite(m.score(fm.params, state, (x, y), (x[:2], y[:2]))).all()
    old = state._replace(blocks=(("0", 0, 16), ("<rest>", 16, 32)),
                         inverses={"0": state.inverses["0"], "<rest>": state.inverses["2"]})
    msg = (r"factgrass.score\(state=...\): expected a FactGraSSState sketched in the blocks "
           r"\[\('0', 0, 16\), \('2', 16, 32\)\] of this factgrass, got blocks \[\('0', 0, 16\), "
           r"\('<rest>', 16, 32\)\]. Call prepare again")
    with pytest.raises(ValueError, match=msg):
        m.score(fm.params, old, (x, y), (x[:2], y[:2]))
    with pytest.raises(ValueError, match=msg.replace("score", "self_score", 1)):
        m.self_score(fm.params, old, (x, y))
