"""A selected layer fed by an inference tensor (review R2 F2, stop 22), float64.

A frozen backbone run under ``torch.inference_mode`` inside ``forward`` hands the trainable head
an inference tensor. The capture engine's weight alias would save that input for backward, which
autograd refuses; the zero probe saves nothing. So every path gives the ``(a, g)`` and the scores
of the same model with its backbone under ``torch.no_grad``.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.influence import influence
from dattri_fn.attribute.logra import logra
from dattri_fn.model import functional_model
from dattri_fn.transforms.capture import tap
from dattri_fn.transforms.layers import batched_io, streamed_io

DT = torch.float64


class Frozen(nn.Module):
    """A frozen backbone (under inference_mode or no_grad) and a trainable head (two Linears)."""

    def __init__(self, inference: bool):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        self.inference = inference

    def forward(self, x):
        with torch.inference_mode() if self.inference else torch.no_grad():
            f = self.backbone(x)
        return self.head(f)


def _pair(seed: int = 0):
    """(inference-mode model, no_grad model) with the same weights, and a batch (x [8, 4], y [8])."""
    g = torch.Generator().manual_seed(seed)
    a = Frozen(True).double().eval()
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / 2)
    b = Frozen(False).double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4, generator=g, dtype=DT)
    return a, b, (x, torch.randint(0, 3, (8,), generator=g))


def _state(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _head(name: str) -> bool:
    return name.startswith("head.")


@pytest.mark.parametrize("path", ["batched_io", "streamed_io"])
def test_a_head_fed_by_an_inference_backbone_gets_the_no_grad_a_and_g(path):
    """(a, g) of head.0 and head.2 under an inference-mode backbone == under a no_grad backbone."""
    inf, ng, (x, y) = _pair()

    def io(model):
        t, st = tap(model, ["head.0", "head.2"]), _state(model)
        if path == "batched_io":
            return batched_io(t, F.cross_entropy, st, (x,), {}, y, None, x)
        got = {}

        def step(n, a, g):
            got[n] = (a.clone(), g.clone())

        streamed_io(t, F.cross_entropy, st, (x,), {}, y, None, x, step)
        return got

    want, got = io(ng), io(inf)
    assert sorted(got) == sorted(want) == ["head.0", "head.2"]  # streamed: in backward order
    for n in want:
        assert torch.equal(got[n][0], want[n][0]) and torch.equal(got[n][1], want[n][1])
    assert not got["head.0"][0].requires_grad and got["head.0"][1].abs().sum() > 0


@pytest.mark.parametrize("method", ["logra", "ekfac", "kfac"])
def test_methods_on_an_inference_backbone_score_as_on_a_no_grad_one(method):
    """LoGra / K-FAC / EK-FAC scores with params=head.* equal those of the no_grad backbone."""
    inf, ng, (x, y) = _pair(1)
    train, test = [(x[:4], y[:4]), (x[4:], y[4:])], (x[:3], y[:3])

    def scores(model):
        fm = functional_model(model, F.cross_entropy, params=_head)
        m = logra(fm, proj_dim=4) if method == "logra" else influence(fm, solver=method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return m.score(fm.params, m.prepare(fm.params, train), train, test)

    want = scores(ng)
    assert torch.isfinite(want).all() and want.abs().max() > 0
    assert torch.equal(scores(inf), want)
