"""TRAK refuses a non-finite per-example gradient at the projection, on every path (review fix:
the densified row blocks are projected with no scan of their own, so the [b, d] rows are checked)."""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.trak import trak
from dattri_fn.model import functional_model


class _Log(nn.Module):
    def forward(self, x):
        return x.abs().log()  # -inf where x == 0: that example's gradient is NaN/inf


def _problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(_Log(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return functional_model(net, F.cross_entropy), x, y


@pytest.mark.parametrize("cache", [True, False])
def test_bad_train_example_is_refused_in_prepare(cache):
    """A train example with x_0 = 0 has a non-finite gradient: prepare names its train."""
    fm, x, y = _problem()
    x[2, 0] = 0.0
    with pytest.raises(ValueError, match=r"^trak\.prepare\(train=\.\.\.\): expected examples whose per-ex"):
        trak(fm, damping=0.1, proj_dim=2, cache_features=cache).prepare(fm.params, (x, y))


@pytest.mark.parametrize("cache", [True, False])
def test_bad_example_is_refused_in_score_and_self_score(cache):
    """Test rows / self-score rows with a non-finite gradient raise instead of NaN scores."""
    fm, x, y = _problem()
    m = trak(fm, damping=0.1, proj_dim=2, cache_features=cache)
    st = m.prepare(fm.params, (x, y))
    bad = x[:3].clone()
    bad[1, 0] = 0.0
    with pytest.raises(ValueError, match="finite"):
        m.score(fm.params, st, (x, y), (bad, y[:3]))
    if not cache:  # a cached state self-scores its own training set only
        with pytest.raises(ValueError, match="finite"):
            m.self_score(fm.params, st, (bad, y[:3]))
        assert torch.isfinite(m.self_score(fm.params, st, (x[:3], y[:3]))).all()


def _first_bad_key(fm, x, y) -> str:
    """The first params key whose autograd gradient of the output at (x, y) has NaN or inf."""
    g = torch.func.grad(fm.loss)(fm.params, (x, y))
    return next(k for k, v in g.items() if not bool(torch.isfinite(v).all()))


_PATHS = {  # name -> trak settings: each feature path that meets the captured gradients
    "plan-projected": dict(proj_dim=2),
    "plan-kronecker": dict(proj_dim=1, projection="kronecker"),
    "plan-factored": dict(proj_dim=None),
    "vmap-projected": dict(proj_dim=2, plain=True),
    "vmap-raw": dict(proj_dim=None, plain=True),
}


def _named(fm, path: str, cache: bool):
    kw = dict(_PATHS[path])
    out = fm.loss if kw.pop("plain", False) else fm
    return trak(out, damping=0.1, cache_features=cache, **kw)


@pytest.mark.parametrize("path", sorted(_PATHS))
def test_non_finite_gradient_names_the_call_the_data_and_the_parameter(path):
    """Review R3 F5: a non-finite per-example gradient raises trak.<call>(<train|test>=...)
    naming the first params key whose gradient (autograd's, at that example) is NaN or inf,
    not Projector(features=...)."""
    fm, x, y = _problem()
    bad = x.clone()
    bad[2, 0] = 0.0
    key = _first_bad_key(fm, bad[2], y[2])
    want = (r"expected examples whose per-example gradients are finite, got NaN or inf in the "
            rf"per-example gradient of '{key}'")
    # the plan's check refuses the non-finite rows of its first examples (nothing made dense,
    # no warning: review R4 F4, 7ba14c5), and TRAK names its call, the data and the parameter
    with _no_dense_warning(), \
            pytest.raises(ValueError, match=r"^trak\.prepare\(train=\.\.\.\): " + want):
        _named(fm, path, True).prepare(fm.params, (bad, y))
    m = _named(fm, path, True)
    st = m.prepare(fm.params, (x, y))
    with pytest.raises(ValueError, match=r"^trak\.score\(test=\.\.\.\): " + want):
        m.score(fm.params, st, None, (bad[1:4], y[1:4]))


@pytest.mark.parametrize("path", ["plan-projected", "vmap-projected", "vmap-raw"])
def test_non_finite_train_rows_streamed_in_score_name_train(path):
    """Without a cache, score and self_score stream train: a non-finite row there names
    trak.score(train=...) / trak.self_score(train=...), while good test rows pass."""
    fm, x, y = _problem()
    m = _named(fm, path, False)
    st = m.prepare(fm.params, (x, y))
    bad = x.clone()
    bad[2, 0] = 0.0
    with pytest.raises(ValueError, match=r"^trak\.score\(train=\.\.\.\): expected examples whose"):
        m.score(fm.params, st, (bad, y), (x[:2], y[:2]))
    with pytest.raises(ValueError, match=r"^trak\.self_score\(train=\.\.\.\): expected examples"):
        m.self_score(fm.params, st, (bad, y))


@contextlib.contextmanager
def _no_dense_warning():
    """A block where a RuntimeWarning (the plan made dense) is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


class _no_warning:  # a context that expects nothing (pytest.warns(None) is gone)
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_plan_checks_refusal_is_its_own_value_error_class():
    """Review R4 F5: the plan check refuses examples whose own autodiff gradients are not
    finite with ``layer_grads.NonFiniteExamples``, a ValueError (its message as before), and
    TRAK recognises it by that class (not by its text): the cause is TRAK's, chained."""
    from dattri_fn.attribute.trak_errors import NonFiniteGradient
    from dattri_fn.transforms.layer_grads import NonFiniteExamples, check_plan, layer_plan

    fm, x, y = _problem()
    x[1, 0] = 0.0  # one of the 3 examples the check compares
    assert issubclass(NonFiniteExamples, ValueError)
    with pytest.raises(NonFiniteExamples, match=r"^layer_grads\(batch=\.\.\.\): expected examples "
                       r"whose per-example gradients are finite, got NaN or inf in autodiff's "
                       r"gradient of its first 3 examples\. Their loss overflows"):
        check_plan(layer_plan(fm), fm.params, (x, y))
    with pytest.raises(ValueError, match=r"^trak\.prepare\(train=\.\.\.\): expected examples "
                       r"whose per-example gradients are finite, got NaN or inf in the "
                       r"per-example gradient of '1\.weight'") as info:
        trak(fm, damping=0.1, proj_dim=2).prepare(fm.params, (x, y))
    # named(...)'s error <- TRAK's NonFiniteGradient (the parameter) <- the check's refusal
    assert isinstance(info.value.__cause__, NonFiniteGradient)
    assert isinstance(info.value.__cause__.__cause__, NonFiniteExamples)
