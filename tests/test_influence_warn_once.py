"""influence(K-FAC/EK-FAC) on a list of checkpoints warns once per prepare call (review R1 F7): a
later checkpoint's warning that reads as an earlier one's but for its numbers (the same layer
moved to the diagonal block for the same reason, another gradient scale) is not repeated."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_kfac_seqfirst import _batches, _problem

from dattri_fn.attribute.influence import influence
from dattri_fn.attribute.influence_inverse import once_per_call
from dattri_fn.model import functional_model


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_two_checkpoints_one_warning(solver):
    """prepare([p, p2]) on the sequence-first model (S = B): ONE warning naming 'enc' (it was
    one per checkpoint), and the ensemble's scores == the mean of the per-checkpoint scores
    at 1e-12 relative."""
    model, x, y = _problem(0, n=8)
    fm = functional_model(model, F.cross_entropy)
    p = fm.params
    p2 = {k: v + 0.05 for k, v in p.items()}
    train, test = _batches(x, y), _batches(x[:4], y[:4])
    m = influence(fm, solver=solver, damping=0.1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        state = m.prepare([p, p2], train)
    assert len(w) == 1 and "'enc'" in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        S = m.score([p, p2], state, train, test)
        mean = (m.score(p, m.prepare(p, train), train, test)
                + m.score(p2, m.prepare(p2, train), train, test)) / 2
    torch.testing.assert_close(S, mean, rtol=0, atol=1e-12 * float(mean.abs().max()))


def test_different_warnings_are_all_issued():
    """Warnings that differ in more than their numbers are each issued once, in order."""
    def build(c):
        warnings.warn(f"same reason, scale {c}.5e-3", UserWarning, stacklevel=1)
        warnings.warn(f"checkpoint {'ab'[c]} only", UserWarning, stacklevel=1)
        return c

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert once_per_call(build, [0, 1]) == (0, 1)
    assert [str(x.message) for x in w] == ["same reason, scale 0.5e-3", "checkpoint a only",
                                           "checkpoint b only"]
