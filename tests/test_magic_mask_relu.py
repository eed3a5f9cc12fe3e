"""MAGIC's mask-ReLU vjp_step: relu(x) = x * 1[x > 0] with the mask held constant has relu's values,
first and second derivatives, so the reverse pass through it equals the step's (float64, 1e-10)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from dattri_fn.attribute.magic import metagradient
from dattri_fn.model import functional_model
from dattri_fn.training import batch_order, make_step, sgd, train
from dattri_fn.training.mask_relu import MaskReLU, count_relus, mask_relu, with_mask_relus

DT = torch.float64


def tiny_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).to(DT)


def data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))


def test_mask_relu_has_relus_values_and_derivatives():
    """x * 1[x>0] = relu(x), and its gradient and Hessian-vector product of sum(c * f(x)^2) are
    relu's exactly (exact zeros included)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, generator=g, dtype=DT)
    x[::7] = 0.0
    c, v = torch.randn(40, generator=g, dtype=DT), torch.randn(40, generator=g, dtype=DT)
    assert torch.equal(mask_relu(x), torch.relu(x)) and torch.equal(MaskReLU()(x), torch.relu(x))

    def objective(f):
        return lambda y: (c * f(y) ** 2).sum()

    for f in (mask_relu, torch.relu):
        assert torch.equal(grad(objective(f))(x), grad(objective(torch.relu))(x))
        hvp = jvp(grad(objective(f)), (x,), (v,))[1]
        assert torch.equal(hvp, jvp(grad(objective(torch.relu)), (x,), (v,))[1])
        assert bool(hvp.abs().gt(0).any())


@pytest.mark.parametrize("gemm", [False, True])
def test_reverse_pass_through_mask_relus_equals_the_step(gemm):
    """metagradient(vjp_step = the step on the mask-ReLU copy [with the GEMM conv: the recipe's])
    = metagradient(step): d f_j / d w_i and d f_j / d theta_0 at 1e-10 (SGD + momentum)."""
    from dattri_fn.app.recipes import _gemm_vjp_step

    model = tiny_cnn(0)
    fm = functional_model(model, F.cross_entropy)
    opt = sgd(0.2, momentum=0.9, weight_decay=1e-3)
    twin = with_mask_relus(model)
    assert [n for n, _ in twin.named_parameters()] == list(fm.params)
    assert count_relus(model) == 2 and count_relus(twin) == 0
    step = make_step(fm, opt)
    fast = _gemm_vjp_step(model, F.cross_entropy, opt) if gemm else \
        make_step(functional_model(twin, F.cross_entropy), opt)
    train_data, test = data(1, 12), data(2, 4)
    order = batch_order(12, batch_size=5, epochs=2, seed=3)
    traj = train(step, fm.params, opt.init(fm.params), train_data, order, checkpoint_every=1)
    cot = vmap(grad(lambda p, ex: -fm.loss(p, ex)), in_dims=(None, 0))(traj.params, test)
    ref = metagradient(step, traj, train_data, order, cot)
    out = metagradient(step, traj, train_data, order, cot, vjp_step=fast, chunk_size=3)
    assert float(ref.weights.abs().max()) > 1e-3
    torch.testing.assert_close(out.weights, ref.weights, rtol=0,
                               atol=1e-10 * float(ref.weights.abs().max()))
    for k, v in ref.params.items():
        torch.testing.assert_close(out.params[k], v, rtol=0, atol=1e-10 * float(v.abs().max()))


def test_with_mask_relus_swaps_only_plain_relus():
    """Plain nested ReLUs are swapped in a copy (the input keeps nn.ReLU); an in-place or hooked
    ReLU is kept; a bare ReLU becomes a MaskReLU; a non-module is refused by name."""
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda m, i, o: None)
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 3)),
                          nn.ReLU(inplace=True), hooked)
    out = with_mask_relus(model)
    assert isinstance(out[1][0], MaskReLU) and type(model[1][0]) is nn.ReLU
    assert type(out[2]) is nn.ReLU and out[2].inplace and type(out[3]) is nn.ReLU
    assert count_relus(model) == 1
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out(x), model(x))
    assert isinstance(with_mask_relus(nn.ReLU()), MaskReLU)
    with pytest.raises(TypeError, match=r"with_mask_relus\(module=...\): expected an nn.Module, "
                                        r"got function\."):
        with_mask_relus(lambda x: x)


class FunctionalReLUNet(nn.Module):
    """ReLUs as function calls (torch.relu, F.relu, Tensor.relu), as the bundled TinyLM's MLP."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.c(F.relu(self.b(torch.relu(self.a(x)))).relu())


def test_mask_relu_step_replaces_function_relus_and_keeps_the_reverse_pass():
    """mask_relu_step(step): every out-of-place relu call in the forward is x * 1[x>0] (a Mul node,
    no threshold node), in-place ones are left; metagradient through it = through the step at
    1e-10 (SGD + momentum, float64)."""
    from dattri_fn.training.mask_relu import mask_relu_step

    probe = mask_relu_step(lambda f, x: f(x))
    x = torch.randn(6, dtype=DT)
    for f in (torch.relu, F.relu, lambda y: y.relu(), nn.ReLU()):
        assert type(probe(f, x.requires_grad_()).grad_fn).__name__ == "MulBackward0"
        assert torch.equal(probe(f, x.detach()), torch.relu(x.detach()))
    assert "Mul" not in type(probe(lambda y: F.relu(y * 1, inplace=True), x).grad_fn).__name__
    assert "Mul" not in type(probe(lambda y: (y * 1).relu_(), x).grad_fn).__name__
    torch.manual_seed(0)
    fm = functional_model(FunctionalReLUNet().to(DT), F.cross_entropy)
    opt = sgd(0.3, momentum=0.9)
    step = make_step(fm, opt)
    g = torch.Generator().manual_seed(5)
    train_data = (torch.randn(12, 3, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g))
    test = (torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g))
    order = batch_order(12, batch_size=4, epochs=3, seed=1)
    traj = train(step, fm.params, opt.init(fm.params), train_data, order, checkpoint_every=2)
    cot = vmap(grad(lambda p, ex: -fm.loss(p, ex)), in_dims=(None, 0))(traj.params, test)
    ref = metagradient(step, traj, train_data, order, cot)
    out = metagradient(step, traj, train_data, order, cot, vjp_step=mask_relu_step(step))
    assert float(ref.weights.abs().max()) > 1e-3
    torch.testing.assert_close(out.weights, ref.weights, rtol=0,
                               atol=1e-10 * float(ref.weights.abs().max()))
    for k, v in ref.params.items():
        torch.testing.assert_close(out.params[k], v, rtol=0, atol=1e-10 * float(v.abs().max()))
    with pytest.raises(TypeError, match=r"mask_relu_step\(step=...\): expected a callable step, "
                                        r"got int\."):
        mask_relu_step(3)
