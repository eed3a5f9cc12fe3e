"""stream_scores(..., top_k=k) reads train once, so it streams a one-shot iterator of batches;
without top_k (a row count first) it is refused naming the streaming remedy (review RU4 L5)."""

import pytest
import torch

from dattri_fn.attribute import stream_scores

F64 = torch.float64


def test_top_k_streams_a_one_shot_iterator_and_the_full_matrix_refuses_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 4, generator=g, dtype=F64)
    batches = [(x[i:i + 3],) for i in range(0, 11, 3)]
    test = torch.randn(2, 4, generator=g, dtype=F64)
    fn = lambda batch: batch[0]
    ref = stream_scores(fn, batches, test, top_k=3)
    got = stream_scores(fn, (b for b in batches), test, top_k=3)
    assert torch.equal(got.values, ref.values) and torch.equal(got.indices, ref.indices)
    with pytest.raises(TypeError, match=r"stream_scores\(train=...\): expected a re-iterable .* "
                       r"an object whose __iter__ builds the batches afresh"):
        stream_scores(fn, (b for b in batches), test)
