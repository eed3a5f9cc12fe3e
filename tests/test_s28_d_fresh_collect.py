"""``collect(..., fresh=True)`` returns the rows of one batch as the feature map gave them (no
``torch.cat`` of one block, stop 28 D: FactGraSS's test rows, which its feature stream
allocates); ``fresh=False`` (the default) still copies them, so a caller may change what it gets
without touching a feature map's own tensor; two batches are concatenated either way."""
import torch
from test_factgrass_noop_ops import _bare, _Record

from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.attribute.pipeline import collect


def test_fresh_returns_the_one_batch_s_rows_and_the_default_a_copy():
    cache = torch.arange(12.0).view(4, 3)
    fn = lambda batch: cache  # noqa: E731 (a feature map returning a tensor it holds)
    batch = torch.zeros(4, 2)
    assert collect(fn, batch, fresh=True) is cache
    got = collect(fn, batch)
    assert got is not cache and torch.equal(got, cache)
    got.add_(1)
    assert cache[0, 0] == 0  # the default's copy is the caller's own
    two = collect(lambda b: cache[: b[0].shape[0]], [(batch[:2],), (batch[2:],)], fresh=True)
    assert torch.equal(two, torch.cat([cache[:2], cache[:2]]))


def test_factgrass_score_concatenates_no_single_block_of_test_rows():
    fm, data = _bare(torch.float32)
    m = factgrass(fm, proj_dim=16, mask_dim=4)
    state = m.prepare(fm.params, data)
    with _Record() as rec:
        s = m.score(fm.params, state, None, data)
    assert "cat" not in rec.names(), rec.names()
    assert s.shape == (state.cached_rows(), data[0].shape[0]) and torch.isfinite(s).all()
