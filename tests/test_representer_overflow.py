"""Representer points on a training example whose features are finite but whose squared norm
overflows (|h| ~ 1e20 in float32): self_score refuses it naming the call, train and the example,
as score's scan does, instead of returning inf."""

import pytest
import torch
import torch.nn.functional as F

from dattri_fn.attribute.representer import representer


def _method():
    def feats(params, ex):  # the inputs themselves are the penultimate features
        return ex[0]

    def head(params, h):
        return h @ params["w"].T

    return representer(feats, head, lambda lo, y: F.cross_entropy(lo[None], y[None]), l2=0.1)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float64, 1e160)])
def test_overflowing_self_score_is_refused_naming_the_example(dtype, scale):
    """|h_2|^2 = inf while h_2, alpha_2 are finite: self_score names example 2; a clean set's
    self_score is finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=dtype)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    params = {"w": torch.randn(2, 3, generator=g, dtype=dtype) * 1e-30}  # logits stay finite
    m = _method()
    assert bool(torch.isfinite(m.self_score(params, m.prepare(params, (x, y)), (x, y))).all())
    x[2] *= scale
    st = m.prepare(params, (x, y))
    with pytest.raises(ValueError, match=r"^representer\.self_score\(train=\.\.\.\): expected "
                                         r"examples whose per-example features \(gradients\) are "
                                         r"finite, got NaN or inf in the self-score of example 2\."):
        m.self_score(params, st, (x, y))
