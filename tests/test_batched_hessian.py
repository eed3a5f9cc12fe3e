"""The Hessian from one batched forward (issue 14): hvp(batched=...), influence's LiSSA/CG on an
eval-mode FunctionalModel, and LoGra's first-batch capture check without a separate forward."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.influence import _independent, influence
from dattri_fn.attribute.logra import logra
from dattri_fn.model import batched_loss, functional_model
from dattri_fn.operators.curvature import hvp

D = torch.float64


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D).eval()


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


class _Centred(nn.Module):
    """Subtracts the batch mean: its examples interact (a batch of one is not the same)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x - x.mean(0, keepdim=True) + 0.3)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_batched_hvp_equals_per_example_hvp(seed, mode):
    """hvp(batched=batched_loss(fm)) V == hvp(fm.loss) V (same H = (1/N) sum_i hess l_i), 1e-12 rel."""
    fm = functional_model(_mlp(seed), F.cross_entropy)
    data = [_data(6, seed), _data(4, seed + 1)]
    V = torch.randn(3, sum(v.numel() for v in fm.params.values()), dtype=D,
                    generator=torch.Generator().manual_seed(seed))
    ref = hvp(fm.loss, fm.params, data, mode=mode)(V)
    got = hvp(fm.loss, fm.params, data, mode=mode, batched=batched_loss(fm))(V)
    assert _rel(got, ref) < 1e-12


def test_batched_hvp_refuses_bad_settings():
    """batched must be a callable returning [B], and not combined with a sampling loss."""
    fm = functional_model(_mlp(0), F.cross_entropy)
    data = _data(4, 0)
    V = torch.ones(1, sum(v.numel() for v in fm.params.values()), dtype=D)
    with pytest.raises(TypeError, match=r"hvp\(batched=...\): expected None or a callable"):
        hvp(fm.loss, fm.params, data, batched=3)
    with pytest.raises(ValueError, match=r"hvp\(batched=...\): expected None for a loss that"):
        hvp(fm.loss, fm.params, data, batched=batched_loss(fm), randomness="same")
    op = hvp(fm.loss, fm.params, data, batched=lambda p, b: batched_loss(fm)(p, b).sum())
    with pytest.raises(ValueError, match=r"hvp\(batched=...\): expected one loss per example, "
                                         r"shape \[4\], got shape \[\]"):
        op(V)


@pytest.mark.parametrize("l2", [0.0, 0.05])
@pytest.mark.parametrize("solver,opts", [("lissa", dict(scale=20.0, depth=60, batch_size=4)),
                                         ("cg", dict(max_iter=50, rtol=1e-10))])
def test_influence_batched_hessian_equals_per_example_path(l2, solver, opts):
    """influence(fm) (batched Hessian) == influence(fm.loss) (vmap over examples): same
    g_i^T (H + 2 l2 I + damping I)^-1 g_j, to 1e-12 relative in float64."""
    fm = functional_model(_mlp(3), F.cross_entropy)
    train, test = _data(10, 3), _data(4, 4)
    kw = dict(solver=solver, damping=1.0, curvature="hessian", l2=l2, **opts)
    fast, ref = influence(fm, **kw), influence(fm.loss, **kw)
    S = fast.score(fm.params, fast.prepare(fm.params, train), train, test)
    R = ref.score(fm.params, ref.prepare(fm.params, train), train, test)
    assert _rel(S, R) < 1e-12


def test_examples_that_interact_keep_the_per_example_path():
    """A forward mixing the batch (x - mean(x)) fails the first-batch loss check: LiSSA's scores
    are bit for bit the per-example path's (vmap over examples), not the batched Hessian's."""
    torch.manual_seed(0)
    fm = functional_model(_Centred().to(D).eval(), F.cross_entropy)
    train, test = _data(8, 5), _data(3, 6)
    kw = dict(solver="lissa", damping=0.1, curvature="hessian", scale=20.0, depth=40,
              batch_size=4)
    fast, ref = influence(fm, **kw), influence(fm.loss, **kw)
    with pytest.warns(RuntimeWarning, match="layer_grads: computing the per-example gradients"):
        S = fast.score(fm.params, fast.prepare(fm.params, train), train, test)
    R = ref.score(fm.params, ref.prepare(fm.params, train), train, test)
    assert torch.equal(S, R)
    V = torch.randn(1, 18, dtype=D, generator=torch.Generator().manual_seed(0))
    mixed = hvp(fm.loss, fm.params, train, batched=batched_loss(fm))(V)
    assert _rel(mixed, hvp(fm.loss, fm.params, train)(V)) > 1e-3  # what the check avoided


def test_train_mode_batchnorm_or_dropout_is_not_independent():
    """Batch statistics (BatchNorm) or one dropout draw per batch mix examples in train mode only."""
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    drop = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    for module in (bn, drop):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert not _independent(functional_model(module.train(), F.cross_entropy))
        assert _independent(functional_model(module.eval(), F.cross_entropy))
    assert _independent(functional_model(_mlp(0).train(), F.cross_entropy))


class _Spare(nn.Module):
    """``spare`` is a Linear layer never called: the capture engine cannot factor it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.spare = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x)


def test_logra_drops_an_uncapturable_layer_from_the_first_forward():
    """A layer the first batch's capture refuses is left out after one warning: the scores are
    LoGra's on the other layers, sum_l <DW'_il, (F'_l + damping)^-1 DW'_jl>."""
    torch.manual_seed(0)
    module = _Spare().to(D).eval()
    train, test = _data(12, 7), _data(4, 8)
    fm = functional_model(module, F.cross_entropy)
    method = logra(fm, proj_dim=2)
    with pytest.warns(RuntimeWarning, match=r"logra.prepare: leaving out layers the capture "
                                            r"engine cannot factor: spare: not called"):
        state = method.prepare(fm.params, train)
    assert list(state.eigvecs) == ["lin"]
    only = functional_model(module, F.cross_entropy, params="lin")
    ref = logra(only, proj_dim=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref_state = ref.prepare(only.params, train)
    S = method.score(fm.params, state, train, test)
    assert torch.equal(S, ref.score(only.params, ref_state, train, test))


def test_logra_prepare_runs_one_forward_per_batch():
    """The capture check is the first batch's own forward: a second prepare on one batch runs
    the module once (the batched forward/backward), not once more to check the layers."""
    module = _mlp(0)
    calls = []
    module.register_forward_pre_hook(lambda m, a: calls.append(1))
    fm = functional_model(module, F.cross_entropy)
    train = _data(10, 9)
    method = logra(fm, proj_dim=2)
    method.prepare(fm.params, train)  # the first may also take the output shapes
    calls.clear()
    method.prepare(fm.params, train)
    assert len(calls) == 1


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_plain_autograd_hvp_handles_unused_and_linear_params(chunk_size):
    """rev-rev by plain autograd == fwd-rev: H V with H = 0 for a loss linear in w, and zero
    rows/columns for a parameter the loss never reads (u)."""
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(3, dtype=D, generator=g), "u": torch.randn(2, dtype=D, generator=g)}
    x = torch.randn(5, 3, dtype=D, generator=g)
    V = torch.randn(7, 5, dtype=D, generator=g)
    lin = lambda q, z: (q["w"] * z).sum()  # noqa: E731
    quad = lambda q, z: torch.tanh((q["w"] * z).sum()) ** 2  # noqa: E731
    assert torch.equal(hvp(lin, p, x, chunk_size=chunk_size)(V), torch.zeros_like(V))
    got = hvp(quad, p, x, chunk_size=chunk_size)(V)
    ref = hvp(quad, p, x, mode="fwd-rev")(V)
    assert _rel(got, ref) < 1e-12 and torch.equal(got[:, 3:], torch.zeros(7, 2, dtype=D))
