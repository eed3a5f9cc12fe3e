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

    def spy(self, box, *args):
        seen.append(self.func)
        yield from real(self, box, *args)

    rows_mod._Rows.pieces = spy
    try:
        st = m.prepare(fm.params, (x, y))
        m.score(fm.params, st, None, (x[:2], y[:2]))
    finally:
        rows_mod._Rows.pieces = real
    assert seen == ["factgrass.prepare", "factgrass.score"]


# state_hash of FactGraSS states prepared at a12e287 (the parent of the split 62ef169), float64:
# `_problem(kind, n=20, seed=3)`, factgrass(proj_dim=8, mask_dim=3), two batches of 10
HASHES_BEFORE_SPLIT = {
    "mlp": "7bdf1e82e240266f9421a5d74c084d61431b5a0ac90021bc0d4315de99aa32ae",
    "seq": "003535f718ab5e96cfb074b874878a736a54f309d324a10f5b983f2e4a3a43c4",
}


def test_states_hash_as_before_the_split():
    from dattri_fn.store import state_hash

    for kind, want in HASHES_BEFORE_SPLIT.items():
        fm, (x, y) = _problem(kind, n=20, seed=3)
        st = factgrass(fm, proj_dim=8, mask_dim=3).prepare(fm.params,
                                                           [(x[:10], y[:10]), (x[10:], y[10:])])
        assert state_hash(st) == want, kind


# (module, globals the FactGraSS tests patch on it): each must be read there as a global by a
# function of that module, or the patch reaches nothing (review R2 F1: after the split three
# tests patched factgrass._flat_capturable / _SKETCH_BYTES, which the stream no longer read)
PATCHED = [
    ("dattri_fn.attribute.factgrass",
     ["_keep_bytes", "memory_budget", "merged_passes", "_SKETCH_BYTES", "keep_tie_factors",
      "_PASS_SHARE", "_CACHE_SHARE"]),
    ("dattri_fn.attribute.factgrass_rows",
     ["_plain_io", "_flat_io", "_flat_io_checked", "_flat_capturable", "_check", "_stage_two"]),
]


def _global_reads(module) -> set:
    """Names the functions (and methods) of ``module``'s source load as globals or attributes."""
    import inspect
    import types

    names, todo = set(), [c for c in compile(inspect.getsource(module), module.__file__,
                                               "exec").co_consts if isinstance(c, types.CodeType)]
    while todo:
        code = todo.pop()
        names.update(code.co_names)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


def test_patched_names_are_read_where_the_tests_patch_them():
    for mod, names in PATCHED:
        reads = _global_reads(importlib.import_module(mod))
        assert [n for n in names if n not in reads] == [], mod
