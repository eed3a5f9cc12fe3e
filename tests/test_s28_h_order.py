"""A DataLoader that reorders or drops rows is refused where the row order reaches the output
(review RU4 H1): score's train and test, self_score's data, a cached method's prepare, collect."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
)

from dattri_fn import functional_model
from dattri_fn._checks import count_rows, iter_batches
from dattri_fn.attribute import collect, influence, trak

F64 = torch.float64
ORDER = r"expected the (training )?rows in a fixed order, the dataset's .* Pass shuffle=False"


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64).eval()
    x, y = torch.randn(13, 4, dtype=F64), torch.randint(0, 3, (13,))
    return functional_model(model, F.cross_entropy), x, y


class _Reversed(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


def _bad_loaders(ds):
    n = len(ds)
    return {"shuffle": DataLoader(ds, batch_size=4, shuffle=True),
            "subset_random": DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(n))),
            "custom_sampler": DataLoader(ds, batch_size=4, sampler=_Reversed(n)),
            "custom_batch_sampler": DataLoader(ds, batch_sampler=[[3, 2], [1, 0]]),
            "shuffled_batches": DataLoader(ds, batch_sampler=BatchSampler(_Reversed(n), 4, False)),
            "no_batching": DataLoader(ds, batch_size=None, shuffle=True)}


@pytest.mark.parametrize("kind", ["shuffle", "subset_random", "custom_sampler",
                                  "custom_batch_sampler", "shuffled_batches", "no_batching"])
def test_reordering_loader_refused_by_the_central_checks(kind):
    fm, x, y = _setup()
    loader = _bad_loaders(TensorDataset(x, y))[kind]
    with pytest.raises(ValueError, match=r"m\.score\(train=...\): " + ORDER):
        iter_batches("m.score", "train", loader)
    with pytest.raises(ValueError, match=r"m\.score\(test=...\): " + ORDER):
        count_rows("m.score", "test", loader)
    assert iter_batches("hvp", "data", loader, ordered=False) is not None  # a sum over rows
    assert count_rows("hvp", "data", loader, ordered=False) is None


def test_methods_refuse_a_shuffled_train_test_and_self_score_data():
    fm, x, y = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    m = influence(fm, solver="cg", damping=0.1)
    st = m.prepare(fm.params, (x, y))
    for call, arg in ((lambda: m.score(fm.params, st, loader, (x[:2], y[:2])), "train"),
                      (lambda: m.score(fm.params, st, (x, y), loader), "test"),
                      (lambda: m.self_score(fm.params, st, loader), "train"),
                      (lambda: m.prepare(fm.params, loader), "train")):
        with pytest.raises(ValueError, match=rf"\({arg}=...\): " + ORDER):
            call()
    t = trak(fm, proj_dim=4)
    with pytest.raises(ValueError, match=r"trak\.prepare\(train=...\): expected the training "
                       r"rows in a fixed order.*with shuffle=True .* Pass shuffle=False"):
        t.prepare(fm.params, loader)  # cached rows would keep this pass's permutation
    with pytest.raises(ValueError, match=r"collect\(data=...\): " + ORDER):
        collect(lambda b: b[0], loader)


def test_sequential_loaders_give_the_scores_of_one_batch():
    fm, x, y = _setup()
    ds = TensorDataset(x, y)
    m = influence(fm, solver="cg", damping=0.1)
    st = m.prepare(fm.params, (x, y))
    ref = m.score(fm.params, st, (x, y), (x[:3], y[:3]))
    for loader in (DataLoader(ds, batch_size=4),
                   DataLoader(ds, sampler=SequentialSampler(ds), batch_size=4),
                   DataLoader(ds, batch_size=13, drop_last=True),  # drops nothing
                   DataLoader(_Stream(x, y), batch_size=4)):  # an IterableDataset's own order
        assert torch.allclose(m.score(fm.params, st, loader, (x[:3], y[:3])), ref,
                              rtol=1e-12, atol=1e-12)


def test_drop_last_that_drops_rows_is_refused_naming_the_count():
    fm, x, y = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)
    m = influence(fm, solver="cg", damping=0.1)
    st = m.prepare(fm.params, (x, y))
    with pytest.raises(ValueError, match=r"if_cg\(train=...\): expected every example of the "
                       r"dataset, got 12 examples of the 13 \(drop_last=True drops the last 1"):
        m.self_score(fm.params, st, loader)
    assert iter_batches("hvp", "data", loader, ordered=False) is not None


def test_one_shot_iterator_names_the_streaming_remedy():
    _, x, y = _setup()
    with pytest.raises(TypeError, match=r"Wrap it in list\(...\), or, for data larger than "
                       r"memory, pass an object whose __iter__ builds the batches"):
        iter_batches("m.score", "train", iter([(x, y)]))


def test_operators_accept_a_shuffled_loader():
    from dattri_fn import grad, hvp
    fm, x, y = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    V = torch.randn(2, sum(v.numel() for v in fm.params.values()), dtype=F64)
    ref = hvp(fm.loss, fm.params, (x, y)).matmat(V)
    assert torch.allclose(hvp(fm.loss, fm.params, loader).matmat(V), ref, rtol=1e-10)
    grad(fm.loss, fm.params, loader)
