"""metagradient(compile=True): the cotangents pulled back through torch.compile of each chunk's vjp +
vmapped pullback equal the eager pass within float32 rounding, chunks padded to one size and targets
leaving under early exit included; skipped where torch.compile cannot build a CPU kernel."""

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from dattri_fn.attribute.metagradient import metagradient
from dattri_fn.model import functional_model
from dattri_fn.training import batch_order, make_step, sgd, train


def _compiles() -> bool:
    try:
        return bool(torch.compile(lambda x: x * 2 + 1)(torch.ones(3)).eq(3).all())
    except Exception:  # noqa: BLE001 - any failure of the compiler means "unavailable here"
        return False


@pytest.mark.slow
def test_compiled_pass_equals_the_eager_pass_within_float32_rounding():
    """weights, params (exact pass, chunks of 3 over k = 5: the last padded) and the band with early
    exit (1.1, 1) (targets leave, chunks shrink and are padded) = eager's to 1e-4 of their scale."""
    if not _compiles():
        pytest.skip("torch.compile unavailable")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    fm = functional_model(model, nn.functional.cross_entropy)
    opt = sgd(0.3, momentum=0.9)
    step = make_step(fm, opt)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g))
    test = (torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g))
    order = batch_order(12, batch_size=4, epochs=3, seed=2)
    traj = train(step, fm.params, opt.init(fm.params), data, order, checkpoint_every=3)
    cot = vmap(grad(lambda p, ex: -fm.loss(p, ex)), in_dims=(None, 0))(traj.params, test)
    for kw in (dict(chunk_size=3), dict(chunk_size=2, horizon="band", early_exit=(1.1, 1))):
        ref = metagradient(step, traj, data, order, cot, **kw)
        out = metagradient(step, traj, data, order, cot, compile=True, **kw)
        if ref.walked is not None:
            assert torch.equal(out.walked, ref.walked)
        scale = float(ref.weights.abs().max())
        assert scale > 1e-3
        torch.testing.assert_close(out.weights, ref.weights, rtol=0, atol=1e-4 * scale)
        for key, v in ref.params.items():
            torch.testing.assert_close(out.params[key], v, rtol=0, atol=1e-4 * float(v.abs().max()))


def test_compile_must_be_a_bool():
    """compile='yes' is refused by name before any step runs."""
    torch.manual_seed(0)
    fm = functional_model(nn.Linear(2, 2), nn.functional.cross_entropy)
    opt = sgd(0.1)
    step = make_step(fm, opt)
    data = (torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    order = batch_order(4, batch_size=2, epochs=1, seed=0)
    traj = train(step, fm.params, opt.init(fm.params), data, order, checkpoint_every=1)
    cot = {k: v[None] for k, v in traj.params.items()}
    with pytest.raises(TypeError, match=r"metagradient\(compile=...\): expected a bool, got str\."):
        metagradient(step, traj, data, order, cot, compile="yes")
