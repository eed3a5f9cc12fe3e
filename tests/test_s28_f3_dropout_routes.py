"""Stop 28, engineer F3 (review RF L2): the two dropout routes engineer F fixed in 1f138bc, which
test_s28_f_vmap's cases do not reach (they stop at stacked_per_sample_grad): DVEmb's Hessian
(curvature="hessian") and TRAK's weight_fn. Before: torch's raw 'vmap: called random operation'."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from test_s28_f_vmap import _models, _record, _run

from dattri_fn.attribute import dvemb, trak
from dattri_fn.attribute.outputs import classification_margin_loss, classification_weight_loss


def _dropped(fm):
    return lambda p, ex: F.dropout(fm.loss(p, ex)[None], 0.5, training=True)[0]


def test_dvemb_hessian_with_a_loss_that_samples_names_dvemb_loss(tmp_path):
    fg, _ = _models()
    with pytest.raises(ValueError, match=r"^dvemb\(loss=\.\.\.\): expected a loss that draws no "
                                         r"random numbers"):
        _run(dvemb(_dropped(fg), curvature="hessian"), _record("sgd", tmp_path))


def test_trak_weight_fn_that_samples_names_trak_weight_fn():
    margin, _ = _models(classification_margin_loss)
    weight, _ = _models(classification_weight_loss)
    with pytest.raises(ValueError, match=r"^trak\(weight_fn=\.\.\.\): expected a loss that draws "
                                         r"no random numbers"):
        _run(trak(margin, proj_dim=4, weight_fn=_dropped(weight)), margin.params)
