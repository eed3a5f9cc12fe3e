"""Review R2's findings on FactGraSS's factored train cache (stop 23): a state owns its rows (F1), a
state is refused by a factgrass of another sketch or curvature (F2), several row spans against brute
force (F4), one-example parts cache features (F5, as documented; a plain MLP's cache factors since
stop 24), and params of another dtype than the cached rows are refused by name (F6)."""

import sys

import pytest
import torch
import torch.nn.functional as F
from test_factgrass import DT, _brute_features, _problem
from torch import nn

from dattri_fn import io
from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.model import functional_model

_MOD = sys.modules[factgrass.__module__]
_FORMS = ["features", "factors"]


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons run on one thread (CI runs two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _form(monkeypatch, form: str) -> None:
    """Force the cache form: factors (no features are small enough to keep) or features."""
    monkeypatch.setattr(_MOD, "_keep_bytes", (lambda: -1) if form == "factors" else (lambda: 1 << 40))


def _biasless(n: int, seed: int):
    """A bias-less Linear(5, 7) -> Tanh -> Linear(7, 3): with mask_dim >= 5 the first layer's input
    side is kept whole, so its factor a' is the training input x itself."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3)).to(DT).eval()
    x = torch.randn(n, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return functional_model(net, F.cross_entropy), (x, y)


def _storages(state) -> set:
    return {t.untyped_storage().data_ptr() for pair in state.train_factors.values() for t in pair}


@pytest.mark.parametrize("form", _FORMS)
def test_scores_ignore_in_place_changes_to_the_training_data(monkeypatch, one_thread, form):
    """score(prepare(x)) after x.mul_(3) == score(prepare(x)) before (torch.equal), for one batch and
    a one-element list (rows unknown: factors kept as captured), and no factor shares x's storage."""
    _form(monkeypatch, form)
    fm, (x, y) = _biasless(40, 0)
    test = (x[:4].clone(), y[:4].clone())
    m = factgrass(fm, proj_dim=16, mask_dim=8)
    for train in ((x, y), [(x, y)]):
        state = m.prepare(fm.params, train)
        assert (state.train_factors is not None) == (form == "factors")
        if form == "factors":
            assert state.train_factors["0"][0].shape == (40, 5)  # the input side kept whole
            assert x.untyped_storage().data_ptr() not in _storages(state)
        before = m.score(fm.params, state, None, test)
        saved = x.clone()
        x.mul_(3.0)
        after = m.score(fm.params, state, None, test)
        x.copy_(saved)
        assert torch.equal(before, after)


def test_a_loader_refilling_one_buffer_gives_the_scores_of_its_copies(monkeypatch, one_thread):
    """Batches yielded from one input buffer refilled in place (rows unknown: factors joined at the
    end) give the factors and scores of the same batches cloned (torch.equal)."""
    _form(monkeypatch, "factors")
    fm, (x, y) = _biasless(12, 1)
    test = (x[:3].clone(), y[:3].clone())
    m = factgrass(fm, proj_dim=16, mask_dim=8)

    class Loader:  # batch by batch, as a DataLoader (a list would be merged into one pass)
        def __init__(self, refill: bool):
            self.refill = refill

        def __iter__(self):
            buf = torch.empty(4, 5, dtype=DT)  # one input buffer, pinned-memory style
            for s in range(0, 12, 4):
                yield (buf.copy_(x[s:s + 4]) if self.refill else x[s:s + 4].clone()), y[s:s + 4]

    got, want = m.prepare(fm.params, Loader(True)), m.prepare(fm.params, Loader(False))
    assert torch.equal(got.train_factors["0"][0], x)
    assert torch.equal(m.score(fm.params, got, None, test), m.score(fm.params, want, None, test))


OTHERS = [({"seed": 3}, "seed=3", "seed=2"), ({"kind": "gaussian"}, "kind='gaussian'", "kind='sjlt'"),
          ({"curvature": "identity"}, "curvature='identity'", "curvature='fisher'"),
          ({"damping": 0.5}, "damping=0.5", "damping=None")]


@pytest.mark.parametrize("form", _FORMS)
@pytest.mark.parametrize("other,want,got", OTHERS, ids=[w for _, w, _ in OTHERS])
def test_a_state_of_another_sketch_or_curvature_is_refused_by_name(monkeypatch, form, other, want, got):
    """Another seed, kind, curvature or damping than prepare's: score, self_score and feature_rows
    refuse the state, naming the setting and both values."""
    _form(monkeypatch, form)
    fm, (x, y) = _problem("mlp", n=20, seed=3)
    state = factgrass(fm, proj_dim=16, mask_dim=5, seed=2).prepare(fm.params, (x, y))
    m = factgrass(fm, proj_dim=16, mask_dim=5, **{"seed": 2, **other})
    text = (r"factgrass{}\(state=...\): expected a FactGraSSState prepared with this factgrass's "
            + want.replace(".", r"\.") + ", got one prepared with " + got)
    with pytest.raises(ValueError, match=text.format(".score")):
        m.score(fm.params, state, None, (x[:2], y[:2]))
    with pytest.raises(ValueError, match=text.format(".self_score")):
        m.self_score(fm.params, state, None)
    with pytest.raises(ValueError, match=text.format(r".prepare.feature_rows")):
        m.prepare.feature_rows(fm.params, state)


def test_the_damping_of_an_identity_state_is_not_part_of_its_sketch(monkeypatch):
    """curvature='identity' forms no inverse: an identity state scores the same under any damping
    (torch.equal), as the same sketched Grad-Dot phi_i^T phi_j."""
    _form(monkeypatch, "factors")
    fm, (x, y) = _problem("mlp", n=20, seed=3)
    state = factgrass(fm, proj_dim=16, curvature="identity").prepare(fm.params, (x, y))
    S = factgrass(fm, proj_dim=16, curvature="identity").score(fm.params, state, None, (x[:2], y[:2]))
    other = factgrass(fm, proj_dim=16, curvature="identity", damping=0.5)
    assert torch.equal(other.score(fm.params, state, None, (x[:2], y[:2])), S)


@pytest.mark.parametrize("form", _FORMS)
def test_a_state_saved_without_a_sketch_still_loads_and_scores(monkeypatch, tmp_path, form):
    """A file of a state from before train_factors/sketch (08e3a9f's 4 fields) loads with sketch None
    and scores as the state itself (torch.equal), unchecked; a saved sketch comes back as it was."""
    _form(monkeypatch, "features")  # 08e3a9f's states hold features
    fm, (x, y) = _problem("mlp", n=20, seed=3)
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2)
    state = m.prepare(fm.params, (x, y))
    enc = io._encode(state)
    for f in ("train_factors", "sketch", "train_print"):
        del enc["fields"][f]
    torch.save(enc, tmp_path / "old.pt")
    old = io.load(tmp_path / "old.pt")
    assert type(old) is type(state) and old.sketch is None and old.train_factors is None
    S = m.score(fm.params, state, None, (x[:3], y[:3]))
    assert torch.equal(m.score(fm.params, old, None, (x[:3], y[:3])), S)
    # unchecked: an old state is scored by whatever factgrass is given, as before
    factgrass(fm, proj_dim=16, mask_dim=5, seed=3).score(fm.params, old, None, (x[:3], y[:3]))
    _form(monkeypatch, form)
    state = m.prepare(fm.params, (x, y))
    back = io.load(io.save(state, tmp_path / "new.pt"))
    assert back.sketch == state.sketch == (("seed", 2), ("kind", "sjlt"), ("mask_dim", 5),
                                           ("proj_dim", 16), ("curvature", "fisher"), ("damping", None))
    assert torch.equal(m.score(fm.params, back, None, (x[:3], y[:3])),
                       m.score(fm.params, state, None, (x[:3], y[:3])))


@pytest.mark.parametrize("form", _FORMS)
def test_params_of_another_dtype_than_the_cached_rows_are_refused(monkeypatch, form):
    """float32 params on a float64 state's cached rows: score, self_score (and feature_rows, where it
    forms the rows from factors with the params' sketch) name params."""
    _form(monkeypatch, form)
    fm, (x, y) = _problem("mlp", n=20, seed=3)
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2)
    state = m.prepare(fm.params, (x, y))
    p32 = {k: v.float() for k, v in fm.params.items()}
    text = (r"factgrass{}\(params=...\): expected params in torch.float64, the dtype of the state's "
            r"cached train rows, got torch.float32")
    with pytest.raises(ValueError, match=text.format(".score")):
        m.score(p32, state, None, (x[:4].float(), y[:4]))
    with pytest.raises(ValueError, match=text.format(".self_score")):
        m.self_score(p32, state, None)
    if form == "features":  # the cached rows are returned as they are: no params used
        assert torch.equal(m.prepare.feature_rows(p32, state), state.train_features)
        return
    with pytest.raises(ValueError, match=text.format(".prepare.feature_rows")):
        m.prepare.feature_rows(p32, state)


@pytest.mark.parametrize("data", ["list", "batch"])
def test_several_row_spans_against_the_brute_force(monkeypatch, data):
    """n = 300 factored in 3 spans of 128: phi (and slices across span edges), (F_b + lam I)^-1,
    scores, self-scores and top-k == brute force (1e-10; slices and top-k torch.equal to the whole)."""
    _form(monkeypatch, "factors")
    n = 300
    fm, (x, y) = _problem("mlp", n=n, seed=5)
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2)
    cuts = [0, 37, 150, 151, 300]  # uneven batches: merged passes written in place
    train = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)] if data == "list" else (x, y)
    state = m.prepare(fm.params, train)
    assert state.train_features is None and state.cached_rows() == n
    # blocks of 16 + 16 columns from stage-1 widths 25 / 20: spans of 128 rows (_SKETCH_BYTES' floor)
    assert _MOD._spans(n, 32, 25, 8, _MOD._SKETCH_BYTES) == [(0, 128), (128, 256), (256, 300)]
    feats = _brute_features(fm, (x, y), 16, 5, 2)
    phi = m.prepare.feature_rows(fm.params, state)
    torch.testing.assert_close(phi, torch.cat(feats, 1), rtol=1e-10, atol=1e-12)
    for a, b in [(127, 129), (100, 300), (250, 260), (-10, None), (128, 256), (5, 5), (200, 100)]:
        assert torch.equal(m.prepare.feature_rows(fm.params, state, a, b), phi[a:b])
    n_test, ref = 6, 0
    for (blk, s, e), f in zip(state.blocks, feats, strict=True):
        Fb = f.T @ f / n
        inv = torch.linalg.inv(Fb + 0.1 * Fb.diagonal().mean() * torch.eye(e - s, dtype=DT))
        torch.testing.assert_close(state.inverses[blk], inv, rtol=1e-10, atol=1e-10 * float(inv.abs().max()))
        ref = ref + f @ inv @ f[:n_test].T
    test = (x[:n_test], y[:n_test])
    S = m.score(fm.params, state, None, test)
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    torch.testing.assert_close(m.self_score(fm.params, state, None),
                               m.score(fm.params, state, None, (x, y)).diagonal(), rtol=1e-10, atol=1e-12)
    for largest in (True, False):
        top = m.score(fm.params, state, None, test, top_k=5, largest=largest)
        want = S.topk(5, dim=0, largest=largest)
        assert torch.equal(top.indices, want.indices) and torch.equal(top.values, want.values)


@pytest.mark.parametrize("plain", [True, False], ids=["plain-mlp", "engine"])
@pytest.mark.parametrize("how", ["loader", "chunk"])
def test_one_example_parts(monkeypatch, how, plain):
    """Parts of one example (DataLoader(batch_size=1), chunk_size=1): a plain softmax-CE MLP takes
    the flat path from its first part (mlp_io's factors need no plan check, stop 24: the state
    caches factors); any other model never does (the check needs a part of 2 or more: the state
    caches features). Scores == brute force (1e-10) either way."""
    from torch.utils.data import DataLoader, TensorDataset

    _form(monkeypatch, "factors")
    fm, (x, y) = _problem("mlp", n=12, seed=7)
    if not plain:  # the same loss as a lambda: mlp_io does not take it, the engine does
        fm = functional_model(fm.module, lambda out, t: F.cross_entropy(out, t))
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2, chunk_size=1 if how == "chunk" else None)
    train = DataLoader(TensorDataset(x, y), batch_size=1) if how == "loader" else (x, y)
    state = m.prepare(fm.params, train)
    if plain:
        assert state.train_features is None and state.cached_rows() == 12
    else:
        assert state.train_factors is None and state.train_features.shape == (12, 32)
    feats, ref = _brute_features(fm, (x, y), 16, 5, 2), 0
    for f in feats:
        Fb = f.T @ f / 12
        ref = ref + f @ torch.linalg.solve(Fb + 0.1 * Fb.diagonal().mean() * torch.eye(16, dtype=DT), f[:3].T)
    S = m.score(fm.params, state, None, (x[:3], y[:3]))
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_a_saved_factored_state_holds_its_own_rows_only(monkeypatch, tmp_path):
    """Bytes saved for a factored state prepared on big[:10] == bytes for one prepared on a 10-row copy."""
    _form(monkeypatch, "factors")
    fm, _ = _biasless(1, 3)
    g = torch.Generator().manual_seed(3)
    big = torch.randn(20000, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (10,), generator=g)
    m = factgrass(fm, proj_dim=16, mask_dim=8)
    view = io.save(m.prepare(fm.params, (big[:10], y)), tmp_path / "view.pt")
    rows = (big[:10].clone(), y)  # alive at save: both states carry their train print
    copy = io.save(m.prepare(fm.params, rows), tmp_path / "copy.pt")
    assert view.stat().st_size == copy.stat().st_size < 20000 * 5 * 8
