"""LoGra's factored state never holds a tensor of the caller's (review R2 F1, stop 22).

With no bias and the input side unprojected, a first layer's factor ``a'`` is the training
input itself: the state must own a copy, so in-place changes to the caller's data after
``prepare`` leave the scores alone and a saved state holds its own rows only.
"""
import torch
from test_logra import _problem

from dattri_fn import io
from dattri_fn.attribute.logra import logra


def _storages(state) -> set:
    return {t.untyped_storage().data_ptr() for pair in state.train_factors.values() for t in pair}


def test_scores_ignore_in_place_changes_to_the_training_data():
    """score(prepare(x)) after x.mul_(3) == score(prepare(x)) before, and no factor shares x's storage."""
    fm, (x, y) = _problem("mlp", 1, 13, bias=False)
    test = (x[:4].clone(), y[:4].clone())
    for proj in (16, None, (None, 2)):
        for train in ((x, y), [(x, y)]):
            m = logra(fm, proj_dim=proj)
            state = m.prepare(fm.params, train)
            assert state.train_factors is not None  # the factored form the finding is about
            assert x.untyped_storage().data_ptr() not in _storages(state)
            before = m.score(fm.params, state, None, test)
            saved = x.clone()
            x.mul_(3.0)
            after = m.score(fm.params, state, None, test)
            x.copy_(saved)
            assert torch.equal(before, after)


def test_a_loader_refilling_one_buffer_gives_the_scores_of_its_copies():
    """Batches yielded from one buffer refilled in place score as the same batches cloned."""
    fm, (x, y) = _problem("mlp", 2, 12, bias=False)
    test = (x[:3].clone(), y[:3].clone())
    m = logra(fm, proj_dim=16)

    class Loader:  # batch by batch, as a DataLoader (a list would be merged into one pass)
        def __init__(self, refill: bool):
            self.refill = refill

        def __iter__(self):
            buf = torch.empty(4, x.shape[1], dtype=x.dtype)  # one input buffer, pinned-memory style
            for s in range(0, 12, 4):
                yield (buf.copy_(x[s:s + 4]) if self.refill else x[s:s + 4].clone()), y[s:s + 4]

    got = m.score(fm.params, m.prepare(fm.params, Loader(True)), None, test)
    want = m.score(fm.params, m.prepare(fm.params, Loader(False)), None, test)
    assert torch.equal(got, want)


def test_a_saved_state_holds_its_own_rows_only(tmp_path):
    """Bytes saved for a state prepared on big[:10] == bytes for one prepared on a 10-row copy."""
    fm, _ = _problem("mlp", 3, 1, bias=False)
    g = torch.Generator().manual_seed(3)
    big = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20000,), generator=g)
    m = logra(fm, proj_dim=16)
    view = io.save(m.prepare(fm.params, (big[:10], y[:10])), tmp_path / "view.pt")
    rows = (big[:10].clone(), y[:10].clone())  # alive at save: both states carry their train print
    own = io.save(m.prepare(fm.params, rows), tmp_path / "own.pt")
    assert view.stat().st_size == own.stat().st_size
    assert view.stat().st_size < big[:10].nbytes * 100  # the 480 kB storage is not in it
