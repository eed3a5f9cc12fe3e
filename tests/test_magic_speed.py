"""MAGIC's cost settings change no score: every state kept by default when small, any chunk size."""

import importlib

import pytest
import torch
from test_magic_auto import problem

from dattri_fn.attribute.magic import default_every, magic, metagradient

# The package re-exports the function magic under the module's name: fetch the module itself.
magic_module = importlib.import_module("dattri_fn.attribute.magic")


def test_default_keeps_every_state_when_small_and_scores_equal_the_replayed_run(monkeypatch):
    """checkpoint_every=None keeps all T+1 states when (T+1) S <= KEEP_LIMIT, else ceil(sqrt(T));
    both give torch.equal scores for "band" and None (a replay reproduces the run bit for bit)."""
    loss, opt, step, data, test, order, traj, cot = problem(
        4, hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    p0, T = traj.checkpoints[0][0], len(order)
    S = 2 * sum(v.numel() for v in p0.values())  # params + momentum
    assert default_every(T, (p0, opt.init(p0))) == 1
    out, small = {}, (T + 1) * S - 1
    for limit in (2**22, small):
        monkeypatch.setattr(magic_module, "KEEP_LIMIT", limit)
        for horizon in ("band", None):
            method = magic(loss, opt, epochs=3, batch_size=4, seed=4, horizon=horizon)
            state = method.prepare(p0, data)
            out[limit, horizon] = (len(state.runs[0].checkpoints),
                                   method.score(p0, state, data, test))
    assert out[2**22, "band"][0] == T + 1
    assert out[small, "band"][0] == -(-T // 3) + 1  # ceil(sqrt(9)) = 3
    for horizon in ("band", None):
        assert torch.equal(out[2**22, horizon][1], out[small, horizon][1])


@pytest.mark.parametrize("horizon", [None, "auto", "band"])
def test_chunk_size_changes_nothing_beyond_rounding(horizon):
    """metagradient with chunk_size 1, 3 and None (all 4 targets in one vmap): the same weights
    to 1e-12 relative (a chunk changes GEMM shapes, hence the BLAS summation order: equal bits
    would depend on the BLAS build and thread count)."""
    loss, opt, step, data, test, order, traj, cot = problem(
        4, hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    outs = [metagradient(step, traj, data, order, cot, horizon=horizon, chunk_size=c).weights
            for c in (None, 1, 3)]
    assert outs[0].abs().max() > 1e-3
    assert all(torch.allclose(outs[0], o, rtol=1e-12, atol=1e-12 * float(outs[0].abs().max()))
               for o in outs[1:])


def test_vjp_step_equal_in_exact_arithmetic_gives_the_same_scores():
    """A step computing the loss twice (mean + weighted correction, decay added by hand as
    text-lm's task_step does) differentiated through make_step's one-path form with Adam's
    coupled decay: magic scores equal the default's at 1e-10 (float64), horizon None and band."""
    from torch.func import grad, vmap

    from dattri_fn.training import adam, make_step

    loss, _, _, data, test, _, traj, _ = problem(4, hidden=5, lr=0.6, momentum=0.5,
                                                 weight_decay=0.0)
    p0, wd = traj.checkpoints[0][0], 0.1
    plain = adam(0.05)

    def two_path(params, opt_state, batch, w):
        def objective(p):
            losses = vmap(loss, in_dims=(None, 0))(p, batch)
            return losses.mean() + ((w - 1) * losses).sum() / losses.shape[0]

        g = grad(objective)(params)
        g = {k: (g[k] + p * (wd / 2)) + p * (wd / 2) for k, p in params.items()}
        return plain.update(g, opt_state, params)

    one_path = make_step(loss, adam(0.05, weight_decay=wd))
    for horizon in (None, "band"):
        scores = []
        for vjp_step in (None, one_path):
            method = magic(loss, plain, epochs=3, batch_size=4, seed=4, step=two_path,
                           vjp_step=vjp_step, horizon=horizon)
            scores.append(method.score(p0, method.prepare(p0, data), data, test))
        assert scores[0].abs().max() > 1e-3
        torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=1e-10)


def test_vjp_step_must_be_callable():
    """magic(vjp_step=3) is refused naming the argument."""
    with pytest.raises(TypeError, match=r"magic\(vjp_step=...\): expected"):
        magic(lambda p, ex: (p["W"] * ex).sum(), None, epochs=1, step=lambda *a: a, vjp_step=3)


@pytest.mark.parametrize("every", [1, 3, 4])
def test_reverse_pass_replays_only_the_states_it_differentiates(every):
    """A segment [lo, hi) replays hi - lo - 1 steps (its last output is checkpoint hi): T - #segments
    calls of step in all, none when every state is kept; weights torch.equal to the every-1 run's."""
    from dattri_fn.training import train

    loss, opt, step, data, test, order, traj, cot = problem(
        4, hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    T, calls = len(order), []

    def counted(*args):
        calls.append(1)
        return step(*args)

    p0 = traj.checkpoints[0][0]
    run = train(step, p0, opt.init(p0), data, order, checkpoint_every=every)
    ref = metagradient(step, traj, data, order, cot, vjp_step=step).weights
    out = metagradient(counted, run, data, order, cot, vjp_step=step).weights
    assert len(calls) == T - (len(run.checkpoints) - 1)
    assert (len(calls) == 0) == (every == 1)
    assert torch.equal(out, ref) and ref.abs().max() > 1e-3
