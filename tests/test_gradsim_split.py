"""gradsim.py after its split (stop 24): the projections and the one-pass scores moved out,
GradSimState stayed (its module, pickles and state_hash unchanged)."""

import importlib
import pickle

import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import io
from dattri_fn.attribute.gradsim import GradSimState, grad_cos, grad_dot
from dattri_fn.model import functional_model
from dattri_fn.store import state_hash

# state_hash of this problem's prepared state, computed at 5a209cc (before the split)
HASH_BEFORE = "178ac870ee3e66c7138f8c22c1c427105d7e45711eb1ed917bace91330d60f51"


def _problem():
    torch.manual_seed(24)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    return fm, (x, y)


def test_moved_names_are_served_from_gradsim():
    old = importlib.import_module("dattri_fn.attribute.gradsim")
    for mod, names in {"gradsim_project": ["PROJECTIONS", "_inverse_norms", "_kronecker",
                                           "_projector", "check_projection"],
                       "gradsim_pass": ["one_pass_scores", "pass_row_bytes"]}.items():
        new = importlib.import_module(f"dattri_fn.attribute.{mod}")
        for name in names:
            assert getattr(old, name) is getattr(new, name), name


def test_state_class_keeps_its_module_and_hash():
    assert GradSimState.__module__ == "dattri_fn.attribute.gradsim"
    assert GradSimState.__qualname__ == "GradSimState"
    fm, data = _problem()
    for m in (grad_dot(fm), grad_cos(fm)):
        s = m.prepare(fm.params, data)
        assert type(s) is GradSimState and s.train is not None
        assert state_hash(s) == HASH_BEFORE
        assert io._encode(s)[io.TAG] == "dattri_fn.attribute.gradsim:GradSimState"
        back = pickle.loads(pickle.dumps(s))
        assert back == s
        torch.testing.assert_close(m.score(fm.params, back, data, data),
                                   m.score(fm.params, (), data, data), rtol=0, atol=0)
