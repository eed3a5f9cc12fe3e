"""Stop 28, engineer F3 (review RF L3): TRAK's "computing these layers ... densely" warning on a
grouped conv is attributed to the user's line, as grad_dot's is (it pointed at
trak_features.py; fixed at the source by layer_grads' user_stacklevel, 40c9a82)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import grad_dot, trak
from dattri_fn.attribute.outputs import classification_margin_loss


@pytest.mark.parametrize("make", [lambda fm: trak(fm, proj_dim=4), grad_dot],
                         ids=["trak", "grad_dot"])
def test_dense_fallback_warning_points_at_the_users_line(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g))
    fm = functional_model(model, classification_margin_loss)
    method = make(fm)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        method.score(fm.params, method.prepare(fm.params, data), data, data)
    dense = [w for w in seen if "densely" in str(w.message)]
    assert dense and all(w.filename == __file__ for w in dense), \
        [(w.filename, str(w.message)[:80]) for w in dense]
