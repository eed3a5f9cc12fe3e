"""Stop 28, engineer F (issue 14, item 2; review RU3 L1): LoGra on a grouped Conv2d gives ONE
warning, at construction, naming the layer and that it is left out; the scores are those of
LoGra on the other layers alone."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import logra


def _net(groups: int = 2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, groups=groups), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g))


def _scores(fm):
    data = _data()
    m = logra(fm, proj_dim=2)
    st = m.prepare(fm.params, data)
    return m.score(fm.params, st, data, (data[0][:3], data[1][:3])), m.self_score(fm.params, st, data)


def test_grouped_conv_is_left_out_in_one_warning():
    """One warning: layer 0 named with its groups, its params among those left out."""
    fm = functional_model(_net(), F.cross_entropy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S, diag = _scores(fm)
    texts = [str(w.message) for w in caught if "logra" in str(w.message)]
    assert len(texts) == 1, texts
    assert texts[0] == ("logra: attributing through the layers ['5'] only; these parameters are "
                        "left out: ['0.weight', '0.bias', '1.weight', '1.bias'] (0: groups = 2, "
                        "only groups = 1 is factored).")
    only = functional_model(_net(), F.cross_entropy, params=["5"])
    S5, diag5 = _scores(only)  # the same layers and projections: the same scores
    assert torch.equal(S, S5) and torch.equal(diag, diag5)


def test_only_a_grouped_conv_is_refused_at_construction():
    fm = functional_model(_net(), F.cross_entropy, params=["0"])
    with pytest.raises(ValueError, match=r"^logra\(model=\.\.\.\): expected an attributed "
                       r"nn\.Linear.*got none \(0: groups = 2, only groups = 1 is factored\)"):
        logra(fm, proj_dim=2)


def test_ungrouped_conv_is_attributed_without_a_warning():
    fm = functional_model(_net(groups=1), F.cross_entropy, params=["0", "5"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S, _ = _scores(fm)
    assert torch.isfinite(S).all()
