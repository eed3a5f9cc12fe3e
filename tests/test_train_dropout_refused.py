"""TRAK and the methods built on ``method.loss_and_plan`` (LESS, DVEmb) refuse a model with
Dropout left in training mode by name, as grad_dot/influence do (review RU M3, stop 26)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import dvemb, less, trak


def _train_mode_dropout():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return functional_model(net, F.cross_entropy)


@pytest.mark.parametrize("make", [lambda m: trak(m, proj_dim=4), lambda m: less(m),
                                  lambda m: dvemb(m)])
def test_train_mode_dropout_is_refused_at_construction(make):
    """Mutation: the check_eval calls of trak / loss_and_plan removed -> no ValueError."""
    with pytest.raises(ValueError, match=r"^(trak|less|dvemb)\(\w+=\.\.\.\): expected a module "
                                         r"in eval mode.*Call module\.eval\(\)"):
        make(_train_mode_dropout())


def test_eval_mode_is_accepted():
    fm = _train_mode_dropout()
    fm.module.eval()
    trak(fm, proj_dim=4), less(fm), dvemb(fm)


@pytest.mark.parametrize("name", ["logra", "factgrass"])
def test_train_mode_dropout_refused_by_projected_methods(name):
    """Mutation: the check_eval call of logra / factgrass removed -> no ValueError."""
    import dattri_fn.attribute as attribute
    with pytest.raises(ValueError, match=rf"^{name}\(model=\.\.\.\): expected a module in eval mode"):
        getattr(attribute, name)(_train_mode_dropout(), proj_dim=4)
