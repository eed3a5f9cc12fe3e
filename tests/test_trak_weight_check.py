"""trak's boundary calls only the margin on the first example when the weight is the same
functional_model bridge with classification_weight_loss (the weight then passes whenever the
margin does): one forward less a prepare, and every error the same as with both checks."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.trak import (
    _weight_follows,
    classification_margin_loss,
    classification_weight_loss,
    trak,
)
from dattri_fn.model import FunctionalModel, functional_model

trak_mod = importlib.import_module("dattri_fn.attribute.trak")  # the module, not the function
MARGIN, WEIGHT = classification_margin_loss, classification_weight_loss


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def test_the_recipe_pair_is_recognised_and_nothing_else():
    """True only for (margin, weight) bridges of one module with equal captured state."""
    net = _net()
    m, w = functional_model(net, MARGIN), functional_model(net, WEIGHT)
    assert _weight_follows(m, w)
    assert not _weight_follows(w, m)  # the weight as output_fn: not the pair
    assert not _weight_follows(m, functional_model(net, F.cross_entropy))
    assert not _weight_follows(m, functional_model(_net(), classification_weight_loss))  # another module
    assert not _weight_follows(m, functional_model(net, classification_weight_loss, params=["0.weight"]))
    assert not _weight_follows(m, functional_model(net, classification_weight_loss,
                                                   unpack=lambda ex: ((ex[0],), {}, ex[1])))
    assert not _weight_follows(m, w._replace(loss=lambda p, ex: w.loss(p, ex)))  # not the bridge
    assert not _weight_follows(m, m.loss) and not _weight_follows(m, None)
    assert isinstance(w, FunctionalModel)


def _counting(monkeypatch):
    calls = []
    real = trak_mod.check_example_fn

    def counted(func, arg, *a, **k):
        calls.append(arg)
        return real(func, arg, *a, **k)

    monkeypatch.setattr(trak_mod, "check_example_fn", counted)
    return calls


@pytest.mark.parametrize("certified", [True, False])
def test_prepare_checks_the_weight_only_when_it_can_fail(monkeypatch, certified):
    """The pair: output_fn only; a weight that is not the bridge's loss: both, as before. On this
    plain MLP output_fn's own call is certain to pass (trak_mlp.example_ok, stop 26) and is not
    made; with that certificate off (certified=False) it is, as before."""
    if not certified:
        monkeypatch.setattr(importlib.import_module("dattri_fn.attribute.trak_mlp"), "example_ok",
                            lambda *a: False)
    own = ["output_fn"] if not certified else []
    net, (x, y) = _net(), _data()
    m = functional_model(net, classification_margin_loss)
    calls = _counting(monkeypatch)
    trak(m, weight_fn=functional_model(net, classification_weight_loss), proj_dim=2,
         damping=0.1).prepare(m.params, (x, y))
    assert calls == own
    calls.clear()
    base = functional_model(net, WEIGHT)
    other = base._replace(loss=lambda p, ex: base.loss(p, ex))  # the same, but not the bridge
    trak(m, weight_fn=other, proj_dim=2, damping=0.1).prepare(m.params, (x, y))
    assert calls == [*own, "weight_fn"]


def _error(fn):
    try:
        fn()
    except Exception as err:  # the error a user sees: its type and text
        return type(err), str(err)
    return None


@pytest.mark.parametrize("bad", ["width", "label", "float-label", "label-shape", "params"])
def test_errors_are_those_of_both_checks(monkeypatch, bad):
    """Bad examples or params raise the same error (type and text) with the weight's check
    skipped as with it forced (_weight_follows patched to False). Each of these fails the margin's
    check first, so this shows the errors users see are unchanged; that the weight's check cannot
    fail after the margin's passed rests on classification_weight_loss being sigmoid(-m) of the
    same margins call (review R6 F5)."""
    net, (x, y) = _net(), _data()
    m, w = functional_model(net, MARGIN), functional_model(net, WEIGHT)
    params = m.params
    if bad == "width":
        x = torch.randn(8, 5, dtype=torch.float64)
    elif bad == "label":
        y = y.clone()
        y[0] = 7
    elif bad == "float-label":
        y = y.double()
    elif bad == "label-shape":
        y = y[:, None]
    else:
        params = {k: v[..., :1] if k == "2.weight" else v for k, v in m.params.items()}

    def run():
        trak(m, weight_fn=w, proj_dim=2, damping=0.1).prepare(params, (x, y))

    skipped = _error(run)
    monkeypatch.setattr(trak_mod, "_weight_follows", lambda *a: False)
    both = _error(run)
    assert skipped is not None and skipped == both


class _SparseMix(nn.Module):
    """A Linear then a fixed sparse mixing matrix (a registered sparse COO buffer)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 3).double()
        mix = torch.eye(3, dtype=torch.float64)
        mix[0, 1] = 0.5
        self.register_buffer("mix", mix.to_sparse())

    def forward(self, x):
        return torch.sparse.mm(self.mix, self.fc(x).T).T


def test_a_model_holding_a_sparse_buffer_takes_both_checks_without_reading_its_storage():
    """A sparse buffer has no data_ptr (review R6 F2: trak() raised 'Cannot access data pointer'):
    the pair is not taken as the same (both checks run) and scores equal the dense-buffer twin's."""
    net, x = _SparseMix(), torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out, w = functional_model(net, MARGIN), functional_model(net, WEIGHT)
    assert not _weight_follows(out.loss, w.loss)
    S = trak(out, weight_fn=w, proj_dim=None).score(out.params, trak(out, weight_fn=w, proj_dim=None)
                                                    .prepare(out.params, (x, y)), (x, y), (x[:3], y[:3]))
    twin = _SparseMix()
    twin.mix = twin.mix.to_dense()
    o2, w2 = functional_model(twin, MARGIN), functional_model(twin, WEIGHT)
    m2 = trak(o2, weight_fn=w2, proj_dim=None)
    torch.testing.assert_close(S, m2.score(o2.params, m2.prepare(o2.params, (x, y)), (x, y), (x[:3], y[:3])),
                               rtol=1e-10, atol=1e-12)
