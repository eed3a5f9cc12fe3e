"""Fuzz of the public API (issue 15): every corrupted argument of every entry point either works
or raises a TypeError/ValueError that names the call, never a raw torch error or a silent NaN.

Each case is (entry point, argument, corruption): the entry point is run with valid arguments
except that one. Allowed outcomes: a TypeError or ValueError worded by the library,
``"<func>(<arg>=...): expected ..."`` (the call, or the library function that received the bad
value, e.g. ``hvp(data=...)`` inside an influence method), or a result whose every tensor is
finite when the corruption is one the entry point may legitimately accept.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from dattri_fn import (
    functional_model,
    gnvp,
    grad,
    hvp,
    ihvp_arnoldi,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
    make_projector,
    per_sample_grad,
)
from dattri_fn.attribute import (
    grad_cos,
    grad_dot,
    influence,
    knn_shapley,
    logra,
    tracin,
    tracin_cos,
    trak,
)
from dattri_fn.attribute.trak import classification_margin, classification_weight

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT).eval()
    fm = functional_model(net, F.cross_entropy)
    x = torch.randn(6, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    return fm, (x, y)


FM, BATCH = _setup()
X, Y = BATCH
P = sum(v.numel() for v in FM.params.values())


def _params_with(**change):
    return {**FM.params, **change}


DATA_CORRUPTIONS = {
    "none": None,
    "string": "data",
    "nan": (X.clone().fill_(math.nan), Y),
    "narrow": (X[:, :2], Y),
    "float32": (X.float(), Y),
    "float_labels": (X, Y.to(DT) + 0.5),
    "short_labels": (X, Y[:3]),
    "empty": (X[:0], Y[:0]),
    "empty_list": [],
    "out_of_range_labels": (X, Y + 5),
}
PARAM_CORRUPTIONS = {
    "none": None,
    "empty": {},
    "nan": _params_with(**{"0.weight": FM.params["0.weight"].clone().fill_(math.nan)}),
    "missing": {k: v for k, v in FM.params.items() if k != "2.bias"},
    "shape": _params_with(**{"2.bias": torch.zeros(5, dtype=DT)}),
    "int": _params_with(**{"2.bias": torch.zeros(3, dtype=torch.long)}),
    "meta": {k: v.to("meta") for k, v in FM.params.items()},
}
V_CORRUPTIONS = {
    "none": None,
    "nan": torch.full((2, P), math.nan, dtype=DT),
    "wrong_width": torch.ones(2, P + 1, dtype=DT),
    "3d": torch.ones(1, 2, P, dtype=DT),
    "int": torch.ones(2, P, dtype=torch.long),
}
NUMBER_CORRUPTIONS = {"negative": -1.0, "nan": math.nan, "string": "0.1", "inf": math.inf}
INT_CORRUPTIONS = {"zero": 0, "negative": -3, "float": 2.5, "string": "8"}


def _op():
    return hvp(FM.loss, FM.params, BATCH)


def _method_calls():
    """(name, builder(**settings) -> Method): each method's prepare and score are fuzzed."""
    margin, weight = classification_margin(FM.forward), classification_weight(FM.forward)
    return {
        "grad_dot": lambda: grad_dot(FM),
        "grad_cos": lambda: grad_cos(FM),
        "tracin": lambda: tracin(FM, lrs=[0.1]),
        "influence": lambda: influence(FM, solver="cg", damping=0.1, max_iter=5),
        "trak": lambda: trak(margin, weight_fn=weight, proj_dim=4),
        "logra": lambda: logra(FM, proj_dim=2),
        "tracin_cos": lambda: tracin_cos(FM, lrs=[0.1]),
        "knn_shapley": lambda: knn_shapley(k=3),
    }


def _params_of(method: str):
    """The params each method takes: a list of checkpoints for TracIn, none for KNN-Shapley."""
    return {"tracin": [FM.params], "tracin_cos": [FM.params], "knn_shapley": {}}.get(
        method, FM.params)


LIBRARY_ERROR = re.compile(r"^[\w./]+\([\w\[\]]+=\.\.\.\): expected")
# Functions the user built and passed in, which name their own arguments: the model bridge
# (a params tensor the module does not take) and TRAK's output/weight helpers.
USER_BUILT = ("loss/forward", "classification_margin", "classification_weight")


def _names_the_call(func: str, text: str) -> bool:
    """The error names the entry point the user called (influence's are if_<solver>), or a
    function the user built and passed in, never an inner call (hvp, linear_gnvp...)."""
    head = text.split("(", 1)[0]
    base, own = func.split(".")[0], head.split(".")[0]
    return own == base or (base == "influence" and own.startswith("if_")) or head in USER_BUILT


def _check_outcome(func: str, call) -> None:
    try:
        out = call()
    except (TypeError, ValueError) as err:
        assert LIBRARY_ERROR.match(str(err)), (
            f"{func}: not a library error: {type(err).__name__}: {err}")
        assert _names_the_call(func, str(err)), f"{func}: names an inner call: {err}"
        return
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    bad = [t for t in leaves if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    assert not bad, f"{func}: returned non-finite values without an error"


# -- data ----------------------------------------------------------------------------------
METHODS = ["grad_dot", "grad_cos", "tracin", "influence", "trak", "logra", "tracin_cos",
           "knn_shapley"]


@pytest.mark.parametrize("corruption", sorted(DATA_CORRUPTIONS))
@pytest.mark.parametrize("method", METHODS)
def test_methods_name_bad_train_and_test_data(method, corruption):
    """prepare(params, bad train) and score(params, state, train, bad test): named error or finite."""
    m = _method_calls()[method]()
    bad = DATA_CORRUPTIONS[corruption]
    params = _params_of(method)
    _check_outcome(f"{method}.prepare", lambda: m.prepare(params, bad))
    state = m.prepare(params, BATCH)
    _check_outcome(f"{method}.score", lambda: m.score(params, state, BATCH, bad))


@pytest.mark.parametrize("corruption", sorted(PARAM_CORRUPTIONS))
@pytest.mark.parametrize("method", [m for m in METHODS if m != "knn_shapley"])  # no params
def test_methods_name_bad_params(method, corruption):
    """prepare(bad params, train): a named error (or finite scores)."""
    m = _method_calls()[method]()
    bad = PARAM_CORRUPTIONS[corruption]
    bad = [bad] if method.startswith("tracin") and isinstance(bad, dict) else bad
    _check_outcome(f"{method}.prepare", lambda: m.score(bad, m.prepare(bad, BATCH), BATCH, BATCH))


# -- primitives ----------------------------------------------------------------------------
PRIMITIVES = {
    "per_sample_grad": lambda p, b: per_sample_grad(FM.loss, p, b),
    "grad": lambda p, b: grad(FM.loss, p, b),
    "hvp": lambda p, b: hvp(FM.loss, p, b)(torch.ones(1, P, dtype=DT)),
    "gnvp": lambda p, b: gnvp(FM.forward, lambda o, ex: F.cross_entropy(o[None], ex[1][None]),
                              p, b)(torch.ones(1, P, dtype=DT)),
}


@pytest.mark.parametrize("corruption", sorted(DATA_CORRUPTIONS))
@pytest.mark.parametrize("prim", sorted(PRIMITIVES))
def test_primitives_name_bad_data(prim, corruption):
    _check_outcome(prim, lambda: PRIMITIVES[prim](FM.params, DATA_CORRUPTIONS[corruption]))


@pytest.mark.parametrize("corruption", sorted(PARAM_CORRUPTIONS))
@pytest.mark.parametrize("prim", sorted(PRIMITIVES))
def test_primitives_name_bad_params(prim, corruption):
    _check_outcome(prim, lambda: PRIMITIVES[prim](PARAM_CORRUPTIONS[corruption], BATCH))


SOLVERS = {
    "ihvp_cg": lambda op, d: ihvp_cg(op, damping=d, max_iter=5),
    "ihvp_explicit": lambda op, d: ihvp_explicit(op, damping=d),
    "ihvp_arnoldi": lambda op, d: ihvp_arnoldi(op, damping=d, rank=3, max_iter=6),
    "ihvp_lissa": lambda op, d: ihvp_lissa(lambda b: hvp(FM.loss, FM.params, b), BATCH,
                                           damping=d, depth=3, scale=10.0),
}


@pytest.mark.parametrize("corruption", sorted(V_CORRUPTIONS))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_solvers_name_bad_right_hand_sides(solver, corruption):
    inv = SOLVERS[solver](_op(), 1.0)
    _check_outcome(solver, lambda: inv(V_CORRUPTIONS[corruption]))


@pytest.mark.parametrize("corruption", sorted(NUMBER_CORRUPTIONS))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_solvers_name_bad_damping(solver, corruption):
    _check_outcome(solver, lambda: SOLVERS[solver](_op(), NUMBER_CORRUPTIONS[corruption])(
        torch.ones(1, P, dtype=DT)))


@pytest.mark.parametrize("corruption", sorted(INT_CORRUPTIONS))
@pytest.mark.parametrize("arg", ["proj_dim", "seed", "dim"])
def test_make_projector_names_bad_sizes(arg, corruption):
    kwargs = {"proj_dim": 4, "seed": 0}
    dim = P
    if arg == "dim":
        dim = INT_CORRUPTIONS[corruption]
    else:
        kwargs[arg] = INT_CORRUPTIONS[corruption]
    if arg == "seed" and corruption == "zero":
        return  # seed 0 is valid
    _check_outcome("make_projector", lambda: make_projector(dim, **kwargs)(
        torch.ones(2, P, dtype=DT)))


def test_blame_data_rewords_data_errors_only():
    """blame_data: a torch shape error becomes '<func>(<arg>=...)'; a user's own error and out of
    memory pass through; an inner boundary's error is re-worded for the outer call."""
    from dattri_fn._checks import blame_data

    with pytest.raises(ValueError, match=r"^f\(train=...\): expected examples the model .* "
                                         r"'mat1 and mat2 shapes"):
        with blame_data("f", "train", BATCH):
            torch.ones(2, 3) @ torch.ones(2, 3)
    for raw in (RuntimeError("boom"), RuntimeError("CUDA out of memory. Tried to allocate 9 GiB")):
        with pytest.raises(RuntimeError, match=str(raw).split(".")[0]):
            with blame_data("f", "train", BATCH):
                raise raw
    with pytest.raises(ValueError, match=r"^outer\(test=...\): expected examples") as info:
        with blame_data("outer", "test", BATCH), blame_data("hvp", "data", BATCH):
            torch.ones(2, 3) @ torch.ones(2, 3)
    assert str(info.value.__cause__).startswith("hvp(data=...)")


def test_a_bad_batch_leaves_the_fast_path_of_a_good_model():
    """grad_dot(fm) given data in the wrong dtype first: a named error, no 'densely from now
    on' warning, and the next good call still takes the factored path (no warning)."""
    import warnings

    m = grad_dot(functional_model(FM.module, F.cross_entropy))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(TypeError, match=r"grad_dot\(test=...\): expected floating"):
            m.score(FM.params, (), BATCH, (X.float(), Y))
        S = m.score(FM.params, (), BATCH, BATCH)
    torch.testing.assert_close(S, per_sample_grad(FM.loss, FM.params, BATCH) @
                               per_sample_grad(FM.loss, FM.params, BATCH).T)
