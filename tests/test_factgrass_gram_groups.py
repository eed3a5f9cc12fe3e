"""FactGraSS's Fisher grams (stop 28, D): the blocks of one width that lie side by side take one
batched product (``torch.bmm`` over a ``[n_blocks, b, d]`` view of the rows), equal bit for bit to
one ``mm`` per block; blocks of a width split by another take one ``mm`` each; ``_inverses``
factors the stacks as given (no ``torch.stack`` of the grams)."""
import importlib

import pytest
import torch

from dattri_fn.attribute.factgrass import factgrass

FISHER = importlib.import_module("dattri_fn.attribute.factgrass_fisher")

SIDE = (("a", 0, 8), ("c", 8, 16), ("b", 16, 20))  # the two 8-wide blocks side by side
SPLIT = (("a", 0, 8), ("b", 8, 12), ("c", 12, 20))  # the 4-wide block between them


def test_groups_are_the_blocks_of_each_width_and_side_by_side_only_where_adjacent():
    assert FISHER._gram_groups(SIDE) == [(("a", "c"), 0, 16, 8), (("b",), 16, 20, 4)]
    assert FISHER._gram_groups(SPLIT) == [(("a", "c"), 0, None, 8), (("b",), 8, 12, 4)]
    assert FISHER._gram_groups((("x", 0, 5),)) == [(("x",), 0, 5, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocks", [SIDE, SPLIT, (("x", 0, 20),)])
def test_group_grams_equal_one_mm_per_block_bit_for_bit(dtype, blocks):
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(300, 20, generator=g, dtype=dtype)
    for phi in (buf, buf[:77], buf[5:205]):  # the whole buffer, its first rows, a row window
        for names, s, e, d in FISHER._gram_groups(blocks):
            got = FISHER._group_gram(phi, s, e, d, blocks, names)
            cols = {b: (s0, e0) for b, s0, e0 in blocks}
            want = torch.stack([phi[:, cols[b][0]:cols[b][1]].mT @ phi[:, cols[b][0]:cols[b][1]]
                                for b in names])
            assert got.shape == (len(names), d, d)
            assert torch.equal(got, want), (names, phi.shape)


@pytest.mark.parametrize("damping", [None, 0.3])
def test_inverses_of_stacked_grams_equal_those_of_a_gram_per_block(damping):
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(40, 20, generator=g, dtype=torch.float64)
    per_block = {b: phi[:, s:e].mT @ phi[:, s:e] for b, s, e in SPLIT}
    stacked = {names: FISHER._group_gram(phi, s, e, d, SPLIT, names)
               for names, s, e, d in FISHER._gram_groups(SPLIT)}
    one = FISHER._inverses("f", per_block, SPLIT, 40, damping, lambda: iter(()))
    two = FISHER._inverses("f", stacked, SPLIT, 40, damping, lambda: iter(()))
    assert list(one) == list(two) == ["a", "c", "b"]
    for b, s, e in SPLIT:
        assert torch.equal(one[b], two[b])
        F = per_block[b] / 40
        lam = 0.1 * float(F.diagonal().mean()) if damping is None else damping
        want = torch.linalg.inv(F + lam * torch.eye(e - s, dtype=F.dtype))
        torch.testing.assert_close(two[b], want, rtol=1e-10, atol=1e-12)


def test_a_model_with_blocks_of_two_widths_scores_as_its_features_and_inverses():
    """End to end: every block's Fisher, inverse and score from the state's own features."""
    from test_factgrass import _problem

    fm, (x, y) = _problem("mlp", n=40)
    m = factgrass(fm, proj_dim=22, mask_dim=5, seed=4)  # 5 x 5 -> 22 wide; 5 x 4 = 20 kept
    state = m.prepare(fm.params, (x, y))
    assert len({e - s for _, s, e in state.blocks}) == 2, state.blocks
    phi = state.train_features
    test = (x[:5], y[:5])
    want = torch.zeros(40, 5, dtype=phi.dtype)
    t = m.prepare.feature_rows(fm.params, m.prepare(fm.params, test))
    for _b, s, e in state.blocks:
        F = phi[:, s:e].mT @ phi[:, s:e] / 40
        F = F + 0.1 * F.diagonal().mean() * torch.eye(e - s, dtype=F.dtype)
        want += phi[:, s:e] @ torch.linalg.solve(F, t[:, s:e].mT)
    torch.testing.assert_close(m.score(fm.params, state, (x, y), test), want, rtol=1e-9,
                               atol=1e-12 * float(want.abs().max()))
