"""Stop 28, engineer F3 (review RF M1): influence's plain-loss rows name the argument the function
came from: a bad ``target`` is ``influence(target=...)``, not the user's ``loss`` (the test side
passed refuse=("influence", "loss") too). Needs /work/notes/s28/F3_to_C.patch (influence_score)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_s28_f_vmap import _data, _models

from dattri_fn.attribute import influence

DT = torch.float64


@pytest.mark.parametrize("case", ["target_drop", "target_vec", "target_branch", "loss_drop"])
def test_influence_names_target_or_loss(case):
    fg, fb = _models()
    drop = lambda p, ex: F.dropout(fg.loss(p, ex)[None], 0.5, training=True)[0]  # noqa: E731
    vec = lambda p, ex: fg.loss(p, ex) * torch.ones(2, dtype=DT)  # noqa: E731
    loss, target, arg, expected = {
        "target_drop": (fg.loss, drop, "target", "a loss that draws no random numbers"),
        "target_vec": (fg.loss, vec, "target", "a per-example function"),
        "target_branch": (fg.loss, fb.loss, "target", "a loss torch.func.vmap can run"),
        "loss_drop": (drop, None, "loss", "a loss that draws no random numbers")}[case]
    m = influence(loss, target=target, solver="cg", damping=0.1, curvature="hessian")
    x, y = _data()
    with pytest.raises(ValueError, match=rf"^influence\({arg}=\.\.\.\): expected {expected}"):
        m.score(fg.params, m.prepare(fg.params, (x, y)), (x, y), (x[:3], y[:3]))
