"""The train print never reads a DataLoader through its loading (review of stop 28): a loader
over a TensorDataset is printed from the dataset's tensors, any other loader is only counted."""

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from dattri_fn.attribute import train_print
from dattri_fn.attribute.representer import representer


class _Counted(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y, self.read = x, y, 0

    def __iter__(self):
        for row in zip(self.x, self.y, strict=True):
            self.read += 1
            yield row


def _problem():
    g = torch.Generator().manual_seed(0)
    params = {"W1": torch.randn(4, 3, generator=g, dtype=torch.float64),
              "W2": torch.randn(3, 4, generator=g, dtype=torch.float64)}
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    return params, x, torch.arange(10) % 3


def _rps():
    return representer(lambda p, z: torch.tanh(p["W1"] @ z[0]), lambda p, h: p["W2"] @ h,
                       lambda o, t: F.cross_entropy(o[None], t[None]), l2=0.1)


def test_a_loader_over_another_dataset_is_read_by_prepare_once_and_not_by_score():
    params, x, y = _problem()
    ds = _Counted(x, y)
    loader = DataLoader(ds, batch_size=4)
    m = _rps()
    state = m.prepare(params, loader)
    assert ds.read == 10 and state.train_print is None  # one pass of its rows
    m.score(params, state, loader, (x[:2], y[:2]))
    assert ds.read == 10


def test_a_tensor_dataset_loader_is_printed_from_its_tensors():
    params, x, y = _problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    m = _rps()
    state = m.prepare(params, loader)
    S = m.score(params, state, loader, (x[:2], y[:2]))
    torch.testing.assert_close(S, m.score(params, state, [(x, y)], (x[:2], y[:2])), rtol=0, atol=0)
    assert train_print.first_mismatch(loader, state.train_print) is None
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    other = DataLoader(TensorDataset(x[perm], y[perm]), batch_size=4)
    assert train_print.first_mismatch(other, state.train_print) is not None


def test_inline_slices_at_prepare_are_checked_through_their_base():
    """Review RG HIGH-1: slices made inline for prepare die with its batch list; their base lives."""
    import pytest

    params, x, y = _problem()
    m = _rps()
    state = m.prepare(params, [(x[i:i + 5], y[i:i + 5]) for i in (0, 5)])
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"^representer\.score\(train=\.\.\.\): expected the rows"):
        m.score(params, state, (x[perm], y[perm]), (x[:2], y[:2]))
    m.score(params, state, (x, y), (x[:2], y[:2]))  # the same rows, other objects


def test_a_print_that_cannot_be_formed_warns_at_score_instead_of_passing_silently():
    import pytest

    params, x, y = _problem()
    m = _rps()
    state = m.prepare(params, [(x.clone(), y.clone())])  # temporaries: freed after prepare
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match=r"^representer\.score\(train=\.\.\.\): cannot check"):
        m.score(params, state, (x[perm], y[perm]), (x[:2], y[:2]))
