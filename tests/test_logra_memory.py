"""LoGra's memory: factored train cache, features formed block by block, merged passes capped by bytes."""

import importlib

import pytest
import torch
from test_logra import _problem

from dattri_fn.attribute.capture_rows import ONE_PASS_ROWS, PASS_SHARE, merged_passes
from dattri_fn.attribute.logra import logra

# the module itself: the package re-exports the function under its name
logra_mod = importlib.import_module("dattri_fn.attribute.logra")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * max(1.0, float(b.abs().max())))


def test_one_position_layers_cache_factors_whose_outer_products_are_the_features():
    """T = 1: the state holds (a', g') per layer; feature_rows = vec(g' a'^T); scores as streamed (1e-10)."""
    fm, (x, y) = _problem("mlp", 3, 12)
    train = [(x[:5], y[:5]), (x[5:], y[5:])]
    state = logra(fm, proj_dim=2).prepare(fm.params, train)
    assert state.train_features is None and list(state.train_factors) == list(state.eigvecs)
    assert state.cached_rows() == 12
    assert all(a.shape == (12, 2) and g.shape == (12, 2) for a, g in state.train_factors.values())
    a, g = state.train_factors["0"]
    assert torch.equal(state.feature_rows(3, 7)[:, :4], (g[3:7, :, None] * a[3:7, None, :]).flatten(1))
    # the scores from the rows a stream of the training data gives (nothing cached)
    bare = logra(fm, proj_dim=2, cache_features=False)
    streamed = bare.score(fm.params, state._replace(train_factors=None), train, (x, y))
    _close(logra(fm, proj_dim=2).score(fm.params, state, train, (x, y)), streamed)


def test_factored_scores_in_blocks_equal_the_one_product_of_the_features(monkeypatch):
    """Phi (F' + damping)^-1 Phi_test^T in blocks of 4 rows == from the held features [n, d] (1e-10)."""
    fm, (x, y) = _problem("mlp", 5, 23)
    m = logra(fm, proj_dim=(3, 2))
    train = [(x[:10], y[:10]), (x[10:], y[10:])]
    state = m.prepare(fm.params, train)
    as_features = state._replace(train_features=state.feature_rows(), train_factors=None)
    want = m.score(fm.params, as_features, None, (x[:4], y[:4]))
    monkeypatch.setattr(logra_mod, "_BLOCK_BYTES", 4 * state.feature_rows().shape[1] * 8)
    _close(m.score(fm.params, state, None, (x[:4], y[:4])), want)
    _close(m.self_score(fm.params, state, None), m.self_score(fm.params, as_features, None))
    top = m.score(fm.params, state, None, (x[:4], y[:4]), top_k=5)
    _close(top.values, want.topk(5, dim=0).values)
    assert torch.equal(top.indices, want.topk(5, dim=0).indices)


def test_positions_after_factored_batches_cache_the_features_of_every_row():
    """T = 1 then T = 3: the features of both batches, each as prepared alone (torch.equal)."""
    fm, (x1, y1) = _problem("seq", 2, 5, T=1)
    _, (x3, y3) = _problem("seq", 4, 5, T=3)
    m = logra(fm, proj_dim=2)
    state = m.prepare(fm.params, [(x1, y1), (x3, y3)])
    assert state.train_factors is None and state.train_features.shape[0] == 10
    assert torch.equal(state.train_features[:5], m.prepare(fm.params, [(x1, y1)]).feature_rows())
    assert torch.equal(state.train_features[5:], m.prepare(fm.params, [(x3, y3)]).feature_rows())
    bare = logra(fm, proj_dim=2, cache_features=False)
    both = [(x1, y1), (x3, y3)]
    streamed = bare.score(fm.params, state._replace(train_features=None), both, (x3, y3))
    _close(m.score(fm.params, state, None, (x3, y3)), streamed)


def test_merged_passes_stop_at_the_measured_bytes():
    """Runs: at most ONE_PASS_ROWS rows before anything is measured, then budget // PASS_SHARE // measured."""
    b = [(torch.zeros(1000, 2), torch.zeros(1000)) for _ in range(10)]
    seen: list = []
    measured: list = [None]
    for p in merged_passes("f", "train", b, lambda _: 1, 2**40, measured=lambda: measured[0]):
        seen.append(p[0].shape[0])
        measured[0] = 2**40 // PASS_SHARE // 2500  # the first pass measured: 2500 rows a run
    assert seen[0] == ONE_PASS_ROWS // 1000 * 1000 and seen[1:] == [2000, 2000, 2000]
    # the upper estimate still binds: budget // row_bytes = 3000 rows
    measured[0] = None
    seen = [p[0].shape[0] for p in merged_passes("f", "train", b, lambda _: 2**30, 3000 * 2**30,
                                                  measured=lambda: 1)]
    assert seen == [3000, 3000, 3000, 1000]


def _pass_rows(monkeypatch) -> list:
    """The row counts of prepare's capture passes, as logra's merged_passes yields them."""
    rows: list = []
    real = logra_mod.merged_passes

    def spy(*a, **k):
        for p in real(*a, **k):
            rows.append(p[0].shape[0])
            yield p

    monkeypatch.setattr(logra_mod, "merged_passes", spy)
    return rows


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_capped_passes_change_sums_only(kind, monkeypatch):
    """One-row passes (logra's own cap): the state and scores of one merged pass, to rounding (1e-10)."""
    fm, (x, y) = _problem(kind, 7, 16)
    train = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    m = logra(fm, proj_dim=2)
    rows = _pass_rows(monkeypatch)
    ref = m.prepare(fm.params, train)
    assert rows == [16]
    rows.clear()
    # budget // share // measured = 0 -> one row a run; before any pass is measured (seq) the
    # ONE_PASS_ROWS cap binds instead
    monkeypatch.setattr(logra_mod, "_PASS_SHARE", 2**62)
    monkeypatch.setattr("dattri_fn.attribute.capture_rows.ONE_PASS_ROWS", 1)
    got = m.prepare(fm.params, train)
    assert rows == [1] * 16
    for n in ref.eigvals:
        _close(got.eigvals[n], ref.eigvals[n])
    _close(m.score(fm.params, got, None, (x, y)), m.score(fm.params, ref, None, (x, y)))
    _close(m.self_score(fm.params, got, None), m.self_score(fm.params, ref, None))


def test_a_factored_state_saves_and_loads_whole(tmp_path):
    """io.save / io.load of a factored LoGraState: the same fields, the same scores (torch.equal)."""
    from dattri_fn import io

    fm, (x, y) = _problem("mlp", 9, 10)
    m = logra(fm, proj_dim=2)
    state = m.prepare(fm.params, [(x[:6], y[:6]), (x[6:], y[6:])])
    back = io.load(io.save(state, tmp_path / "logra.pt"))
    assert type(back) is type(state) and list(back.train_factors) == list(state.train_factors)
    assert torch.equal(m.score(fm.params, back, None, (x, y)), m.score(fm.params, state, None, (x, y)))


def test_several_blocks_rotate_one_block_of_cached_factors_at_a_time(monkeypatch):
    """review RC F1 (stop 25): scored in several blocks, the cached train factors are rotated
    (``a' @ Q_A``, ``g' @ Q_G``) one block of rows at a time, each row once: no rotated copy of
    all n rows is held. Counted as the rows of every product of a cached factor's rows with an
    eigenvector matrix (a torch-function mode around score); the scores are those of one block."""
    from torch.overrides import TorchFunctionMode

    from dattri_fn.attribute.logra_rows import _cached_spans

    fm, (x, y) = _problem("mlp", 4, 64)
    m = logra(fm, proj_dim=2)
    state = m.prepare(fm.params, [(x[:40], y[:40]), (x[40:], y[40:])])
    test = (x[:5] * 1.5, y[:5])
    whole = m.score(fm.params, state, None, test)  # one block (the default bytes)
    monkeypatch.setattr(logra_mod, "_BLOCK_BYTES", 1)
    spans = _cached_spans(state, x.device, 1, state.eigvecs)[1]
    block = spans[0][1] - spans[0][0]
    assert len(spans) > 1 and block < 64
    # (by storage: the rows are rotated as Q^T a'^T, transposed views of the same tensors)
    Qs = {Q.untyped_storage().data_ptr() for pair in state.eigvecs.values() for Q in pair}
    cached = {t.untyped_storage().data_ptr(): 0 for pair in state.train_factors.values()
              for t in pair}
    rows: list = []

    class Rotations(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm") and len(args) == 2:
                # x Q ([b, k] rows) or Q^T x^T ([k, b]): the rows' count either way
                for q, x, b in ((args[1], args[0], args[0].shape[0]),
                                (args[0], args[1], args[1].shape[-1])):
                    ptr = x.untyped_storage().data_ptr()
                    if q.untyped_storage().data_ptr() in Qs and ptr in cached:
                        rows.append(b)
                        cached[ptr] += b
            return func(*args, **(kwargs or {}))

    with Rotations():
        got = m.score(fm.params, state, None, test)
    _close(got, whole)
    assert rows and max(rows) <= block  # (one rotation of every row: 64 rows at once)
    assert set(cached.values()) == {64}  # each cached factor's rows rotated once
