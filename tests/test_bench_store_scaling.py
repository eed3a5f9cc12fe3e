"""benchmarks.store_scaling: its store-backed TRAK and EK-FAC steps score what the data score."""

import pytest
import torch

from benchmarks import store_scaling as bench


@pytest.mark.parametrize("name", ["trak", "ekfac"])
def test_store_steps_equal_scoring_from_the_data(tmp_path, name):
    """record (features written while scoring), then store (read back) give the top-k of scoring
    the generated data directly, for the same test points (float32 sums, 1e-5 relative)."""
    path = str(tmp_path / name)
    sizes = dict(n=300, batch=100, n_test=20, top_k=3, proj_dim=8)
    want = bench.setup_method("direct", name, path, **sizes)()
    assert bench.setup_method("record", name, path, **sizes)() == pytest.approx(want, rel=1e-5)
    fm, m, config = bench._method(name, 8)
    from dattri_fn.store import open_store

    state = m.prepare(fm.params, bench.Generated(300, 100))
    got = m.score(fm.params, state, open_store(path, params=fm.params, config=config),
                  bench._test(20), top_k=3).values
    ref = m.score(fm.params, state, bench.Generated(300, 100), bench._test(20), top_k=3).values
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert bench.linear_model().params["weight"].shape == (bench.CLASSES, bench.DIM)
