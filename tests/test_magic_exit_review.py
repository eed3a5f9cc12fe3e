"""Review R1's findings on MAGIC's early exit (stop 23): any pair (R, W) of real / integer numbers is
accepted and a bad one named by its caller; the exit is the same for every checkpoint spacing and
chunk size, with chunks that do not divide the targets still walked."""

import numpy as np
import pytest
import torch
from test_magic_auto import problem
from test_magic_band import RUNS

from dattri_fn.attribute.magic import metagradient
from dattri_fn.training import train


@pytest.mark.parametrize("pair", [[1.2, 1], (1.2, np.int64(1)), (1.2, torch.tensor(1)),
                                  (np.float64(1.2), 1), (torch.tensor(1.2), 1)])
def test_early_exit_takes_any_pair_of_numbers(pair):
    """A list or numpy/torch scalars (a JSON config, a swept grid) mean the same rule as the
    tuple (1.2, 1): the same walked steps and band, bit for bit."""
    loss, opt, step, data, test, order, traj, cot = problem(**RUNS["sgd-momentum"])
    ref = metagradient(step, traj, data, order, cot, horizon="band", early_exit=(1.2, 1))
    out = metagradient(step, traj, data, order, cot, horizon="band", early_exit=pair)
    assert int(ref.walked.min()) < len(order)
    assert torch.equal(out.walked, ref.walked) and torch.equal(out.weights, ref.weights)


@pytest.mark.parametrize(("pair", "shown"), [((1.2, 8.0), r"\(1.2, 8.0\)"), ((1.2, True), r"\(1.2, True\)"),
                                             ((1.2, 8, 1), r"\(1.2, 8, 1\)"), ("1.2, 8", r"'1.2, 8'")])
def test_early_exit_refuses_what_is_no_pair_of_numbers(pair, shown):
    """A float or bool step count, three values or a string are refused, the message saying a pair."""
    loss, opt, step, data, test, order, traj, cot = problem(**RUNS["sgd-momentum"])
    with pytest.raises(ValueError, match=r"metagradient\(early_exit=...\): expected None or a pair "
                                         r"\(ratio >= 1.1, steps >= 1\), got " + shown):
        metagradient(step, traj, data, order, cot, horizon="band", early_exit=pair)


def test_magic_recipe_names_its_own_early_exit():
    """magic_recipe(early_exit="off") and a bad pair are refused as magic_recipe's argument,
    naming 'default' (the only string it takes)."""
    from dattri_fn.app.recipes import magic_recipe
    from dattri_fn.eval.tasks import SGD_HPARAMS, get_task

    task = get_task("digits-lr", n_train=20, n_test=2, seed=0, hparams=dict(SGD_HPARAMS))
    with pytest.raises(ValueError, match=r"magic_recipe\(early_exit=...\): expected 'default', None "
                                         r"or a pair \(ratio >= 1.1, steps >= 1\), got 'off'"):
        magic_recipe(task, early_exit="off")
    with pytest.raises(ValueError, match=r"magic_recipe\(early_exit=...\): expected None or a pair"):
        magic_recipe(task, early_exit=(1.0, 3))


@pytest.mark.parametrize("every", [1, 3, 7])
@pytest.mark.parametrize("chunk", [None, 2, 3])
@pytest.mark.parametrize("name", ["sgd-momentum", "adamw"])
def test_early_exit_is_the_same_for_every_spacing_and_chunk(name, every, chunk):
    """With targets stopping at different steps (rule (1.1, 1)): walked, horizon, band weights and
    params are those of the every-state, all-at-once pass (1e-10), for replayed segments and chunks
    that do not divide the targets still walked."""
    loss, opt, step, data, test, order, traj, cot = problem(**RUNS[name])
    ref = metagradient(step, traj, data, order, cot, horizon="band", early_exit=(1.1, 1))
    assert len(set(ref.walked.tolist())) > 1 and int(ref.walked.min()) < len(order)
    params0, opt0 = traj.checkpoints[0]
    spaced = train(step, params0, opt0, data, order, checkpoint_every=every)
    out = metagradient(step, spaced, data, order, cot, horizon="band", early_exit=(1.1, 1),
                       chunk_size=chunk)
    assert torch.equal(out.walked, ref.walked) and torch.equal(out.horizon, ref.horizon)
    scale = float(ref.weights.abs().max())
    torch.testing.assert_close(out.weights, ref.weights, rtol=0, atol=1e-10 * scale)
    for key, v in ref.params.items():
        torch.testing.assert_close(out.params[key], v, rtol=0, atol=1e-10 * float(v.abs().max()))
