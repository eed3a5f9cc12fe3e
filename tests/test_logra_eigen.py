"""LoGra's eigenbasis scores (cached T = 1 factors) against the dense preconditioner, float64."""

import pytest
import torch
from test_logra import _problem

from dattri_fn.attribute.logra import logra
from dattri_fn.attribute.logra_curvature import _eigen_rows
from dattri_fn.attribute.logra_rows import _features, _outer_rows


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * max(1.0, float(b.abs().max())))


def _dense_inverse(state):
    """blockdiag over layers of (Q_G kron Q_A) diag(1 / (Lambda + damping)) (Q_G kron Q_A)^T."""
    blocks = []
    for n, (QA, QG) in state.eigvecs.items():
        K = torch.kron(QG, QA)
        blocks.append(K @ torch.diag(1 / state.eigvals[n].flatten()) @ K.T)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("proj", [2, (3, 2), None])
@pytest.mark.parametrize("damping", [None, 0.05])
@pytest.mark.parametrize("seed", [0, 1])
def test_eigenbasis_scores_equal_the_dense_preconditioner(proj, damping, seed):
    """s_ij = DW'_i^T (F' + damping)^-1 DW'_j with F'^-1 formed densely, 1e-10; top_k likewise."""
    fm, (x, y) = _problem("mlp", seed, 11)
    train, test = [(x[:6], y[:6]), (x[6:], y[6:])], (x[:7] * 1.5, y[:7])
    m = logra(fm, proj_dim=proj, damping=damping)
    state = m.prepare(fm.params, train)
    assert state.train_features is None and state.train_factors  # the eigenbasis path
    phi_test = m.prepare(fm.params, test).feature_rows()  # same projections (same seed, widths)
    ref = state.feature_rows() @ _dense_inverse(state) @ phi_test.T
    _close(m.score(fm.params, state, train, test), ref)
    _close(m.score(fm.params, state, None, test), ref)
    top = m.score(fm.params, state, None, test, top_k=4)
    _close(top.values, ref.topk(4, dim=0).values)
    assert torch.equal(top.indices, ref.topk(4, dim=0).indices)


@pytest.mark.parametrize("T", [1, 3])
def test_eigen_rows_are_the_rotated_features_over_the_eigenvalues(T):
    """_eigen_rows = vec(Q_G^T DW' Q_A) / (Lambda + damping) per layer (T = 1 and T > 1 rows),
    and _outer_rows of the T = 1 factors with eigvecs is vec(Q_G^T DW'_i Q_A)."""
    g = torch.Generator().manual_seed(T)
    dt = torch.float64
    io = {"a": (torch.randn(5, T, 3, generator=g, dtype=dt), torch.randn(5, T, 2, generator=g, dtype=dt)),
          "b": (torch.randn(5, T, 4, generator=g, dtype=dt), torch.randn(5, T, 4, generator=g, dtype=dt))}
    eigvecs = {n: (torch.linalg.qr(torch.randn(a.shape[-1], a.shape[-1], generator=g, dtype=dt))[0],
                   torch.linalg.qr(torch.randn(q.shape[-1], q.shape[-1], generator=g, dtype=dt))[0])
               for n, (a, q) in io.items()}
    eigvals = {n: torch.rand(QG.shape[0], QA.shape[0], generator=g, dtype=dt) + 0.1
               for n, (QA, QG) in eigvecs.items()}
    feats, got, start = _features(io), _eigen_rows(io, eigvecs, eigvals), 0
    for n, (QA, QG) in eigvecs.items():
        ko, ki = QG.shape[0], QA.shape[0]
        M = feats[:, start:start + ko * ki].reshape(5, ko, ki)
        _close(got[:, start:start + ko * ki].reshape(5, ko, ki), (QG.T @ M @ QA) / eigvals[n])
        if T == 1:
            a, q = io[n]
            rows = _outer_rows({n: (a[:, 0], q[:, 0])}, {n: eigvecs[n]})
            _close(rows.reshape(5, ko, ki), QG.T @ M @ QA)
        start += ko * ki


def test_a_test_store_holds_features_and_scores_through_the_preconditioner(tmp_path):
    """A store given as test (cached factor state) records the features DW'_j, not eigenbasis
    rows, and scores as the data does."""
    from dattri_fn.store import open_store, record_store

    fm, (x, y) = _problem("mlp", 4, 10)
    train, test = [(x[:5], y[:5]), (x[5:], y[5:])], (x[:4], y[:4])
    m = logra(fm, proj_dim=2)
    state = m.prepare(fm.params, train)
    cfg = {"method": "logra", "proj_dim": 2, "seed": 0}
    want = m.score(fm.params, state, train, test)
    _close(m.score(fm.params, state, train, record_store(tmp_path, test, params=fm.params,
                                                          config=cfg)), want)
    store = open_store(tmp_path, params=fm.params, config=cfg)
    _close(store.read(), m.prepare(fm.params, test).feature_rows())
    _close(m.score(fm.params, state, train, store), want)


def test_eigenbasis_scores_block_by_block(monkeypatch):
    """Cached factors rotated block by block (small blocks): the same scores and top_k, 1e-10."""
    import sys

    fm, (x, y) = _problem("mlp", 2, 13)
    train, test = [(x[:7], y[:7]), (x[7:], y[7:])], (x[:5], y[:5])
    m = logra(fm, proj_dim=2)
    state = m.prepare(fm.params, train)
    whole = m.score(fm.params, state, None, test)
    phi_test = m.prepare(fm.params, test).feature_rows()
    _close(whole, state.feature_rows() @ _dense_inverse(state) @ phi_test.T)
    monkeypatch.setattr(sys.modules[logra.__module__], "_BLOCK_BYTES", 1)
    _close(m.score(fm.params, state, None, test), whole)
    _close(m.score(fm.params, state, None, test, top_k=3).values, whole.topk(3, dim=0).values)


@pytest.mark.parametrize("factors", [None, {}], ids=["None", "empty"])
def test_a_state_without_cached_factors_streams_train_as_features(factors):
    """review R6 F1: a state with train_factors={} (cached_rows() None) scores by streaming
    train through the preconditioner, equal to the cached state's scores (the eigenbasis test
    rows against unrotated train features gave rel 1.33)."""
    fm, (x, y) = _problem("mlp", 2, 11)
    train, test = [(x[:6], y[:6]), (x[6:], y[6:])], (x[:5] * 1.5, y[:5])
    m = logra(fm, proj_dim=2)
    state = m.prepare(fm.params, train)
    want = m.score(fm.params, state, train, test)
    bare = state._replace(train_factors=factors)
    assert bare.cached_rows() is None
    _close(m.score(fm.params, bare, train, test), want)
    _close(m.score(fm.params, bare, train, test, top_k=3).values, want.topk(3, dim=0).values)


def test_two_d_factors_give_the_rows_of_their_one_position_form():
    """A layer given 2-d ([B, k], one position: _raw's plain-MLP factors) gives the features and
    eigenbasis rows of its [B, 1, k] form, torch.equal (float64 and float32), and the eigenbasis
    rows are vec(Q_G^T g a^T Q_A) / (Lambda + damping) (1e-10)."""
    for dt in (torch.float64, torch.float32):
        g = torch.Generator().manual_seed(5)
        io2 = {"a": (torch.randn(6, 3, generator=g, dtype=dt), torch.randn(6, 2, generator=g, dtype=dt)),
               "b": (torch.randn(6, 4, generator=g, dtype=dt), torch.randn(6, 4, generator=g, dtype=dt))}
        io3 = {n: (a[:, None], q[:, None]) for n, (a, q) in io2.items()}
        eigvecs = {n: (torch.linalg.qr(torch.randn(a.shape[1], a.shape[1], generator=g, dtype=dt))[0],
                       torch.linalg.qr(torch.randn(q.shape[1], q.shape[1], generator=g, dtype=dt))[0])
                   for n, (a, q) in io2.items()}
        eigvals = {n: torch.rand(QG.shape[0], QA.shape[0], generator=g, dtype=dt) + 0.1
                   for n, (QA, QG) in eigvecs.items()}
        assert torch.equal(_features(io2), _features(io3))
        got = _eigen_rows(io2, eigvecs, eigvals)
        assert torch.equal(got, _eigen_rows(io3, eigvecs, eigvals))
        if dt == torch.float64:
            start = 0
            for n, (QA, QG) in eigvecs.items():
                a, q = io2[n]
                want = (QG.T @ (q[:, :, None] * a[:, None, :]) @ QA) / eigvals[n]
                _close(got[:, start:start + want[0].numel()].reshape(want.shape), want)
                start += want[0].numel()


def test_rotated_factors_give_the_eigenbasis_rows():
    """_outer_rows(eigvecs) of (a', g') is vec(Q_G^T g' a'^T Q_A) per row (1e-10), a [b, d] view,
    and a block of rows rotated alone (as _cached_spans scores several blocks) gives the whole's
    rows of that block, torch.equal (1e-10 for a block of one row)."""
    g = torch.Generator().manual_seed(7)
    dt = torch.float64
    f = {"a": (torch.randn(9, 3, generator=g, dtype=dt), torch.randn(9, 2, generator=g, dtype=dt)),
         "b": (torch.randn(9, 4, generator=g, dtype=dt), torch.randn(9, 5, generator=g, dtype=dt))}
    eigvecs = {n: (torch.linalg.qr(torch.randn(a.shape[1], a.shape[1], generator=g, dtype=dt))[0],
                   torch.linalg.qr(torch.randn(q.shape[1], q.shape[1], generator=g, dtype=dt))[0])
               for n, (a, q) in f.items()}
    rows = _outer_rows(f, eigvecs)
    assert rows.shape == (9, 6 + 20)
    for s, e in ((0, 4), (4, 8), (8, 9)):
        block = _outer_rows({n: (a[s:e], q[s:e]) for n, (a, q) in f.items()}, eigvecs)
        # (a one-row block's product takes BLAS's matrix-vector kernel: equal to rounding only)
        assert torch.equal(block, rows[s:e]) if e - s > 1 else _close(block, rows[s:e]) is None
    start = 0
    for n, (QA, QG) in eigvecs.items():
        a, q = f[n]
        want = QG.T @ (q[:, :, None] * a[:, None, :]) @ QA
        _close(rows[:, start:start + want[0].numel()].reshape(want.shape), want)
        start += want[0].numel()
