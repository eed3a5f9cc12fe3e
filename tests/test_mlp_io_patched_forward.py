"""mlp_io declines where a class-level (or module-level) patch changes what the engine runs
(review RA F4, stop 25): nn.Linear.forward / an activation's forward / F.linear / torch.tanh
replaced -> None, and per_sample_layer_grads (a certified MLP's plan) then equals per-example
autodiff of the patched model; with the patch removed, mlp_io certifies again."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.transforms import mlp_io as mlp_io_module
from dattri_fn.transforms.grad import per_sample_grad
from dattri_fn.transforms.layer_grads import per_sample_layer_grads

DT = torch.float64
_linear, _tanh = F.linear, torch.tanh

PATCHES = {
    "Linear.forward": (nn.Linear, "forward",
                       lambda self, x: _linear(x, self.weight, self.bias) * 0.5),
    "Tanh.forward": (nn.Tanh, "forward", lambda self, x: _tanh(x) * 0.5),
    "F.linear": (F, "linear", lambda x, w, b=None: _linear(x, w, b) * 0.5),
    "torch.tanh": (torch, "tanh", lambda x: _tanh(x) * 0.5),
}


def _fm():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(DT).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x = torch.randn(5, 6, generator=g, dtype=DT)
    return functional_model(m, F.cross_entropy), (x, torch.randint(0, 4, (5,), generator=g))


def _io(fm, batch):
    x, y = batch
    return mlp_io_module.mlp_io(fm.module, F.cross_entropy, dict(fm.params), (x,), {}, y,
                                ("0", "2"))


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_a_patched_forward_is_not_certified(name, monkeypatch):
    fm, batch = _fm()
    assert _io(fm, batch) is not None
    owner, attr, fn = PATCHES[name]
    with monkeypatch.context() as mp:
        mp.setattr(owner, attr, fn)
        assert _io(fm, batch) is None
        got = per_sample_layer_grads(fm, fm.params, batch).to_dense()[0]
        ref = per_sample_grad(fm.loss, fm.params, batch)
        assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    assert _io(fm, batch) is not None


def _in_vmap():
    seen = []
    torch.func.vmap(lambda t: seen.append(mlp_io_module.plain_context()) or t)(torch.zeros(2, 1))
    return seen[0]


def test_plain_context_is_the_gate_mlp_io_reads(monkeypatch):
    """plain_context() (the gate mlp_io and trak_mlp's margin pass share): True here, False
    inside a torch.func transform, inference mode, autocast, a torch-function mode, with a
    global forward hook, or with nn.Linear.forward replaced; mlp_io declines in each."""
    from torch.overrides import TorchFunctionMode

    fm, batch = _fm()
    assert mlp_io_module.plain_context() and _io(fm, batch) is not None
    assert not _in_vmap()
    for ctx in (torch.inference_mode(), torch.autocast("cpu"), TorchFunctionMode()):
        with ctx:
            assert not mlp_io_module.plain_context() and _io(fm, batch) is None
    h = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not mlp_io_module.plain_context() and _io(fm, batch) is None
    finally:
        h.remove()
    with monkeypatch.context() as mp:
        mp.setattr(nn.Linear, "forward", PATCHES["Linear.forward"][2])
        assert not mlp_io_module.plain_context() and _io(fm, batch) is None
    assert mlp_io_module.plain_context() and _io(fm, batch) is not None
