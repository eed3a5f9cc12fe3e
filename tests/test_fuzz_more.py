"""Fuzz of the rest of the public API (issue 15, second part): representer points, MAGIC and
``metagradient``, dropout ensembles, feature stores and the testing kit's checks.

As in ``tests/test_fuzz_api.py``: each case runs one entry point with valid arguments except
one corrupted argument; the allowed outcomes are a TypeError/ValueError worded by the library
(``"<func>(<arg>=...): expected ..."``, a FileNotFoundError for a store path that holds none)
whose ``<func>`` is the entry point the case called (or a function the user built and passed
in, e.g. the method inside ``dropout_members``), never an inner call, or a result whose every
floating tensor is finite (and of the right shape where one is known).
A raw torch error, a NaN, a silent wrong shape, a call that runs past 30 s (a hang) or an
``AssertionError`` from a contract check given a valid primitive fails the case.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, Subset, TensorDataset

from dattri_fn.attribute import influence
from dattri_fn.attribute.ensemble import dropout_ensemble, dropout_members
from dattri_fn.attribute.magic import magic, metagradient
from dattri_fn.attribute.representer import RepresenterState, representer
from dattri_fn.store import build_store, open_store, record_store, stats_store
from dattri_fn.testing import (
    check_inverse,
    check_linop,
    check_method,
    check_projector,
    ridge_regression,
    spd_matrix,
)
from dattri_fn.training import batch_order, sgd, train

DT = torch.float64


def _setup():
    g = torch.Generator().manual_seed(0)
    params = {"W1": torch.randn(4, 3, generator=g, dtype=DT), "b1": torch.zeros(4, dtype=DT),
              "W2": torch.randn(3, 4, generator=g, dtype=DT), "b2": torch.zeros(3, dtype=DT)}
    x = torch.randn(6, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    return params, (x, y)


PARAMS, BATCH = _setup()
X, Y = BATCH


def feature(p, z):
    return torch.tanh(p["W1"] @ z[0] + p["b1"])


def head(p, h):
    return p["W2"] @ h + p["b2"]


def loss(p, z):
    return F.cross_entropy(head(p, feature(p, z))[None], z[1][None])


def dropout_loss(p, z):
    h = F.dropout(feature(p, z), 0.3, training=True)
    return F.cross_entropy(head(p, h)[None], z[1][None])


def _with(**change):
    return {**PARAMS, **change}


DATA = {
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
    "negative_labels": (X, Y - 5),
    "generator": (b for b in [BATCH]),
}
PARAMS_BAD = {
    "none": None,
    "empty": {},
    "nan": _with(W1=PARAMS["W1"].clone().fill_(math.nan)),
    "missing": {k: v for k, v in PARAMS.items() if k != "b2"},
    "shape": _with(b2=torch.zeros(5, dtype=DT)),
    "int": _with(b2=torch.zeros(3, dtype=torch.long)),
    "meta": {k: v.to("meta") for k, v in PARAMS.items()},
    "float32": {k: v.float() for k, v in PARAMS.items()},
}
INTS = {"zero": 0, "negative": -3, "float": 2.5, "string": "8", "none": None, "bool": True}
NUMBERS = {"zero": 0.0, "negative": -1.0, "nan": math.nan, "inf": math.inf, "string": "0.1"}

LIBRARY_ERROR = re.compile(r"^[\w./]+\([\w\[\]'\"]+=\.\.\.\): expected")


def _n_rows(data) -> int | None:
    """Examples in a corrupted data argument when it is one tuple Batch, else None."""
    if isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
        return data[0].shape[0] if data[0].ndim else None
    return None


class _Hang(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` in the library eats it."""


@contextlib.contextmanager
def _deadline(func: str, seconds: float = 30.0):
    """Fail a case that runs for ``seconds`` (a hang: every case takes milliseconds)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise _Hang(func)

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Hang:
        pytest.fail(f"{func}: no result within {seconds:g} s (a hang)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# A case's label starts with the short name of its entry point ("build.path", "linop.k0",
# "spd_matrix(dim=zero)", "metagradient[order_short]"); these are the names the user called.
ENTRY_POINTS = {"build": "build_store", "open": "open_store", "record": "record_store",
                "stats": "stats_store", "linop": "check_linop", "inverse": "check_inverse",
                "projector": "check_projector", "method": "check_method"}


def _entry(func: str) -> str:
    """The entry point a case label calls: its text before the first '.', '(' or '['."""
    short = re.split(r"[.(\[]", func, maxsplit=1)[0]
    return ENTRY_POINTS.get(short, short)


def _names_the_call(func: str, text: str, user_built: tuple[str, ...] = ()) -> bool:
    """The error names the entry point the case called (``representer.score`` for
    ``representer``), or a function the user built and passed in (``user_built``: the method
    inside ``dropout_members``), never an inner call (hvp, per_sample_grad, io.save...)."""
    head = text.split("(", 1)[0]
    return head.split(".")[0] == _entry(func) or head in user_built


def _check_outcome(func: str, call, *, allow_missing: bool = False, shape=None,
                   user_built: tuple[str, ...] = ()) -> None:
    """Run ``call``: a library-worded error naming the call (or ``user_built``), or finite
    tensors (of ``shape`` for a Tensor), within a deadline."""
    try:
        with _deadline(func):
            out = call()
    except (TypeError, ValueError) as err:
        assert LIBRARY_ERROR.match(str(err)), (
            f"{func}: not a library error: {type(err).__name__}: {err}")
        assert _names_the_call(func, str(err), user_built), f"{func}: names an inner call: {err}"
        return
    except FileNotFoundError as err:
        assert allow_missing and LIBRARY_ERROR.match(str(err)), f"{func}: {err}"
        assert _names_the_call(func, str(err), user_built), f"{func}: names an inner call: {err}"
        return
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    bad = [t for t in leaves if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    assert not bad, f"{func}: returned non-finite values without an error"
    if shape is not None and isinstance(out, torch.Tensor):
        assert tuple(out.shape) == shape, f"{func}: silent wrong shape {list(out.shape)}, {shape}"


# -- representer points ----------------------------------------------------------------------
def _rps(**kw):
    return representer(feature, head, lambda o, y: F.cross_entropy(o[None], y[None]),
                       **{"l2": 0.1, **kw})


RPS = _rps()
RPS_STATE = RPS.prepare(PARAMS, BATCH)


@pytest.mark.parametrize("corruption", sorted(DATA))
def test_representer_names_bad_data(corruption):
    """prepare(bad train), score(bad test), score(bad train), self_score(bad train): named or finite."""
    bad = DATA[corruption]
    _check_outcome("representer.prepare", lambda: RPS.prepare(PARAMS, bad))
    _check_outcome("representer.score(test)", lambda: RPS.score(PARAMS, RPS_STATE, BATCH, bad),
                   shape=(6, _n_rows(bad)))
    _check_outcome("representer.score(train)", lambda: RPS.score(PARAMS, RPS_STATE, bad, BATCH))
    _check_outcome("representer.self_score", lambda: RPS.self_score(PARAMS, RPS_STATE, bad))


@pytest.mark.parametrize("corruption", sorted(PARAMS_BAD))
def test_representer_names_bad_params(corruption):
    bad = PARAMS_BAD[corruption]
    _check_outcome("representer.prepare", lambda: RPS.prepare(bad, BATCH))
    _check_outcome("representer.score", lambda: RPS.score(bad, RPS_STATE, BATCH, BATCH))
    _check_outcome("representer.self_score", lambda: RPS.self_score(bad, RPS_STATE, BATCH))


STATES = {
    "none": None,
    "tuple": (),
    "wrong_rows": RepresenterState(RPS_STATE.features[:3], RPS_STATE.alpha[:3],
                                   RPS_STATE.classes[:3]),
    "wrong_width": RepresenterState(RPS_STATE.features[:, :2], RPS_STATE.alpha,
                                    RPS_STATE.classes),
    "nan": RepresenterState(RPS_STATE.features.clone().fill_(math.nan), RPS_STATE.alpha,
                            RPS_STATE.classes),
    "mismatched": RepresenterState(RPS_STATE.features, RPS_STATE.alpha[:4],
                                   RPS_STATE.classes),
    "float_classes": RepresenterState(RPS_STATE.features, RPS_STATE.alpha,
                                      RPS_STATE.classes.to(DT)),
}


@pytest.mark.parametrize("corruption", sorted(STATES))
def test_representer_names_bad_state(corruption):
    bad = STATES[corruption]
    _check_outcome("representer.score", lambda: RPS.score(PARAMS, bad, None, BATCH))
    _check_outcome("representer.self_score", lambda: RPS.self_score(PARAMS, bad, None))


@pytest.mark.parametrize("corruption", sorted(INTS))
def test_representer_names_bad_top_k_and_chunk(corruption):
    bad = INTS[corruption]
    if bad is not None:
        _check_outcome("representer.score", lambda: RPS.score(PARAMS, RPS_STATE, None, BATCH,
                                                              top_k=bad))
    _check_outcome("representer", lambda: _rps(chunk_size=bad).prepare(PARAMS, BATCH))


@pytest.mark.parametrize("arg,value", [("l2", v) for v in NUMBERS.values()]
                         + [("explain", "x"), ("refit", "x"), ("explain", None)])
def test_representer_names_bad_settings(arg, value):
    _check_outcome("representer", lambda: _rps(**{arg: value}))


def test_representer_refuses_a_loader_over_a_subset():
    """score(train=DataLoader over 4 of 6 rows) with a state of 6: refused, never 6 rows back."""
    loader = DataLoader(Subset(TensorDataset(X, Y), range(4)), batch_size=2)
    with pytest.raises(ValueError, match=r"representer.score\(train=...\): expected the 6"):
        RPS.score(PARAMS, RPS_STATE, loader, BATCH)


# -- MAGIC -------------------------------------------------------------------------------------
def _magic(**kw):
    return magic(loss, sgd(0.1), **{"epochs": 1, "batch_size": 3, **kw})


MAGIC = _magic()
MAGIC_STATE = MAGIC.prepare(PARAMS, BATCH)


@pytest.mark.parametrize("corruption", sorted(DATA))
def test_magic_names_bad_data(corruption):
    bad = DATA[corruption]
    _check_outcome("magic.prepare", lambda: MAGIC.prepare(PARAMS, bad))
    _check_outcome("magic.score(test)", lambda: MAGIC.score(PARAMS, MAGIC_STATE, BATCH, bad),
                   shape=(6, _n_rows(bad)))
    _check_outcome("magic.score(train)", lambda: MAGIC.score(PARAMS, MAGIC_STATE, bad, BATCH))


@pytest.mark.parametrize("corruption", sorted(PARAMS_BAD))
def test_magic_names_bad_params(corruption):
    bad = PARAMS_BAD[corruption]
    _check_outcome("magic.prepare", lambda: MAGIC.prepare(bad, BATCH))


@pytest.mark.parametrize("arg", ["epochs", "batch_size", "seed", "checkpoint_every", "chunk_size",
                                 "self_chunk"])
@pytest.mark.parametrize("corruption", sorted(INTS))
def test_magic_names_bad_settings(arg, corruption):
    bad = INTS[corruption]
    if (arg, corruption) in {("seed", "zero")} or (bad is None and arg in (
            "batch_size", "checkpoint_every", "chunk_size")):
        return  # valid values
    _check_outcome("magic", lambda: _magic(**{arg: bad}))


def test_magic_names_bad_state_and_top_k():
    for bad in (None, (), RPS_STATE):
        _check_outcome("magic.score", lambda bad=bad: MAGIC.score(PARAMS, bad, BATCH, BATCH))
    for bad in INTS.values():
        if bad is not None:
            _check_outcome("magic.score", lambda bad=bad: MAGIC.score(PARAMS, MAGIC_STATE, BATCH,
                                                                      BATCH, top_k=bad))


def _run():
    order = batch_order(6, batch_size=3, epochs=1, seed=0)
    from dattri_fn.training import make_step

    step = make_step(loss, sgd(0.1))
    opt = sgd(0.1)
    traj = train(step, PARAMS, opt.init(PARAMS), BATCH, order, checkpoint_every=1)
    cot = {k: v[None].clone() for k, v in traj.params.items()}
    return step, traj, order, cot


def test_metagradient_names_bad_arguments():
    step, traj, order, cot = _run()
    cases = {
        "cotangent_keys": lambda: metagradient(step, traj, BATCH, order, {"W1": cot["W1"]}),
        "cotangent_shape": lambda: metagradient(step, traj, BATCH, order,
                                                {k: v[0] for k, v in cot.items()}),
        "cotangent_nan": lambda: metagradient(step, traj, BATCH, order,
                                              {k: v.clone().fill_(math.nan) for k, v in cot.items()}),
        "cotangent_none": lambda: metagradient(step, traj, BATCH, order, None),
        "trajectory": lambda: metagradient(step, None, BATCH, order, cot),
        "order_short": lambda: metagradient(step, traj, BATCH, order[:1], cot),
        "order_range": lambda: metagradient(step, traj, BATCH, [o + 10 for o in order], cot),
        "data": lambda: metagradient(step, traj, (X[:2], Y[:2]), order, cot),
        "weights": lambda: metagradient(step, traj, BATCH, order, cot, weights=torch.ones(2)),
        "chunk": lambda: metagradient(step, traj, BATCH, order, cot, chunk_size=0),
        "step": lambda: metagradient(None, traj, BATCH, order, cot),
    }
    for name, call in cases.items():
        _check_outcome(f"metagradient[{name}]", call)


# -- dropout ensembles -------------------------------------------------------------------------
ENS = dropout_ensemble(dropout_loss, n_masks=3, seed=0)


@pytest.mark.parametrize("corruption", sorted(DATA))
def test_dropout_ensemble_names_bad_data(corruption):
    bad = DATA[corruption]
    _check_outcome("dropout_ensemble.prepare", lambda: ENS.prepare(PARAMS, bad))
    _check_outcome("dropout_ensemble.score", lambda: ENS.score(PARAMS, (), BATCH, bad),
                   shape=(6, _n_rows(bad)))
    _check_outcome("dropout_ensemble.score(train)", lambda: ENS.score(PARAMS, (), bad, BATCH),
                   shape=(_n_rows(bad), 6))
    _check_outcome("dropout_ensemble.self_score", lambda: ENS.self_score(PARAMS, (), bad),
                   shape=(_n_rows(bad),))


@pytest.mark.parametrize("corruption", sorted(PARAMS_BAD))
def test_dropout_ensemble_names_bad_params(corruption):
    bad = PARAMS_BAD[corruption]
    _check_outcome("dropout_ensemble.score", lambda: ENS.score(bad, (), BATCH, BATCH))


@pytest.mark.parametrize("arg", ["n_masks", "seed", "chunk_size"])
@pytest.mark.parametrize("corruption", sorted(INTS))
def test_dropout_ensemble_names_bad_settings(arg, corruption):
    bad = INTS[corruption]
    if (arg, corruption) in {("seed", "zero"), ("chunk_size", "none")}:
        return
    _check_outcome("dropout_ensemble",
                   lambda: dropout_ensemble(dropout_loss, **{"n_masks": 2, arg: bad}))


@pytest.mark.parametrize("lrs", [[], [0.0], [math.nan], "0.1", [[0.1]], None, [0.1, -1.0]])
def test_dropout_ensemble_names_bad_lrs(lrs):
    _check_outcome("dropout_ensemble", lambda: dropout_ensemble(dropout_loss, n_masks=2,
                                                                lrs=lrs).score([PARAMS], (),
                                                                               BATCH, BATCH))


MEMBERS = dropout_members(lambda mask: influence(mask(dropout_loss), solver="explicit",
                                                 damping=2.0), n_masks=2)
MEMBERS_STATE = MEMBERS.prepare(PARAMS, BATCH)
# The method the user built and passed to dropout_members names its own arguments.
MEMBER_METHOD = ("if_explicit",)


@pytest.mark.parametrize("corruption", sorted(DATA))
def test_dropout_members_name_bad_data(corruption):
    bad = DATA[corruption]
    _check_outcome("dropout_members.prepare", lambda: MEMBERS.prepare(PARAMS, bad),
                   user_built=MEMBER_METHOD)
    _check_outcome("dropout_members.score", lambda: MEMBERS.score(PARAMS, MEMBERS_STATE, BATCH,
                                                                  bad), shape=(6, _n_rows(bad)),
                   user_built=MEMBER_METHOD)
    _check_outcome("dropout_members.self_score", lambda: MEMBERS.self_score(PARAMS, MEMBERS_STATE,
                                                                            bad),
                   shape=(_n_rows(bad),), user_built=MEMBER_METHOD)


@pytest.mark.parametrize("corruption", sorted(PARAMS_BAD))
def test_dropout_members_name_bad_params(corruption):
    bad = PARAMS_BAD[corruption]
    _check_outcome("dropout_members.score", lambda: MEMBERS.score(bad, MEMBERS_STATE, BATCH, BATCH),
                   user_built=MEMBER_METHOD)


@pytest.mark.parametrize("corruption", sorted(INTS))
def test_dropout_members_name_bad_settings(corruption):
    bad = INTS[corruption]
    _check_outcome("dropout_members", lambda: dropout_members(
        lambda mask: influence(mask(dropout_loss)), n_masks=bad))
    _check_outcome("dropout_members", lambda: dropout_members(
        lambda mask: influence(mask(dropout_loss)), n_masks=2, seed=bad))
    if bad is not None:
        _check_outcome("dropout_members.score", lambda: MEMBERS.score(
            PARAMS, MEMBERS_STATE, BATCH, BATCH, top_k=bad))


# -- a store where a method takes train ------------------------------------------------------
def _store_train_cases():
    from dattri_fn.attribute import grad_dot

    return {
        "representer.prepare": lambda t: RPS.prepare(PARAMS, t),
        "representer.score": lambda t: RPS.score(PARAMS, RPS_STATE, t, BATCH),
        "representer.self_score": lambda t: RPS.self_score(PARAMS, RPS_STATE, t),
        "magic.prepare": lambda t: MAGIC.prepare(PARAMS, t),
        "magic.score": lambda t: MAGIC.score(PARAMS, MAGIC_STATE, t, BATCH),
        "dropout_ensemble.score": lambda t: ENS.score(PARAMS, (), t, BATCH),
        "dropout_ensemble.self_score": lambda t: ENS.self_score(PARAMS, (), t),
        "dropout_members.score": lambda t: MEMBERS.score(PARAMS, MEMBERS_STATE, t, BATCH),
        "grad_dot.score": lambda t: grad_dot(loss).score(PARAMS, (), t, BATCH),
        "grad_dot.self_score": lambda t: grad_dot(loss).self_score(PARAMS, (), t),
    }


@pytest.mark.parametrize("kind", ["store_of_other_features", "recording_of_other_features"])
@pytest.mark.parametrize("case", sorted(_store_train_cases()))
def test_methods_name_a_store_they_cannot_use(tmp_path, case, kind):
    """A store (or recording) of other features as train: a named refusal or the right shape,
    never a raw error from a matmul over the wrong layout."""
    from dattri_fn.attribute import grad_dot

    store = build_store(tmp_path / "s", lambda b: b[0] * 2.0, BATCH, params=PARAMS)
    if kind == "recording_of_other_features":  # stacked [3, b, P] features under the same path
        ENS.score(PARAMS, (), record_store(tmp_path / "r", BATCH, params=PARAMS), BATCH)
        store = record_store(tmp_path / "r", BATCH, params=PARAMS)
    del grad_dot
    _check_outcome(case, lambda: _store_train_cases()[case](store),
                   shape=(6,) if case.endswith("self_score") else (6, 6),
                   user_built=MEMBER_METHOD if case.startswith("dropout_members") else ())


# -- stores ------------------------------------------------------------------------------------
def _rows(batch):
    return batch[0] * 2.0


PATHS = {"none": None, "int": 3, "list": ["a"]}


@pytest.mark.parametrize("corruption", sorted(DATA))
def test_build_store_names_bad_data(tmp_path, corruption):
    _check_outcome("build_store", lambda: build_store(tmp_path / "s", _rows, DATA[corruption],
                                                      params=PARAMS))


STORE_CASES = {
    "build.path": lambda t, good: build_store(None, _rows, BATCH, params=PARAMS),
    "build.feature_fn": lambda t, good: build_store(t, None, BATCH, params=PARAMS),
    "build.feature_fn_str": lambda t, good: build_store(t, lambda b: "x", BATCH, params=PARAMS),
    "build.feature_fn_rows": lambda t, good: build_store(t, lambda b: b[0][:1], BATCH,
                                                         params=PARAMS),
    "build.feature_fn_nan": lambda t, good: build_store(t, lambda b: b[0] * math.nan, BATCH,
                                                        params=PARAMS),
    "build.feature_fn_0d": lambda t, good: build_store(t, lambda b: b[0].sum(), BATCH,
                                                       params=PARAMS),
    "build.params": lambda t, good: build_store(t, _rows, BATCH, params="p"),
    "build.params_none": lambda t, good: build_store(t, _rows, BATCH, params=None),
    "build.config": lambda t, good: build_store(t, _rows, BATCH, params=PARAMS,
                                                config={"f": object()}),
    "build.config_list": lambda t, good: build_store(t, _rows, BATCH, params=PARAMS, config=[1]),
    "build.shard_rows": lambda t, good: build_store(t, _rows, BATCH, params=PARAMS, shard_rows=0),
    "build.block_rows": lambda t, good: build_store(t, _rows, BATCH, params=PARAMS,
                                                    block_rows="3"),
    "build.file_path": lambda t, good: build_store(good / "manifest.json", _rows, BATCH,
                                                   params=PARAMS),
    "build.other_width": lambda t, good: build_store(good, lambda b: b[0][:, :2], BATCH,
                                                     params=PARAMS, config={"m": 1}),
    "open.path": lambda t, good: open_store(None),
    "open.missing": lambda t, good: open_store(t / "nothing"),
    "open.file": lambda t, good: open_store(good / "manifest.json"),
    "open.params": lambda t, good: open_store(good, params="p"),
    "open.params_other": lambda t, good: open_store(good, params=_with(b2=PARAMS["b2"] + 1)),
    "open.config": lambda t, good: open_store(good, config={"m": 2}),
    "open.config_type": lambda t, good: open_store(good, config=3),
    "open.block_rows": lambda t, good: open_store(good, block_rows=0),
    "open.out": lambda t, good: open_store(good, out=3),
    "record.path": lambda t, good: record_store(None, BATCH, params=PARAMS),
    "record.params": lambda t, good: record_store(t, BATCH, params=3),
    "record.shard_rows": lambda t, good: record_store(t, BATCH, params=PARAMS, shard_rows=-1),
    "record.block_rows": lambda t, good: record_store(t, BATCH, params=PARAMS, block_rows=2.5),
    "record.config": lambda t, good: record_store(t, BATCH, params=PARAMS, config=3),
    "record.data": lambda t, good: record_store(t, "data", params=PARAMS),
    "stats.path": lambda t, good: stats_store(None, lambda: 1, params=PARAMS),
    "stats.compute": lambda t, good: stats_store(t, None, params=PARAMS),
    "stats.compute_raises": lambda t, good: stats_store(t, lambda: 1 / 0, params=PARAMS),
    "stats.params": lambda t, good: stats_store(t, lambda: torch.ones(2), params=3),
    "stats.config": lambda t, good: stats_store(t, lambda: torch.ones(2), params=PARAMS,
                                                config=3),
    "stats.map_location": lambda t, good: stats_store(t, lambda: torch.ones(2), params=PARAMS,
                                                      map_location=3),
}


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    build_store(path, _rows, BATCH, params=PARAMS, config={"m": 1})
    return path


@pytest.mark.parametrize("case", sorted(STORE_CASES))
def test_stores_name_bad_arguments(tmp_path, good_store, case):
    """build/open/record/stats_store: every bad argument a named error (a missing store a
    FileNotFoundError naming the path)."""
    if case == "stats.compute_raises":
        with pytest.raises(ZeroDivisionError):  # the user's own error passes through
            STORE_CASES[case](tmp_path / "s", good_store)
        return
    _check_outcome(case, lambda: STORE_CASES[case](tmp_path / "s", good_store),
                   allow_missing=case == "open.missing")


def test_stats_store_refuses_other_params(tmp_path):
    stats_store(tmp_path, lambda: torch.ones(2), params=PARAMS, config={"k": 1})
    _check_outcome("stats_store", lambda: stats_store(tmp_path, lambda: torch.ones(2),
                                                      params=_with(b2=PARAMS["b2"] + 1),
                                                      config={"k": 1}))
    _check_outcome("stats_store", lambda: stats_store(tmp_path, lambda: torch.ones(2),
                                                      params=PARAMS, config={"k": 2}))


# -- the testing kit's checks ------------------------------------------------------------------
A = spd_matrix(4, 0)


def _solver(op, damping=0.0):
    from dattri_fn import ihvp_explicit

    return ihvp_explicit(op, damping=damping)


def _make(dim, proj_dim, seed):
    from dattri_fn import make_projector

    return make_projector(dim, proj_dim=proj_dim, seed=seed, dtype=DT)


KIT = {
    "linop.op_str": lambda: check_linop("op"),
    "linop.op_3d": lambda: check_linop(torch.ones(2, 2, 2, dtype=DT)),
    "linop.op_rect": lambda: check_linop(torch.ones(2, 3, dtype=DT)),
    "linop.k0": lambda: check_linop(A, k=0),
    "linop.k_str": lambda: check_linop(A, k="3"),
    "linop.seed": lambda: check_linop(A, seed=-1),
    "linop.rtol": lambda: check_linop(A, rtol=math.nan),
    "linop.reference": lambda: check_linop(A, reference=torch.ones(3, 3, dtype=DT)),
    "linop.reference_str": lambda: check_linop(A, reference="A"),
    "inverse.solver": lambda: check_inverse(None),
    "inverse.dim": lambda: check_inverse(_solver, dim=0),
    "inverse.k": lambda: check_inverse(_solver, k=0),
    "inverse.damping": lambda: check_inverse(_solver, damping=-1.0),
    "inverse.rtol": lambda: check_inverse(_solver, rtol="1"),
    "inverse.cond": lambda: check_inverse(_solver, cond=0.5),
    "inverse.kinds": lambda: check_inverse(_solver, kinds="spd"),
    "inverse.dtypes": lambda: check_inverse(_solver, dtypes=[torch.long]),
    "projector.make": lambda: check_projector(None),
    "projector.dim": lambda: check_projector(_make, dim=0),
    "projector.proj_dim": lambda: check_projector(_make, proj_dim=-2),
    "projector.seeds": lambda: check_projector(_make, seeds=1),
    "projector.d_eff": lambda: check_projector(_make, d_eff=0),
    "method.method": lambda: check_method(None, ridge_regression(n=6, dim=2, seed=0)),
    "method.problem": lambda: check_method(RPS, None),
    "method.n_test": lambda: check_method(RPS, ridge_regression(n=6, dim=2, seed=0), n_test=0),
    "method.batch_size": lambda: check_method(RPS, ridge_regression(n=6, dim=2, seed=0),
                                              batch_size="3"),
    "method.top_k": lambda: check_method(RPS, ridge_regression(n=6, dim=2, seed=0), top_k=0),
    "method.rtol": lambda: check_method(RPS, ridge_regression(n=6, dim=2, seed=0), rtol=-1.0),
    "method.min_loo_corr": lambda: check_method(RPS, ridge_regression(n=6, dim=2, seed=0),
                                                min_loo_corr=2.0),
}


@pytest.mark.parametrize("case", sorted(KIT))
def test_kit_checks_name_bad_settings(case):
    """A check given a bad setting raises a library error, never an AssertionError about a
    primitive that did nothing wrong, nor a raw torch error."""
    _check_outcome(case, KIT[case])


# -- the kit's problems and matrices, fit_head ---------------------------------------------------
def _builders():
    import dattri_fn.testing as kit

    sizes = {"ridge_regression": ("n", "dim"), "linear_regression": ("n", "dim"),
             "logistic_regression": ("n", "dim", "classes"), "mlp": ("n", "hidden", "classes"),
             "conv_net": ("n", "size", "channels"), "sequence_model": ("n", "length", "vocab")}
    cases = {}
    for name, args in sizes.items():
        for arg in (*args, "seed", "cond"):
            if arg == "cond" and name not in ("ridge_regression", "linear_regression",
                                              "logistic_regression"):
                continue
            for label, value in {**INTS, "nan": math.nan, "half": 0.5}.items():
                if arg != "cond" and label in ("nan", "half"):
                    continue
                if (arg, label) in {("seed", "zero"), ("cond", "none")}:
                    continue
                cases[f"{name}({arg}={label})"] = (lambda name=name, arg=arg, value=value:
                                                   getattr(kit, name)(**{arg: value}))
    for name in ("spd_matrix", "psd_matrix", "indefinite_matrix", "low_rank_plus_diagonal"):
        for label, value in INTS.items():
            cases[f"{name}(dim={label})"] = lambda name=name, v=value: getattr(kit, name)(v, 0)
            if label != "zero":
                cases[f"{name}(seed={label})"] = lambda name=name, v=value: getattr(kit, name)(4, v)
    for name in ("spd_matrix", "psd_matrix", "indefinite_matrix"):
        for value in (0.5, math.nan, math.inf, "10"):
            cases[f"{name}(cond={value!r})"] = (lambda name=name, v=value:
                                                getattr(kit, name)(4, 0, cond=v))
    cases["psd_matrix(rank=9)"] = lambda: kit.psd_matrix(4, 0, rank=9)
    cases["indefinite_matrix(negative=-1)"] = lambda: kit.indefinite_matrix(4, 0, negative=-1)
    return cases


@pytest.mark.parametrize("case", sorted(_builders()))
def test_kit_problems_name_bad_sizes(case):
    """The kit's problem and matrix builders: a bad size, seed or condition number is a named
    error before a draw turns it into a torch error or a NaN matrix."""
    _check_outcome(case, _builders()[case])


def test_kit_strategies_name_bad_kinds():
    from hypothesis import given, settings

    from dattri_fn.testing import strategies

    for strategy, name in ((strategies.problems(kinds=("bogus",)), "problems"),
                           (strategies.operators(kinds=("spd", "bogus")), "operators"),
                           (strategies.linops(kinds=()), "operators")):
        @settings(max_examples=1, database=None)
        @given(x=strategy)
        def draw(x):
            pass

        with pytest.raises(ValueError, match=rf"^{name}\(kinds=...\): expected a non-empty"):
            draw()


def _fit_head_cases():
    from dattri_fn.attribute.representer import fit_head

    ce = lambda o, y: F.cross_entropy(o[None], y[None])
    H = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    W = {"W2": PARAMS["W2"]}
    call = lambda **kw: fit_head(**{"head_fn": lambda p, h: p["W2"] @ h, "loss_on_logits": ce,
                                    "params": W, "features": H, "targets": Y, "l2": 0.1, **kw})
    return {
        "ok": lambda: call(),
        "features_1d": lambda: call(features=H[0]),
        "features_nan": lambda: call(features=H * math.nan),
        "features_float32": lambda: call(features=H.float()),
        "features_int": lambda: call(features=H.long()),
        "targets_short": lambda: call(targets=Y[:3]),
        "targets_out_of_range": lambda: call(targets=Y + 5),
        "params_missing": lambda: call(params={"W1": PARAMS["W1"]}),
        "params_unused": lambda: call(head_fn=lambda p, h: h[:3]),
        "head_fn": lambda: call(head_fn=None),
        "l2": lambda: call(l2=0.0),
        "max_iter": lambda: call(max_iter=0),
        "tol": lambda: call(tol=math.nan),
    }


@pytest.mark.parametrize("case", sorted(_fit_head_cases()))
def test_fit_head_names_bad_arguments(case):
    _check_outcome(f"fit_head[{case}]", _fit_head_cases()[case])


def test_the_fuzz_fails_a_hang():
    """A case still running at its deadline fails as a hang (issue 15: no hang goes unseen)."""
    import time

    if not hasattr(signal, "setitimer"):
        pytest.skip("no interval timer on this platform")
    with pytest.raises(pytest.fail.Exception, match=r"sleeper: no result within 0.2 s \(a hang\)"):
        with _deadline("sleeper", 0.2):
            time.sleep(5)


# -- the pipeline's public pieces (for people writing a method) ---------------------------------
def _pipeline_cases():
    from dattri_fn.attribute.pipeline import collect, stream_scores, stream_self

    f = lambda b: b[0] * 2.0
    T = f(BATCH)
    return {
        "collect.feature_fn_none": lambda: collect(None, BATCH),
        "collect.feature_fn_str": lambda: collect(lambda b: "x", BATCH),
        "collect.feature_fn_0d": lambda: collect(lambda b: b[0].sum(), BATCH),
        "collect.feature_fn_rows": lambda: collect(lambda b: b[0][:2], BATCH),
        "collect.feature_fn_nan": lambda: collect(lambda b: b[0] * math.nan, BATCH),
        "stream_scores.test_none": lambda: stream_scores(f, BATCH, None),
        "stream_scores.test_nan": lambda: stream_scores(f, BATCH, T * math.nan),
        "stream_scores.test_1d": lambda: stream_scores(f, BATCH, T[0]),
        "stream_scores.test_width": lambda: stream_scores(f, BATCH, T[:, :2]),
        "stream_scores.test_float32": lambda: stream_scores(f, BATCH, T.float()),
        "stream_scores.test_stacked": lambda: stream_scores(f, BATCH, T[None]),
        "stream_scores.train_features_none": lambda: stream_scores(None, BATCH, T),
        "stream_scores.train_rows": lambda: stream_scores(lambda b: b[0][:2], BATCH, T),
        "stream_self.train_features_none": lambda: stream_self(None, f, BATCH),
        "stream_self.test_rows": lambda: stream_self(f, lambda b: b[0][:2], BATCH),
        "stream_self.test_width": lambda: stream_self(f, lambda b: b[0][:, :2], BATCH),
    }


@pytest.mark.parametrize("case", sorted(_pipeline_cases()))
def test_pipeline_names_bad_feature_maps(case):
    """collect/stream_scores/stream_self given a bad feature map or test rows: named errors,
    never a raw matmul/cat error or NaN scores."""
    _check_outcome(case, _pipeline_cases()[case])


def test_the_fuzz_fails_an_error_that_names_an_inner_call():
    """An error worded by the library but naming an inner call (hvp, io.save) fails its case; the
    entry point (by its short label too) and a function the user built and passed in pass."""
    def raising(text):
        def call():
            raise ValueError(text)
        return call

    with pytest.raises(AssertionError, match=r"representer.prepare: names an inner call: hvp"):
        _check_outcome("representer.prepare", raising("hvp(data=...): expected finite values"))
    with pytest.raises(AssertionError, match=r"build.path: names an inner call: save"):
        _check_outcome("build.path", raising("save(path=...): expected a folder"))
    with pytest.raises(AssertionError, match=r"dropout_members.score: names an inner call"):
        _check_outcome("dropout_members.score", raising("if_cg(params=...): expected a dict"))
    _check_outcome("representer.score(test)", raising("representer.score(test=...): expected x"))
    _check_outcome("build.path", raising("build_store(path=...): expected a folder"))
    _check_outcome("spd_matrix(dim=zero)", raising("spd_matrix(dim=...): expected an int >= 1"))
    _check_outcome("metagradient[step]", raising("metagradient(step=...): expected a callable"))
    _check_outcome("dropout_members.score", raising("if_explicit(params=...): expected a dict"),
                   user_built=MEMBER_METHOD)
