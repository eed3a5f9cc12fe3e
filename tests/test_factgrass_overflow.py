"""FactGraSS blames the data, not ``damping``, for an example whose features overflow (stop 24's
review): a float32 example of 1e30 inputs makes a finite gradient ~1e30 whose Fisher entry
(~1e60) is inf. ``prepare`` names ``train`` and the example (``pipeline.check_finite_self``'s
words, as every method's self-score), or the block where it holds no rows; ``self_score`` refuses
a NaN/inf self-score by example. Tame data is unchanged (the check is one scan of each Fisher)."""

import importlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.factgrass import factgrass

BAD = 7
NAMED = (r"^factgrass\.prepare\(train=\.\.\.\): expected examples whose per-example features "
         r"\(gradients\) are finite, got NaN or inf in the self-score of example 7\. ")


class _Net(nn.Module):
    """Linear -> ReLU -> Linear with its own forward (not a plain MLP: the capture engine and the
    plan check take it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _problem(plain: bool):
    """(float32 FunctionalModel, two batches of 6): example 7's inputs are 1e30 (finite)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)) if plain else _Net()
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(12) % 3
    x[BAD] = 1e30
    return functional_model(net.eval(), F.cross_entropy), [(x[:6], y[:6]), (x[6:], y[6:])]


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("damping", [None, 0.0, 0.1, 1e39])
def test_prepare_names_the_overflowing_example_not_damping(plain, damping):
    fm, train = _problem(plain)
    m = factgrass(fm, proj_dim=4, mask_dim=2, damping=damping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=NAMED):
            m.prepare(fm.params, train)


def test_prepare_from_cached_factors_names_the_example(monkeypatch):
    """The state would hold factors (features formed in spans): the error path forms them."""
    monkeypatch.setattr(importlib.import_module("dattri_fn.attribute.factgrass"), "_keep_bytes",
                        lambda: 0)
    fm, train = _problem(True)
    (x0, y0), (x1, y1) = train
    tame = factgrass(fm, proj_dim=4, mask_dim=2).prepare(fm.params, [(x0, y0), (x1[2:], y1[2:])])
    assert tame.train_factors is not None and tame.train_features is None
    with pytest.raises(ValueError, match=NAMED):
        factgrass(fm, proj_dim=4, mask_dim=2).prepare(fm.params, train)


def test_prepare_without_cached_rows_names_the_block():
    """cache_features=False keeps no rows to search: train and the block are named."""
    fm, train = _problem(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"^factgrass\.prepare\(train=\.\.\.\): expected "
                                             r"examples whose per-example features \(gradients\) "
                                             r"are finite, got NaN or inf in block 'a''s Fisher "
                                             r"over the 12 examples\. "):
            factgrass(fm, proj_dim=4, mask_dim=2, cache_features=False).prepare(fm.params, train)


@pytest.mark.parametrize("cache", [True, False])
def test_self_score_names_the_overflowing_example(cache):
    """curvature="identity" has no Fisher: prepare takes the data; self_score's phi.phi of
    example 7 is inf and is refused by example (streamed or from the cache)."""
    fm, train = _problem(False)
    m = factgrass(fm, proj_dim=4, mask_dim=2, curvature="identity", cache_features=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = m.prepare(fm.params, train)
        with pytest.raises(ValueError, match=r"^factgrass\.self_score\(train=\.\.\.\): expected "
                                             r"examples whose per-example features \(gradients\) "
                                             r"are finite, got NaN or inf in the self-score of "
                                             r"example 7\."):
            m.self_score(fm.params, st, train)


def test_a_singular_fisher_still_names_damping():
    """Finite but singular (damping=0, fewer examples than sketch columns): damping's error."""
    fm, train = _problem(False)
    x, y = train[0]
    with pytest.raises(ValueError, match=r"^factgrass\.prepare\(damping=\.\.\.\)"):
        factgrass(fm, proj_dim=4, mask_dim=2, damping=0.0).prepare(fm.params, [(x[:2], y[:2])])


def _tame(plain: bool):
    """_problem without example 7 (11 ordinary float32 examples)."""
    fm, ((x0, y0), (x1, y1)) = _problem(plain)
    return fm, [(x0, y0), (torch.cat([x1[:1], x1[2:]]), torch.cat([y1[:1], y1[2:]]))]


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("damping", [1e39, 1e300])
def test_a_damping_beyond_the_dtype_names_damping(plain, damping):
    """Ordinary data, a damping that is inf in float32 (review RD F1): the Fisher is finite
    before damping, so damping is named, with the dtype's bound; not the training data."""
    fm, train = _tame(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"^factgrass\.prepare\(damping=\.\.\.\): expected a "
                                             r"damping whose sum with block '(a|0)''s Fisher "
                                             r"diagonal is finite in float32 \(<= 3\.4e\+38\), got "
                                             rf"damping={re.escape(str(damping))}\.$"):
            factgrass(fm, proj_dim=4, mask_dim=2, damping=damping).prepare(fm.params, train)


def test_a_large_finite_damping_is_taken():
    """A damping within the dtype (1e30 in float32) and 1e39 in float64 are no error: each
    inverse is ~I/damping, finite."""
    fm, train = _tame(True)
    st = factgrass(fm, proj_dim=4, mask_dim=2, damping=1e30).prepare(fm.params, train)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in st.inverses.values())
    fm64 = functional_model(fm.module.double(), F.cross_entropy)
    train64 = [(x.double(), y) for x, y in train]
    st = factgrass(fm64, proj_dim=4, mask_dim=2, damping=1e39).prepare(fm64.params, train64)
    for v in st.inverses.values():
        assert v.dtype == torch.float64
        eye = torch.eye(v.shape[0], dtype=torch.float64)
        torch.testing.assert_close(v * 1e39, eye, rtol=0, atol=1e-12)


def test_tame_examples_unchanged():
    """Without the overflowing example prepare and self_score run (finite values)."""
    fm, train = _problem(False)
    (x0, y0), (x1, y1) = train
    keep = [(x0, y0), (torch.cat([x1[:1], x1[2:]]), torch.cat([y1[:1], y1[2:]]))]
    m = factgrass(fm, proj_dim=4, mask_dim=2)
    st = m.prepare(fm.params, keep)
    assert torch.isfinite(m.self_score(fm.params, st, keep)).all()


@pytest.mark.parametrize("how", ["merged", "batch_rows", "self_score", "test"])
def test_nan_examples_are_refused_once_where_they_enter(how):
    """A NaN input is refused as bad data by the check of the path that reads it (merged passes:
    merged_passes; batch_rows=1: the stream itself; self_score's stream; score's test: collect),
    not later as a non-finite feature: the stream skips only checks its caller made."""
    fm, train = _problem(False)
    (x0, y0), (x1, y1) = train
    bad = [(x0, y0), (torch.cat([x1[:1], torch.full_like(x1[:1], float("nan")), x1[2:]]), y1)]
    tame = [(x0, y0), (torch.cat([x1[:1], x1[2:]]), torch.cat([y1[:1], y1[2:]]))]
    m = factgrass(fm, proj_dim=4, mask_dim=2, batch_rows=1 if how == "batch_rows" else None,
                  cache_features=how != "self_score")
    func, arg = {"merged": ("prepare", "train"), "batch_rows": ("prepare", "train"),
                 "self_score": ("self_score", "train"), "test": ("score", "test")}[how]
    with pytest.raises(ValueError, match=rf"^factgrass\.{func}\({arg}=\.\.\.\): expected finite "
                                         r"values, got NaN or inf"):
        if how in ("merged", "batch_rows"):
            m.prepare(fm.params, bad)
        st = m.prepare(fm.params, tame)
        if how == "self_score":
            m.self_score(fm.params, st, bad)
        m.score(fm.params, st, None, bad[1])


@pytest.mark.parametrize("form", ["batch", "loader"])
def test_prepare_names_the_example_in_data_of_unknown_size(form):
    """One Batch or a DataLoader (rows not counted before the passes: features joined at the
    end): the example's global index is named."""
    fm, train = _problem(False)
    x, y = torch.cat([train[0][0], train[1][0]]), torch.cat([train[0][1], train[1][1]])
    data = (x, y) if form == "batch" else torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=NAMED):
            factgrass(fm, proj_dim=4, mask_dim=2).prepare(fm.params, data)
