"""A NamedTuple batch is rebuilt by its fields wherever a batch is cut to rows or to one example
(review RCD L4, stop 27: ``type(batch)(generator)`` raised a bare TypeError)."""

import collections

import torch

from dattri_fn.attribute.boundary import first_example
from dattri_fn.attribute.influence_inverse import _example
from dattri_fn.operators.stochastic import _take

P = collections.namedtuple("P", "x y")


def test_namedtuple_rows_and_examples_keep_their_type():
    b = P(torch.randn(5, 3), torch.arange(5))
    for out, i in ((first_example(b), 0), (_example(b, 3), 3)):
        assert type(out) is P and torch.equal(out.x, b.x[i]) and int(out.y) == i
    rows = _take(b, torch.tensor([4, 1]))
    assert type(rows) is P and torch.equal(rows.y, torch.tensor([4, 1]))
    r = torch.max(torch.randn(4, 3), 1)  # torch.return_types: rebuilt from a sequence
    assert type(first_example(r)) is type(r)
