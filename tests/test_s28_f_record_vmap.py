"""Stop 28, engineer F (issue 14, item 1, training side): a GradSpec whose loss vmap cannot run
(.item() or a Python branch on a tensor's value in the forward) is named at record_step as
GradSpec(loss=...), not torch's raw vmap error."""

from __future__ import annotations

import pytest
import torch
from test_s28_f_vmap import _data, _models

from dattri_fn.training import GradSpec, record_step, start_record


def test_grad_spec_loss_vmap_cannot_run_is_named(tmp_path):
    _, fb = _models()
    data = _data()
    rec = start_record("sgd", checkpoint_every=1, grads=GradSpec(fb.loss, str(tmp_path), None))
    with pytest.raises(ValueError, match=r"^GradSpec\(loss=\.\.\.\): expected a loss "
                       r"torch\.func\.vmap can run per example.*GradSpec vmaps loss per example "
                       r"for every model") as info:
        record_step(rec, torch.arange(4), lr=0.1, params=fb.params, opt_state=None,
                    batch=(data[0][:4], data[1][:4]))
    assert isinstance(info.value, RuntimeError) and str(info.value.__cause__).startswith("vmap:")
