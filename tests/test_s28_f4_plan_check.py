"""The plan check judges each key against its own scale, at the tolerance of the dtype that
computed it (review RF2 MED-1, MED-2), and the dense warning names short layer names (LOW-1).

The model: an Embedding, then a Linear applied to ``[T, B, d]`` with ``T = B = 3`` (examples
mixed; the narrowing forward cannot tell it from batch-first), its output scaled by ``c``."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.transforms.layer_grads import check_plan, layer_plan
from dattri_fn.transforms.layer_grads_gap import _gap_sums, _mismatch, tolerance
from dattri_fn.transforms.layer_grads_paths import _factored_and_rows

D, T = 16, 3


class _Net(nn.Module):
    def __init__(self, c, seq_first=True):
        super().__init__()
        self.emb, self.mix = nn.Embedding(11, D), nn.Linear(D, D)
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, 11)
        self.c, self.seq_first = c, seq_first

    def forward(self, ids):
        h = self.emb(ids)  # [B, T, D]
        m = self.mix(h.transpose(0, 1)).transpose(0, 1) if self.seq_first else self.mix(h)
        h = h + self.c * torch.tanh(m)
        return self.head(torch.tanh(self.fc(h)))


def _loss(out, y):
    return F.cross_entropy(out.flatten(0, 1).float(), y.flatten(), reduction="sum")


def _case(c, dtype=torch.float32, seq_first=True):
    torch.manual_seed(0)
    fm = functional_model(_Net(c, seq_first).to(dtype).eval(), _loss)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 11, (T, T), generator=g), torch.randint(0, 11, (T, T), generator=g))
    return fm, {k: v.detach()[None] for k, v in fm.params.items()}, batch


def _checked(fm, stacked, batch):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plan = check_plan(layer_plan(fm), stacked, batch)
    return plan, [str(x.message) for x in w if "layer_grads" in str(x.message)]


@pytest.mark.parametrize("c", [0.01, 0.03, 0.1])
def test_autocast_mixing_in_a_small_layer_goes_dense(c):
    """MED-1: the mixing layer's gradients are a few % of the model's largest; under bf16
    autocast its rows were 73% wrong and passed silently (global scale, tolerance 0.078)."""
    fm, stacked, batch = _case(c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan, w = _checked(fm, stacked, batch)
    assert plan.dense and len(w) == 1 and "do not match vmap(grad)" in w[0], w
    assert "autocast to bfloat16's rounding" in w[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_mixing_goes_dense(dtype):
    """MED-2: with bf16 weights the check's tolerance was 10 sqrt(eps) = 0.88 of the scale; a
    mixing layer carrying 90% of the gradient passed 62% wrong."""
    fm, stacked, batch = _case(3.0, dtype)
    plan, w = _checked(fm, stacked, batch)
    assert plan.dense and len(w) == 1 and "do not match vmap(grad)" in w[0], w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("c", [0.03, 3.0])
def test_batch_first_model_keeps_the_factored_path(dtype, autocast, c):
    """No false dense: the same model applied batch-first passes at every dtype, with and
    without autocast (rounding is no mismatch, whatever a layer's share of the gradient)."""
    if autocast and dtype == torch.float16:
        pytest.skip("torch's CPU autocast to bf16 refuses fp16 tensors (torch.stack: prioritize)")
    fm, stacked, batch = _case(c, dtype, seq_first=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plan, w = _checked(fm, stacked, batch)
    assert not plan.dense and w == [], w


def test_keyed_gaps_agree_with_the_global_gap():
    """One (error, scale, dtype) per key; their maxima are the global gap's (same block)."""
    fm, stacked, batch = _case(0.1, torch.float64, seq_first=False)
    plan = check_plan(layer_plan(fm), stacked, batch)
    lg, ref, sums = _factored_and_rows(plan, stacked, batch, False, T, ref_at=(0, T - 1))
    lg = lg[0] if isinstance(lg, tuple) else lg
    keyed = _gap_sums(lg, ref, sums, T, at=(0, T - 1), keyed=True)
    assert list(keyed) == list(ref)
    err, scale, dtype = _gap_sums(lg, ref, sums, T, at=(0, T - 1))
    assert dtype == torch.float64 and err < 1e-12 * scale
    assert max(s for _, s, _ in keyed.values()) >= scale * (1 - 1e-15)
    assert _mismatch(keyed, "cpu") is None


def test_mismatch_is_per_key_with_a_rounding_floor():
    """A key 1% of the model's scale and 50% wrong fails; an error under tol^2 / 10 of the
    model's largest gradient passes (a cancelling gradient keeps no relative accuracy)."""
    f32 = torch.float32
    assert "at small" in _mismatch({"big": (0.0, 1.0, f32), "small": (5e-3, 1e-2, f32)}, "cpu")
    assert _mismatch({"big": (0.0, 1.0, f32), "zero": (0.05 * tolerance(f32, "cpu")[0] ** 2,
                                                        0.0, f32)}, "cpu") is None
    assert math.isclose(tolerance(torch.bfloat16, "cpu")[0], 10 * torch.finfo(torch.bfloat16).eps)
    bf16 = torch.bfloat16  # half: the floor is tol / 10 = eps of the largest, not sqrt(eps)
    assert "at small" in _mismatch({"big": (0.0, 1.0, bf16), "small": (2e-3, 4e-3, bf16)}, "cpu")


class _Tr(nn.Module):
    def forward(self, x):
        return x.transpose(0, 1)


def test_dense_warning_names_short_layer_names():
    """LOW-1: layers "1" and "3" of a Sequential matched digits of the shape "[3, 5, 13]" and
    vanished from the warning."""
    torch.manual_seed(0)
    net = nn.Sequential(_Tr(), nn.Linear(13, 13), nn.Tanh(), nn.Linear(13, 13), _Tr()).eval()
    fm = functional_model(net, lambda out, y: ((out - y) ** 2).sum())
    x, y = torch.randn(5, 3, 13), torch.randn(5, 13, 13)[:, :3]
    _, w = _checked(fm, {k: v.detach()[None] for k, v in fm.params.items()}, (x, y))
    assert len(w) == 1 and "1: an input [3, 5, 13]" in w[0] and "; 3: an input" in w[0], w
