"""The split of factgrass.py (stop 24): the feature stream (factgrass_rows) and the scoring side
(factgrass_score) left the factgrass() closure; every name factgrass.py imported stays importable
there as the very same object, FactGraSSState keeps its module (io's tag, pickles, state_hash)."""

import importlib
import pickle
import sys

import torch
from test_factgrass import _problem

from dattri_fn import io
from dattri_fn.attribute.factgrass import FactGraSSState, factgrass

# (module, names factgrass.py serves from it as before the split)
SERVED = [
    ("dattri_fn.attribute.factgrass_blocks",
     ["_blocks_of", "_cached", "_check_blocks", "_check_sketch", "_factor_rows", "_Factors",
      "_precondition", "_shapes", "_Sketches", "_spans", "_stage_two"]),
    ("dattri_fn.attribute.factgrass_flat",
     ["_flat_capturable", "_flat_checked", "_flat_factored", "_flat_io", "_flat_io_checked",
      "_flat_sketch"]),
]


def test_names_stay_served_from_factgrass():
    old = importlib.import_module("dattri_fn.attribute.factgrass")
    for mod, names in SERVED:
        new = importlib.import_module(mod)
        for name in names:
            assert getattr(old, name) is getattr(new, name), name


def test_state_class_keeps_its_module():
    assert FactGraSSState.__module__ == "dattri_fn.attribute.factgrass"
    assert FactGraSSState.__qualname__ == "FactGraSSState"
    s = FactGraSSState((("0", 0, 2),), {}, torch.arange(4.0).reshape(2, 2))
    assert io._encode(s)[io.TAG] == "dattri_fn.attribute.factgrass:FactGraSSState"
    back = pickle.loads(pickle.dumps(s))
    assert type(back) is FactGraSSState and torch.equal(back.train_features, s.train_features)


def test_the_stream_is_the_split_modules():
    """prepare and score run the lifted functions (a patch of factgrass_rows' capture is seen)."""
    fm, (x, y) = _problem("mlp", n=12, seed=3)
    m = factgrass(fm, proj_dim=8)
    rows_mod = sys.modules["dattri_fn.attribute.factgrass_rows"]
    seen = []
    real = rows_mod._Rows.pieces

    def spy(self, box):
        seen.append(self.func)
        yield from real(self, box)

    rows_mod._Rows.pieces = spy
    try:
        st = m.prepare(fm.params, (x, y))
        m.score(fm.params, st, None, (x[:2], y[:2]))
    finally:
        rows_mod._Rows.pieces = real
    assert seen == ["factgrass.prepare", "factgrass.score"]
