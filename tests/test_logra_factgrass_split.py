"""The mechanical splits of logra.py and factgrass.py (stop 22): every name defined in the old
module stays importable there as the very same object, and the state classes keep their module
(io's saved tag and state_hash name it)."""

import importlib

import pytest
import torch

from dattri_fn.attribute.factgrass import FactGraSSState
from dattri_fn.attribute.logra import LoGraState
from dattri_fn.store_hash import state_hash

# (old module, new module, names moved from the old one to the new one)
MOVES = [
    ("dattri_fn.attribute.logra", "dattri_fn.attribute.logra_rows", ["_outer_rows", "_Gather"]),
    ("dattri_fn.attribute.logra", "dattri_fn.attribute.logra_basis",
     ["_projection", "_projections", "_cast", "_eigvecs"]),
    ("dattri_fn.attribute.factgrass", "dattri_fn.attribute.factgrass_blocks", ["_Sketches", "_shapes"]),
]
# names that never moved: still defined where they were
KEPT = [
    ("dattri_fn.attribute.logra", ["LoGraState", "logra", "_BLOCK_BYTES", "_KRON_MAX"]),
    ("dattri_fn.attribute.factgrass",
     ["FactGraSSState", "factgrass", "CURVATURES", "_DENSE_STAGE2", "_SKETCH_BYTES"]),
]


@pytest.mark.parametrize("old,new,names", MOVES, ids=[f"{o}->{n}" for o, n, _ in MOVES])
def test_moved_names_stay_importable_from_their_old_module(old, new, names):
    """For each moved name: getattr(old module, name) is getattr(new module, name), defined in new."""
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_mod, name) is getattr(new_mod, name)
        assert getattr(getattr(new_mod, name), "__module__", new) == new


@pytest.mark.parametrize("mod,names", KEPT, ids=[m for m, _ in KEPT])
def test_kept_names_stay_defined_in_their_module(mod, names):
    """The state classes, factories and the constants tests patch stay defined in the old module."""
    m = importlib.import_module(mod)
    for name in names:
        got = getattr(m, name)
        assert getattr(got, "__module__", mod) == mod


def test_state_hashes_are_those_before_the_split():
    """state_hash of fixed LoGraState/FactGraSSState values == their hashes at a7b12ee (before the split);
    FactGraSSState's since stop 23, when it gained the train_factors and sketch fields (None here)."""
    t = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    lo = LoGraState({"0": (None, t[:, :2])}, {"0": (t[:2, :2], t[:3, :3])}, {"0": t[:3, :2]}, None,
                    {"0": (t[:, :2], t[:, 2:])})
    fg = FactGraSSState((("0", 0, 2), ("1", 2, 4)), {"0": t[:2, :2], "1": t[1:, 1:3]}, t)
    assert state_hash(lo) == "a901d45eb17ee237fabd64fa32c150c8397504fcba25d159425bd80179a89fad"
    # the tree spec holds every field, None or not (torch's pytree flattens any NamedTuple class
    # by its fields; no class can flatten otherwise): 40c82692... at a7b12ee to 08e3a9f (4 fields),
    # 7c747448... with train_factors (stop 23, unreleased), this with sketch (review R2 F2)
    assert state_hash(fg) == "7401b99a2d83f9fc14ffe53b7ebfe1738865714150fadc24f3832954ffb1d4a9"
