"""``_checks.regroup`` merges only consecutive batches of one layout (review RU2 M3: dynamic
padding made every ``batch_rows`` user fail to concatenate)."""

import torch

from dattri_fn._checks import regroup


def test_batches_of_other_trailing_shapes_form_groups_of_their_own():
    """Mutation: regroup merging across shapes (the old loop) -> ValueError on the cat."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=g), torch.zeros(4)),
               (torch.randn(4, 5, generator=g), torch.ones(4)),
               (torch.randn(4, 5, generator=g), torch.ones(4)),
               (torch.randn(2, 3, generator=g), torch.zeros(2))]
    out = list(regroup(batches, 8))
    assert [tuple(b[0].shape) for b in out] == [(4, 3), (8, 5), (2, 3)]
    assert torch.equal(out[1][0], torch.cat([batches[1][0], batches[2][0]]))


def test_one_shape_groups_as_before():
    batches = [(torch.full((3, 2), float(i)),) for i in range(5)]
    out = list(regroup(batches, 6))
    assert [b[0].shape[0] for b in out] == [6, 6, 3]
