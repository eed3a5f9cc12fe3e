"""FactGraSS's factored train cache: each block's stage-1 factors instead of the features."""

import sys

import pytest
import torch
from test_factgrass import DT, _brute_features, _problem

from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.attribute.pipeline import TopK
from dattri_fn.transforms import capture

_MOD = sys.modules[factgrass.__module__]


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons run on one thread (CI runs two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _factored(monkeypatch):
    """Every cache holds factors (no features are small enough to keep)."""
    monkeypatch.setattr(_MOD, "_keep_bytes", lambda: -1)


def _brute_scores(feats, n_test, damping=None):
    ref = 0
    for phi in feats:
        Fb = phi.T @ phi / phi.shape[0]
        lam = 0.1 * Fb.diagonal().mean() if damping is None else damping
        ref = ref + phi @ torch.linalg.solve(Fb + lam * torch.eye(phi.shape[1], dtype=DT),
                                             phi[:n_test].T)
    return ref


def test_factor_cache_scores_equal_the_brute_force(monkeypatch):
    """Factors cached: s_ij = sum_b phi_ib^T (F_b + lam_b I)^-1 phi_jb, self, top-k, phi (1e-10)."""
    _factored(monkeypatch)
    fm, (x, y) = _problem("mlp", n=30, seed=4)
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2)
    state = m.prepare(fm.params, [(x[:16], y[:16]), (x[16:], y[16:])])
    assert state.train_features is None and state.cached_rows() == 30
    # k' = 5 of [a, 1] (13 and 21 wide) and of g (20 wide); the 4 classes are kept whole
    assert {b: (a.shape, g.shape) for b, (a, g) in state.train_factors.items()} == {
        "0": ((30, 5), (30, 5)), "2": ((30, 5), (30, 4))}
    feats = _brute_features(fm, (x, y), 16, 5, 2)
    phi = m.prepare.feature_rows(fm.params, state)
    torch.testing.assert_close(phi, torch.cat(feats, 1), rtol=1e-10, atol=1e-12)
    assert torch.equal(m.prepare.feature_rows(fm.params, state, 7, 19), phi[7:19])
    S = m.score(fm.params, state, (x, y), (x[:5], y[:5]))
    ref = _brute_scores(feats, 5)
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    torch.testing.assert_close(m.self_score(fm.params, state, (x, y)),
                               m.score(fm.params, state, None, (x, y)).diagonal(),
                               rtol=1e-10, atol=1e-10)
    top = m.score(fm.params, state, None, (x[:5], y[:5]), top_k=4, largest=False)
    assert isinstance(top, TopK)
    want = S.topk(4, dim=0, largest=False)
    assert torch.equal(top.values, want.values) and torch.equal(top.indices, want.indices)


def test_both_caches_hold_the_same_rows_and_fisher(monkeypatch, one_thread):
    """Factors or features cached: phi, (F + lam I)^-1 (torch.equal: 40 rows are one span and
    one chunk either way), scores at 1e-12."""
    fm, (x, y) = _problem("mlp", n=40, seed=6)
    train, test = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)], (x[:6], y[:6])
    m = factgrass(fm, proj_dim=8, kind="gaussian")
    kept = m.prepare(fm.params, train)
    _factored(monkeypatch)
    held = m.prepare(fm.params, train)
    assert kept.train_factors is None and held.train_features is None
    assert torch.equal(m.prepare.feature_rows(fm.params, held), kept.train_features)
    assert all(torch.equal(held.inverses[b], kept.inverses[b]) for b in kept.inverses)
    S = m.score(fm.params, kept, train, test)
    torch.testing.assert_close(m.score(fm.params, held, train, test), S, rtol=1e-12,
                               atol=1e-12 * float(S.abs().max()))
    torch.testing.assert_close(m.self_score(fm.params, held, train),
                               m.self_score(fm.params, kept, train), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("listed", [True, False])
def test_the_cache_form_follows_the_memory_budget(monkeypatch, listed):
    """Features kept iff n d itemsize <= memory_budget() // _CACHE_SHARE (the byte edge),
    decided before the passes (a list: rows known) or after them (one batch read as it comes)."""
    fm, (x, y) = _problem("mlp", n=20, seed=1)
    m = factgrass(fm, proj_dim=8)
    data = [(x[:12], y[:12]), (x[12:], y[12:])] if listed else (x, y)
    feature_bytes = 20 * 16 * 8  # n x (8 + 8) float64
    share = _MOD._CACHE_SHARE
    assert share == 128  # 2 MiB of the default 256 MiB budget (review R2 F2)
    monkeypatch.setattr(_MOD, "memory_budget", lambda: feature_bytes * share)
    at = m.prepare(fm.params, data)
    monkeypatch.setattr(_MOD, "memory_budget", lambda: feature_bytes * share - 1)
    over = m.prepare(fm.params, data)
    assert at.train_features is not None and at.train_factors is None
    assert over.train_features is None and over.train_factors is not None
    torch.testing.assert_close(m.score(fm.params, over, None, (x[:3], y[:3])),
                               m.score(fm.params, at, None, (x[:3], y[:3])), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("rows_known", [True, False])
def test_a_pass_off_the_flat_path_turns_the_factors_into_features(monkeypatch, rows_known):
    """Pass 2 of 3 refused by the flat path: rows so far formed, then cached as features (1e-10)."""
    _factored(monkeypatch)
    fm, (x, y) = _problem("mlp", n=30, seed=8)
    train = [(x[:10], y[:10]), (x[10:17], y[10:17]), (x[17:], y[17:])]
    if rows_known:  # merged passes (the rows counted first: one [n, d] buffer) of one batch each
        monkeypatch.setattr(_MOD, "memory_budget", lambda: 1)
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2, batch_rows=None if rows_known else 1)
    flat = m.prepare(fm.params, train)
    rows_mod = sys.modules["dattri_fn.attribute.factgrass_rows"]  # the stream looks them up there
    real, plain = rows_mod._flat_io, rows_mod._plain_io

    def refuse_seven(plan, params, batch):
        if batch[0].shape[0] == 7:
            raise capture.CaptureError({"0": "not this one"})
        return real(plan, params, batch)

    # the plain MLP's factors come from mlp_io; the 7-row pass goes to the engine, which refuses it
    monkeypatch.setattr(rows_mod, "_plain_io",
                        lambda plan, params, batch: None if batch[0].shape[0] == 7 else plain(
                            plan, params, batch))
    monkeypatch.setattr(rows_mod, "_flat_io", refuse_seven)
    state = m.prepare(fm.params, train)
    assert flat.train_factors is not None
    assert state.train_factors is None and state.train_features.shape == (30, 32)
    torch.testing.assert_close(state.train_features, m.prepare.feature_rows(fm.params, flat),
                               rtol=1e-12, atol=1e-14)
    feats = _brute_features(fm, (x, y), 16, 5, 2)
    ref = _brute_scores(feats, 4)
    torch.testing.assert_close(m.score(fm.params, state, train, (x[:4], y[:4])), ref,
                               rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_a_loader_of_unknown_length_caches_the_factors_of_a_list(monkeypatch, one_thread):
    """A DataLoader (rows unknown until read): factors joined at the end == a list's (torch.equal)."""
    from torch.utils.data import DataLoader, TensorDataset

    _factored(monkeypatch)
    fm, (x, y) = _problem("mlp", n=23, seed=9)
    m = factgrass(fm, proj_dim=8, batch_rows=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    got = m.prepare(fm.params, loader)
    want = m.prepare(fm.params, [(x[i:i + 5], y[i:i + 5]) for i in range(0, 23, 5)])
    assert got.cached_rows() == 23
    assert all(torch.equal(got.train_factors[b][i], want.train_factors[b][i])
               for b in want.train_factors for i in (0, 1))
    assert all(torch.equal(got.inverses[b], want.inverses[b]) for b in want.inverses)
    assert torch.equal(m.score(fm.params, got, loader, (x[:3], y[:3])),
                       m.score(fm.params, want, None, (x[:3], y[:3])))


def test_a_state_whose_factors_another_factgrass_masked_is_refused(monkeypatch):
    """The same blocks, other mask widths (mask_dim 3 vs 4): score/self_score refuse it by name,
    by its recorded sketch, and (a state without one, saved before stop 23) by its factors' widths."""
    _factored(monkeypatch)
    fm, (x, y) = _problem("mlp", n=12, seed=2)
    state = factgrass(fm, proj_dim=8, mask_dim=3).prepare(fm.params, (x, y))
    other = factgrass(fm, proj_dim=8, mask_dim=4)
    with pytest.raises(ValueError, match=r"factgrass.score\(state=...\): expected a FactGraSSState "
                                         r"prepared with this factgrass's mask_dim=4, got one "
                                         r"prepared with mask_dim=3"):
        other.score(fm.params, state, None, (x[:2], y[:2]))
    state = state._replace(sketch=None)
    with pytest.raises(ValueError, match=r"factgrass.score\(state=...\): expected a FactGraSSState "
                                         r"whose factors have the mask widths"):
        other.score(fm.params, state, None, (x[:2], y[:2]))
    with pytest.raises(ValueError, match=r"factgrass.self_score\(state=...\): expected a "
                                         r"FactGraSSState whose factors"):
        other.self_score(fm.params, state, None)


def test_a_factored_state_survives_save_and_load(monkeypatch, tmp_path):
    """io.save / io.load of a factored state: the same factors and scores (torch.equal)."""
    from dattri_fn import io

    _factored(monkeypatch)
    fm, (x, y) = _problem("mlp", n=12, seed=3)
    m = factgrass(fm, proj_dim=8)
    state = m.prepare(fm.params, (x, y))
    back = io.load(io.save(state, tmp_path / "fg.pt"))
    assert type(back) is type(state) and list(back.train_factors) == list(state.train_factors)
    assert torch.equal(m.score(fm.params, back, None, (x[:2], y[:2])),
                       m.score(fm.params, state, None, (x[:2], y[:2])))
