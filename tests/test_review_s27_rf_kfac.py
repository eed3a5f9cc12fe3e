"""Review RF (stop 27) M1: the public kfac_factors/ekfac_factors, which take a module, refuse
one with a Dropout in training mode (its A and G were random draws, two calls unequal)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.operators.kfac_ekfac import ekfac_factors
from dattri_fn.operators.kfac_stats import kfac_factors


@pytest.mark.parametrize("build", [kfac_factors, ekfac_factors])
def test_factors_refuse_train_mode_dropout(build):
    """Mutation: the check_eval_module line in _checked_kfac_pass removed -> no error."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    params = {k: v.detach() for k, v in net.named_parameters()}
    data = [(torch.randn(10, 4), torch.randint(0, 3, (10,)))]
    name = build.__name__
    with pytest.raises(ValueError, match=rf"^{name}\(module=\.\.\.\): expected a module in eval "
                                         r"mode.*Dropout in training mode at \['2'\]\. Call "
                                         r"module\.eval\(\) first\."):
        build(net, F.cross_entropy, params, data)
    build(net.eval(), F.cross_entropy, params, data)
