"""TRAK's state after the split of trak.py (stop 22): states saved before it load and score."""

import importlib
import pickle
from pathlib import Path

import torch
from torch import nn

from dattri_fn import io
from dattri_fn.attribute.trak import (
    TRAKState,
    classification_margin,
    classification_margin_loss,
    classification_weight,
    classification_weight_loss,
    trak,
)
from dattri_fn.model import functional_model
from dattri_fn.store import state_hash

F64 = torch.float64
OLD = Path(__file__).parent / "data" / "trak_states_before_split.pt"
MOVED = ["_CACHED_ENTRIES", "TRAKState", "WeightedRows", "_moved", "cached_chunks", "check_state",
         "factored_state", "stacked_dtype", "test_rows", "train_rows"]


def problem():
    """A 5-6-3 tanh MLP in float64 at 2 checkpoints, 12 train and 4 test examples (data/make_*
    imports this: the saved states were prepared from exactly these)."""
    g = torch.Generator().manual_seed(22)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    base = functional_model(net).params
    ckpts = [{k: 0.7 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in base.items()}
             for _ in range(2)]
    x, y = torch.randn(16, 5, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)
    return net, ckpts, (x[:12], y[:12]), (x[12:], y[12:])


def methods(net):
    """The three state forms: projected (primal [C, d, d]), unprojected with a plain output
    function (dense dual [C, n, n]) and with a FunctionalModel (factored rows, packed kernel)."""
    fm = functional_model(net)
    plain = dict(output_fn=classification_margin(fm.forward),
                 weight_fn=classification_weight(fm.forward))
    return {"projected": trak(**plain, proj_dim=8),
            "dual": trak(**plain),
            "factored": trak(functional_model(net, classification_margin_loss),
                             weight_fn=functional_model(net, classification_weight_loss))}


def test_moved_names_are_served_from_trak():
    """Every name moved to trak_state is the very same object from dattri_fn.attribute.trak."""
    # imported here, not at the top: data/make_* imports this file with the tree before the split
    old, new = (importlib.import_module(f"dattri_fn.attribute.{m}") for m in ("trak", "trak_state"))
    for name in MOVED:
        assert getattr(old, name) is getattr(new, name), name


def test_state_class_keeps_its_module():
    """TRAKState reports dattri_fn.attribute.trak: io's tag, pickles and state_hash's tree spec
    name the class by that path."""
    assert TRAKState.__module__ == "dattri_fn.attribute.trak"
    s = TRAKState(torch.arange(4.0).reshape(1, 2, 2), None, None)
    assert io._encode(s)[io.TAG] == "dattri_fn.attribute.trak:TRAKState"
    back = pickle.loads(pickle.dumps(s))
    assert type(back) is TRAKState and torch.equal(back.kernel, s.kernel)
    from torch.utils._pytree import tree_flatten

    assert "dattri_fn.attribute.trak.TRAKState" in str(tree_flatten(s)[1])


def test_states_saved_before_the_split_load_hash_and_score():
    """The states written by 6c822d2 (data/make_trak_states_before_split.py) load as TRAKState,
    with the same state_hash as then, and score/self_score as then (float64, 1e-12)."""
    saved = io.load(OLD)
    net, ckpts, train, test = problem()
    ms = methods(net)
    assert set(saved["states"]) == set(ms)
    for key, m in ms.items():
        state = saved["states"][key]
        assert type(state) is TRAKState, key
        assert state_hash(state) == saved["hashes"][key], key
        torch.testing.assert_close(m.score(ckpts, state, None, test), saved["scores"][key],
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(m.self_score(ckpts, state, None), saved["self"][key],
                                   rtol=0, atol=1e-12)
    assert saved["states"]["factored"].train_factors is not None
    assert saved["states"]["dual"].kernel.shape == (2, 12, 12)
    assert saved["states"]["projected"].kernel.shape == (2, 8, 8)
