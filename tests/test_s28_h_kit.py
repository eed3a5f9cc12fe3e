"""check_method reports a skipped exact-LOO property (review RU4 M2): in its result and as one
warning naming the reason and the problems it runs on."""

import warnings

import pytest

from dattri_fn.attribute import influence
from dattri_fn.testing import check_method, logistic_regression, ridge_regression


def test_unfitted_problem_warns_and_reports_the_loo_skip():
    p = logistic_regression(n=12, seed=1)  # fit=False, l2=0: what a user writes first
    m = influence(p.loss, solver="explicit", damping=1e-3)
    with pytest.warns(UserWarning, match=r"check_method\(.*\): skipped the exact leave-one-out "
                      r"property.*not fitted.*logistic_regression\(fit=True, l2>0\)") as rec:
        out = check_method(m, p)
    assert sum("leave-one-out" in str(w.message) for w in rec) == 1
    assert "loo" not in out.checked and "not fitted" in out.skipped["loo"]


def test_fitted_problem_runs_loo_silently_and_an_explicit_skip_does_not_warn():
    p = ridge_regression(n=12, seed=1)
    m = influence(p.loss, solver="explicit", damping=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = check_method(m, p)
        assert "loo" in out.checked and "loo" not in out.skipped
        q = logistic_regression(n=12, seed=1)
        out = check_method(influence(q.loss, solver="explicit", damping=1e-3), q,
                           min_loo_corr=None)
    assert out.skipped["loo"] == "min_loo_corr=None"
