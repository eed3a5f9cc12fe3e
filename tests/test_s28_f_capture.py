"""Stop 28, engineer F (issue 14, item 2): the capture engine names, from the module alone, the
layers whose calls it refuses whatever the data (a grouped Conv2d), in the same words as the
refusal its forward gives, so a method can leave them out in its one construction warning."""

from __future__ import annotations

import torch
from torch import nn

from dattri_fn.transforms import capture


def _net():
    return nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 6, 1),
                         nn.Conv2d(6, 6, 3, groups=3, bias=False), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, 3)).double()


def test_module_problems_names_the_grouped_convs_only():
    net = _net()
    specs = capture.layer_specs(net)
    assert capture.module_problems(net, specs) == {
        "0": "groups = 2, only groups = 1 is factored",
        "2": "groups = 3, only groups = 1 is factored"}
    assert capture.module_problems(net, {k: specs[k] for k in ("1", "4")}) == {}


def test_the_forward_refuses_them_in_the_same_words():
    net = _net()
    specs = capture.layer_specs(net)
    state = dict(net.named_parameters())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)  # 6x6 -> 2x2: 24 features
    found = capture.check(capture.tap(net, list(specs)), state, x)
    assert found == capture.module_problems(net, specs)
