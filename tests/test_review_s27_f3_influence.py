"""Stop 27, engineer F3 (applied by the lead): influence(fm.loss, ...) on a model vmap cannot
run names itself and the remedy at score (RU2 M2), torch's error chained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.sum() > 1e9:  # data-dependent control flow: vmap refuses it (as HF's mask helpers)
            h = h * 0
        return self.b(h)


@pytest.mark.filterwarnings("ignore")
def test_influence_plain_loss_names_influence_and_the_remedy():
    torch.manual_seed(0)
    fm = functional_model(_Branchy().double().eval(), F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    b = (torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    method = influence(fm.loss, solver="cg", curvature="fisher", damping=0.1)
    with pytest.raises(ValueError, match=r"^influence\(loss=\.\.\.\): .*Pass the FunctionalModel "
                       r"itself \(influence\(fm\), not influence\(fm\.loss\)\)") as info:
        method.score(fm.params, method.prepare(fm.params, b), b, b)
    assert str(info.value.__cause__).startswith("vmap:")
