"""benchmarks/magic_fwd.py compares like with like: its forward-over-reverse pullback equals the
recipes' vjp of the step (float64, SGD with momentum, Adam with L2, AdamW)."""

import pytest
import torch
from torch import nn

from benchmarks.magic_fwd import reverse_fwd, reverse_vjp, transpose_step
from dattri_fn.model import functional_model
from dattri_fn.training import adam, adamw, batch_order, make_step, sgd, take, train

DT = torch.float64


@pytest.mark.parametrize("opt", [sgd(0.3, momentum=0.9, weight_decay=1e-2),
                                 adam(0.05, weight_decay=1e-2),
                                 adamw(0.05, weight_decay=0.1)], ids=["sgd", "adam", "adamw"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_forward_over_reverse_pullback_equals_vjp(opt, chunk):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    fm = functional_model(model, nn.functional.cross_entropy)
    x, y = torch.randn(12, 3, generator=g, dtype=DT), torch.randint(0, 2, (12,), generator=g)
    order = batch_order(12, batch_size=5, epochs=1, seed=0)
    step = make_step(fm, opt)
    # Unequal weights: the pullback's w-dependence (H of the weighted loss) is exercised.
    weights = 0.5 + torch.rand(12, generator=g, dtype=DT)
    traj = train(step, fm.params, opt.init(fm.params), (x, y), order, weights=weights,
                 checkpoint_every=1)
    state = traj.checkpoints[2]  # count 2: moments and momentum nonzero
    floats = [*state[0].values(), *[v for part in state[1][1:] for v in part.values()]]
    bar = [torch.randn(3, *f.shape, generator=g, dtype=DT) for f in floats]
    s = dict(state=state, batch=take((x, y), order[2]), w=weights[order[2]], bar=bar,
             vjp_step=step, transpose=transpose_step(fm, opt), chunk=chunk, fwd_chunk=chunk)
    (sa, wa), (sb, wb) = reverse_vjp(s), reverse_fwd(s)
    assert wa.shape == wb.shape == (3, len(order[2]))
    torch.testing.assert_close(wb, wa, rtol=1e-10, atol=1e-12)
    assert len(sa) == len(sb) == len(floats)
    for a, b in zip(sa, sb, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
