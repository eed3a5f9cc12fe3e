"""MAGIC on an overflowing test/train example (issue 20, engineer H, stop 25)."""

import pytest
import torch
from torch.func import grad, vmap

from dattri_fn.attribute.magic import magic, metagradient
from dattri_fn.training import batch_order, make_step, sgd


def setup(dtype, horizon, square=False, linear=False):
    g = torch.Generator().manual_seed(0)
    n, d = 8, 3
    train = (torch.randn(n, d, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype))
    test = (torch.randn(3, d, generator=g).to(dtype), torch.randn(3, generator=g).to(dtype))
    p0 = {"w": (0.1 * torch.randn(d, generator=g)).to(dtype), "b": torch.zeros((), dtype=dtype)}

    def loss(p, ex):
        x, y = ex
        z = x @ p["w"] + p["b"]
        return ((z if linear else torch.tanh(z)) - y) ** 2

    def target(p, ex):  # linear in x: a huge x gives a huge target gradient, finite target
        x, _ = ex
        return torch.tanh(p["w"] + p["b"]) @ (x * x if square else x)

    m = magic(loss, sgd(0.1, momentum=0.9), epochs=2, batch_size=4, target=target,
              horizon=horizon)
    return m, p0, train, test, loss, target


def huge_test(test, scale=2.0 ** 66):
    x, y = test
    x = x.clone()
    x[1] = x[1] * scale  # ~1e20: its gradient squared overflows float32
    return x, y


@pytest.mark.parametrize("horizon", [None, "auto", "band"])
def test_huge_test_example_matches_float64(horizon):
    scores = {}
    for dtype in (torch.float32, torch.float64):
        m, p0, train, test, _, _ = setup(dtype, horizon)
        test = huge_test(test)
        state = m.prepare(p0, train)
        scores[dtype] = m.score(p0, state, train, test)
    s32, s64 = scores[torch.float32].double(), scores[torch.float64]
    assert torch.isfinite(s32).all()
    # float32 rounding over a few steps; the unscaled path was ~3.8x off (or non-finite)
    rel = (s32 - s64).abs().amax(0) / s64.abs().amax(0)
    assert float(rel.max()) < 1e-4, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_column_alone_and_others_identical(dtype):
    m, p0, train, test, _, _ = setup(dtype, "auto")
    state = m.prepare(p0, train)
    big = huge_test(test)
    s = m.score(p0, state, train, big)
    normal = (big[0][[0, 2]], big[1][[0, 2]])
    assert torch.equal(s[:, [0, 2]], m.score(p0, state, train, normal))
    if dtype == torch.float64:  # nothing overflows in float64: the scaled column is exact up
        # to rounding vs a 2**-66 smaller input
        s_small = m.score(p0, state, train, (big[0][[1]] * 2.0 ** -66, big[1][[1]]))
        assert torch.allclose(s[:, 1] * 2.0 ** -66, s_small[:, 0], rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("horizon", [None, "auto"])
def test_normal_input_same_bits_as_unscaled(dtype, horizon):
    m, p0, train, test, loss, target = setup(dtype, horizon)
    state = m.prepare(p0, train)
    traj, order = state.runs[0], state.orders[0]
    cot = vmap(grad(target), in_dims=(None, 0))(traj.params, test)
    step = make_step(loss, sgd(0.1, momentum=0.9))
    want = metagradient(step, traj, train, order, cot, horizon=horizon).weights.T
    assert torch.equal(m.score(p0, state, train, test), want)
    assert order[0].shape == batch_order(8, batch_size=4, epochs=2, seed=0)[0].shape


def test_nonfinite_test_gradient_names_test_example():
    m, p0, train, test, _, _ = setup(torch.float32, "auto", square=True)
    state = m.prepare(p0, train)
    x, y = test
    x = x.clone()
    x[2, 0] = 1e20  # finite data, its target gradient (~x^2) is inf in float32
    with pytest.raises(ValueError, match=r"magic\.score\(test=\.\.\.\).*example 2"):
        m.score(p0, state, train, (x, y))


def test_diverged_training_names_train():
    m, p0, train, test, _, _ = setup(torch.float32, "auto", linear=True)
    x, y = train
    x = x.clone()
    x[3] = x[3] * 1e20
    state = m.prepare(p0, (x, y))
    with pytest.raises(ValueError, match=r"magic\.score\(train=\.\.\.\).*diverged") as e:
        m.score(p0, state, (x, y), test)
    # every state kept: the step named is exact (checked here: the one before it is finite)
    t = int(str(e.value).split("after step ")[1].split(",")[0])
    assert 3 in state.orders[0][t].tolist()
    assert all(torch.isfinite(v).all() for v in state.runs[0].checkpoints[t][0].values())
    assert not all(torch.isfinite(v).all() for v in state.runs[0].checkpoints[t + 1][0].values())


def mlp_case(dtype):
    """F2's survey case: a 4-8-3 relu MLP, test example 1's input times 1e20 and relabelled to
    its least likely class (a finite target gradient ~1e20, squared norm ~1e40)."""
    g = torch.Generator().manual_seed(0)
    p0 = {"w1": 0.5 * torch.randn(8, 4, generator=g), "b1": 0.1 * torch.randn(8, generator=g),
          "w2": 0.5 * torch.randn(3, 8, generator=g), "b2": 0.1 * torch.randn(3, generator=g)}
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    xt, yt = torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)

    def logits(p, x):
        return torch.relu(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    xt[1] *= 1e20
    yt[1] = logits(p0, xt[1]).argmin()

    def loss(p, ex):
        return torch.nn.functional.cross_entropy(logits(p, ex[0])[None], ex[1][None])

    p0 = {k: v.to(dtype) for k, v in p0.items()}
    return loss, p0, (x.to(dtype), y), (xt.to(dtype), yt)


@pytest.mark.parametrize("horizon", ["auto", "band"])
def test_huge_mlp_test_example_matches_float64(horizon):
    scores = {}
    for dtype in (torch.float32, torch.float64):
        loss, p0, train, test = mlp_case(dtype)
        m = magic(loss, sgd(0.1), epochs=2, batch_size=4, horizon=horizon)
        scores[dtype] = m.score(p0, m.prepare(p0, train), train, test)
    s32, s64 = scores[torch.float32].double(), scores[torch.float64]
    assert torch.isfinite(s32).all()
    rel = (s32 - s64).abs().amax(0) / s64.abs().amax(0)  # per column: the huge one is ~1e18
    assert float(rel.max()) < 1e-4, rel  # unscaled: 3.8x off in column 1


@pytest.mark.parametrize("horizon", ["auto", "band"])
def test_metagradient_direct_huge_cotangent_matches_float64(horizon):
    """The public metagradient (no magic scaling in front): its horizon norms must not overflow."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        loss, p0, train, test = mlp_case(dtype)
        m = magic(loss, sgd(0.1), epochs=2, batch_size=4, horizon=horizon)
        state = m.prepare(p0, train)
        traj, order = state.runs[0], state.orders[0]
        cot = vmap(grad(lambda p, ex: -loss(p, ex)), in_dims=(None, 0))(traj.params, test)
        step = make_step(loss, sgd(0.1))
        out[dtype] = metagradient(step, traj, train, order, cot, horizon=horizon).weights
    w32, w64 = out[torch.float32].double(), out[torch.float64]
    assert torch.isfinite(w32).all()
    rel = (w32 - w64).abs().amax(1) / w64.abs().amax(1)
    assert float(rel.max()) < 1e-4, rel


def test_row_norms_overflow_safe_and_same_bits():
    from dattri_fn.attribute.metagradient import _row_norms
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 2, 2, generator=g)
    plain = torch.sqrt((a ** 2).sum(1) + (b.reshape(3, -1) ** 2).sum(1))
    assert torch.equal(_row_norms([a, b], 3), plain)
    a2 = a.clone()
    a2[1] *= 2.0 ** 70
    got = _row_norms([a2, b], 3)
    want = _row_norms([a2.double(), b.double()], 3)
    assert torch.equal(got[[0, 2]], plain[[0, 2]])
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
