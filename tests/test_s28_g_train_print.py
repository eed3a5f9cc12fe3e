"""Cached-state scores belong to the train passed to score (review RU6 H1/M2): the train print.

Each test's math: a state caching per-row results at prepare scores ``train`` only if ``train``
gives the same rows in the same order (``print(train) == state.train_print``, exact int64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri_fn import io
from dattri_fn.attribute import knn_shapley, representer, train_print
from dattri_fn.attribute.knn_shapley import KNNShapleyState
from dattri_fn.attribute.representer import RepresenterState

DT = torch.float64


def problem(n=24, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(n, 5, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)
    xt, yt = torch.randn(m, 5, dtype=DT, generator=g), torch.randint(0, 3, (m,), generator=g)
    return params, (x, y), (xt, yt)


def feat(p, ex):
    return torch.tanh(p["0.weight"] @ ex[0] + p["0.bias"])


def head(p, h):
    return p["2.weight"] @ h


METHODS = {
    "rps": (lambda: representer(feat, head, F.cross_entropy, l2=0.1), False),
    "knn": (lambda: knn_shapley(k=3), True),
}


def _setup(name):
    build, empty = METHODS[name]
    params, train, test = problem()
    m = build()
    p = {} if empty else params
    return m, p, train, test


@pytest.mark.parametrize("name", sorted(METHODS))
def test_permuted_or_other_train_is_refused(name):
    """score(train[perm]) and score(other rows) raise naming score(train=...) (before: S)."""
    m, p, (x, y), test = _setup(name)
    st = m.prepare(p, (x, y))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    other = (x + 1, y)
    for bad in ((x[perm], y[perm]), other, (x, (y + 1) % 3)):
        with pytest.raises(ValueError, match=r"\.score\(train=\.\.\.\): expected the "
                           r"rows prepare saw, in its order.*row \d+ differs"):
            m.score(p, st, bad, test)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_rows_any_batching_pass_with_equal_scores(name):
    """The same rows as [24], [8, 8, 8], [5, 19], a clone, a DataLoader and None: one S."""
    m, p, (x, y), test = _setup(name)
    st = m.prepare(p, (x, y))
    S = m.score(p, st, (x, y), test)
    split = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    for same in (split, [(x[:5], y[:5]), (x[5:], y[5:])], (x.clone(), y.clone()), loader,
                 None):
        assert torch.equal(m.score(p, st, same, test), S)
    st_split = m.prepare(p, split)
    assert torch.equal(train_print.resolved(st_split.train_print),
                       train_print.resolved(st.train_print))
    # (prepare's own batching moves representer's fit at rounding level)
    torch.testing.assert_close(m.score(p, st_split, (x, y), test), S, rtol=1e-12, atol=1e-14)


def test_knn_counts_its_train():
    """KNN-Shapley refuses 10 of its 24 rows (before: it returned all 24)."""
    m, p, (x, y), test = _setup("knn")
    st = m.prepare(p, (x, y))
    with pytest.raises(ValueError, match=r"score\(train=\.\.\.\): expected the 24 training"):
        m.score(p, st, (x[:10], y[:10]), test)
    with pytest.raises(ValueError, match=r"self_score\(train=\.\.\.\): expected the rows"):
        m.self_score(p, st, (x.flip(0), y.flip(0)))


def test_generator_at_score_is_read_once_and_checked():
    """A one-shot iterator at score is consumed by the check: other rows raise, same pass."""
    m, p, (x, y), test = _setup("knn")
    st = m.prepare(p, (x, y))
    S = m.score(p, st, None, test)
    assert torch.equal(m.score(p, st, iter([(x[:12], y[:12]), (x[12:], y[12:])]), test), S)
    with pytest.raises(ValueError, match=r"row 12 differs"):
        m.score(p, st, iter([(x[:12], y[:12]), (x[:12], y[:12])]), test)


def test_print_is_formed_from_the_live_leaves_when_first_needed():
    """prepare keeps weak references only (an empty print); another train object forms it from
    the kept leaves; leaves modified in place or freed since leave it unknown: counted only."""
    m, p, (x, y), test = _setup("rps")
    x, y = x.clone(), y.clone()
    st = m.prepare(p, (x, y))
    assert st.train_print.numel() == 0  # nothing read at prepare
    m.score(p, st, (x, y), test)  # the same objects: no tensor op, still empty
    assert st.train_print.numel() == 0
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"row \d+ differs"):
        m.score(p, st, (x[perm], y[perm]), test)
    assert st.train_print.shape == (24,)  # formed then, from x and y
    st2 = m.prepare(p, (x, y))
    x[3] += 1  # a write after prepare: the rows prepare saw cannot be read back
    assert not train_print._same_objects([(x, y)], st2.train_print)
    assert train_print.resolved(st2.train_print) is None
    m.score(p, st2, (x, y), test)  # counted only, as a state saved before prints
    xs, ys = x.clone(), y.clone()
    st3 = m.prepare(p, (xs, ys))
    del xs, ys
    assert train_print.resolved(st3.train_print) is None


def test_shuffled_loader_refused_at_prepare():
    """prepare on DataLoader(shuffle=True) raises: no later pass repeats its order."""
    m, p, (x, y), _ = _setup("rps")
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match=r"prepare\(train=\.\.\.\): expected the training rows "
                       r"in a fixed order.*shuffle=True"):
        m.prepare(p, loader)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_saved_states_round_trip_and_old_ones_count_only(name, tmp_path):
    """A new state round-trips with its print; a state saved without one loads, counts only."""
    m, p, (x, y), test = _setup(name)
    st = m.prepare(p, (x, y))
    S = m.score(p, st, (x, y), test)
    train_print.settle(st)  # (what io.save does once the lead applies G_to_lead.patch)
    back = io.load(io.save(st, tmp_path / "s.pt"))
    assert torch.equal(back.train_print, st.train_print)
    assert torch.equal(m.score(p, back, (x, y), test), S)  # the checksum path: new objects
    with pytest.raises(ValueError, match="row"):
        m.score(p, back, (x.flip(0), y.flip(0)), test)
    old = type(st)(*st[:-1])  # as a file from before stop 28 decodes: the default None
    assert old.train_print is None
    old = io.load(io.save(old, tmp_path / "old.pt"))
    assert torch.equal(m.score(p, old, (x.flip(0), y.flip(0)), test), S)  # counted only
    assert isinstance(st, (RepresenterState, KNNShapleyState))


def test_print_bits():
    """Batching-invariant, exact per entry: one flipped bit, a label, -0.0 all change it."""
    g = torch.Generator().manual_seed(0)
    x32, lab = torch.randn(10, 3, 4, generator=g), torch.randint(0, 9, (10,), generator=g)
    whole = train_print.batch_print((x32, lab))
    parts = torch.cat([train_print.batch_print((x32[a:a + 3], lab[a:a + 3]))
                       for a in range(0, 10, 3)])
    assert torch.equal(whole, parts) and whole.dtype == torch.int64
    y = x32.clone()
    y.view(torch.int32)[4, 2, 1] ^= 1  # one ulp
    assert (train_print.batch_print((y, lab)) != whole).tolist() == [i == 4 for i in range(10)]
    lab2 = lab.clone()
    lab2[7] += 1
    assert (train_print.batch_print((x32, lab2)) != whole).nonzero().flatten().tolist() == [7]
    z = torch.zeros(2, 3)
    z[1, 0] = -0.0
    p = train_print.batch_print(z)
    assert p[0] != p[1]
    for t in (x32.half(), x32.bfloat16(), x32.double(), x32 > 0, x32.to(torch.complex64),
              x32.transpose(1, 2)):
        assert train_print.batch_print(t).shape == (10,)
    assert torch.equal(train_print.batch_print(x32.transpose(1, 2).contiguous()),
                       train_print.batch_print(x32.transpose(1, 2)))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_nan_example_named_by_its_index(name):
    """NaN at example 20 of batches [8, 8, 8]: 'example 20', not 'row 4 of the batch' (L1)."""
    m, p, (x, y), test = _setup(name)
    x = x.clone()
    x[20, 1] = float("nan")
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    with pytest.raises(ValueError, match=r"prepare\(train=\.\.\.\): expected finite values, "
                       r"got NaN or inf in example 20\."):
        m.prepare(p, batches)
