"""The documented limit of the per-example-row watch (capture_norm; engineer D3's hole, stop 24).

Shared ``[T, T]`` ids (a relative-position bias ``s + rel[rid]``) look batch-first when the
batch has ``B == T`` examples. The watch follows the rows through ops that keep their rank and a
dim 0 of size ``B``, and refuses a broadcast or new leading dims; rows whose rank changes on the
way (``rel[rid].flatten().view(T, T)``) leave the watch, and at ``B == T`` nothing in their shapes
tells them from per-example rows. Then only the plan check's comparison with autodiff sees them:
it does, and the checked plan goes dense as a whole (exact, one warning) instead of only ``rel``.
Checked at ``B != T`` the read itself is refused by name and the rest stays captured. Float64,
rows against vmap(grad) at 1e-10.
"""

import warnings

import pytest
import torch.nn.functional as F
from test_capture_bare_review import Net, _attend, _rid, _rows, _scores, data

from dattri_fn import functional_model
from dattri_fn.transforms.layer_grads import check_plan, layer_plan


def rel_rank_changed(m, idx):
    x, s = _scores(m, idx)
    T = idx.shape[1]
    return _attend(m, x, s + m.rel[_rid(T)].flatten().view(T, T))


def test_rank_changed_shared_rows_at_b_eq_t_are_caught_by_the_comparison():
    fm = functional_model(Net(rel_rank_changed, ("q", "k", "rel")), F.cross_entropy)
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 3))
    assert plan.dense
    assert _rows(fm, plan, data(1, 3, 3)) <= 1e-10


def test_rank_changed_shared_rows_at_b_ne_t_are_refused_by_name():
    fm = functional_model(Net(rel_rank_changed, ("q", "k", "rel")), F.cross_entropy)
    with pytest.warns(RuntimeWarning, match="rel"):
        plan = check_plan(layer_plan(fm), fm.params, data(0, 4, 3))
    assert "rel" in plan.autodiff and "q" in plan.captured and not plan.dense
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _rows(fm, plan, data(1, 3, 3)) <= 1e-10
