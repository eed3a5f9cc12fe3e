"""A plain softmax cross-entropy MLP's plan is decided without the autodiff check (issue 14).

layer_grads.certified_plan returns, for a model mlp_io certifies (here at one checkpoint;
several: tests/test_certified_plan_ckpts.py), the plan the check returns (every layer flat),
with no comparison; None for anything else (then the check runs). Here: its decisions equal
the check's, the gradients and Grad-Dot/Grad-Cos/TracIn scores are torch.equal to the checked
plan's (float32 and float64, lr and a 2-hidden-layer MLP, bias or not, a batch of 1, a short
last batch), everything mlp_io refuses gets the check, and the errors the check raises besides
its comparison (a NaN example, a float label, a wrong width) are raised as before.
"""

import pytest
import torch
import torch.nn.functional as F
from plan_counting import no_certified
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_cos, grad_dot, tracin, tracin_cos
from dattri_fn.transforms import layer_grads
from dattri_fn.transforms.layer_grads import (
    NonFiniteExamples,
    certified_plan,
    check_plan,
    layer_grads_stacked,
    layer_grads_stream,
    layer_plan,
    per_sample_layer_grads,
    plan_decisions,
)


def _model(kind, dtype, bias=True):
    g = torch.Generator().manual_seed(3)
    if kind == "lr":
        m = nn.Linear(6, 4, bias=bias)
    else:  # two hidden layers
        m = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 5, bias=bias),
                          nn.ReLU(), nn.Linear(5, 4, bias=bias))
    m = m.to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return m


def _data(dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _stacked(fm):
    return {k: v.detach()[None] for k, v in fm.params.items()}


def _no_certify(monkeypatch):
    """Every plan takes the autodiff check, as before issue 14."""
    no_certified(monkeypatch)


def _same_lg(x, y):
    assert x.layout == y.layout and x.factors.keys() == y.factors.keys()
    assert (x.dense is None) == (y.dense is None)
    assert x.dense is None or torch.equal(x.dense, y.dense)
    for n in x.factors:
        assert all(torch.equal(s, t) for s, t in zip(x.factors[n], y.factors[n], strict=True))


class _Loader:
    """A re-iterable that is not a list: the streamed path (no pass over test and train)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


CASES = [(k, d, b) for k in ("lr", "mlp") for d in (torch.float32, torch.float64)
         for b in (True, False)]


@pytest.mark.parametrize("kind,dtype,bias", CASES)
def test_certified_decisions_and_gradients_equal_the_checks(kind, dtype, bias):
    fm = functional_model(_model(kind, dtype, bias), F.cross_entropy)
    plan, stacked = layer_plan(fm), _stacked(fm)
    for n in (1, 2, 3, 5):
        batch = _data(dtype, n)
        mine = certified_plan(plan, stacked, batch)
        assert mine is not None and mine.checked and not mine.dense
        checked = layer_grads._check(plan, stacked, batch)[0]
        assert plan_decisions(mine) == plan_decisions(checked)
        for m in (1, 4, 7):
            other = _data(dtype, m, seed=m)
            _same_lg(layer_grads_stacked(mine, stacked, other),
                     layer_grads_stacked(checked, stacked, other))


@pytest.mark.parametrize("kind,dtype,bias", CASES)
@pytest.mark.parametrize("method", ["grad_dot", "grad_cos", "tracin", "tracin_cos"])
def test_scores_equal_the_checked_plans(monkeypatch, kind, dtype, bias, method):
    """Prepared state and state () alike; train of two batches, the last short (1 example);
    a test batch of 1; top-k and self-scores too."""
    fm = functional_model(_model(kind, dtype, bias), F.cross_entropy)
    make = {"grad_dot": grad_dot, "grad_cos": grad_cos,
            "tracin": lambda f: tracin(f, lrs=[0.5]),
            "tracin_cos": lambda f: tracin_cos(f, lrs=[0.5])}[method]
    train, tests = [_data(dtype, 5, 1), _data(dtype, 1, 2)], [_data(dtype, 3, 3), _data(dtype, 1, 4)]

    def run():
        m = make(fm)
        out = []
        for state in (m.prepare(fm.params, train), ()):
            for test in tests:
                out.append(m.score(fm.params, state, train, test))
                out.append(m.score(fm.params, state, _Loader(train), test))  # streamed path
                top = m.score(fm.params, state, train, test, top_k=2)
                out += [top.values, top.indices]
            out.append(m.self_score(fm.params, state, train))
            out.append(m.self_score(fm.params, state, _Loader(train)))
        return out

    new = run()
    with monkeypatch.context() as mp:
        _no_certify(mp)
        old = run()
    assert len(new) == len(old)
    assert all(torch.equal(a, b) for a, b in zip(new, old, strict=True))


def test_the_stream_and_check_plan_take_it_without_the_check(monkeypatch):
    fm = functional_model(_model("mlp", torch.float64), F.cross_entropy)
    plan, stacked = layer_plan(fm), _stacked(fm)
    calls = []
    real = layer_grads._check
    monkeypatch.setattr(layer_grads, "_check", lambda *a, **k: calls.append(1) or real(*a, **k))
    checked = check_plan(plan, fm.params, _data(torch.float64, 4))
    apply, held = layer_grads_stream(plan)
    for n in (1, 3, 2):
        apply(stacked, _data(torch.float64, n, n))
    assert calls == [] and checked.checked and held().checked
    assert plan_decisions(held()) == plan_decisions(checked)
    state = grad_dot(fm).prepare(fm.params, [_data(torch.float64, 5)])
    assert calls == [] and state.train == plan_decisions(checked)


class _Sub(nn.Linear):
    pass


def _refused():
    """Models and calls mlp_io does not certify: (name, model, params, batch)."""
    d = torch.float64
    out = []
    tied = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 4)).to(d)
    tied[2].weight = tied[0].weight
    out.append(("tied", functional_model(tied, F.cross_entropy), None, _data(d, 4)))
    hooked = _model("mlp", d)
    hooked[2].register_forward_hook(lambda mod, i, o: o * 1.0)
    out.append(("hook", functional_model(hooked, F.cross_entropy), None, _data(d, 4)))
    out.append(("loss", functional_model(_model("mlp", d), lambda o, y: F.cross_entropy(o, y) * 2),
                None, _data(d, 4)))
    out.append(("gelu", functional_model(nn.Sequential(nn.Linear(6, 5), nn.GELU(),
                                                       nn.Linear(5, 4)).to(d), F.cross_entropy),
                None, _data(d, 4)))
    out.append(("subclass", functional_model(_Sub(6, 4).to(d), F.cross_entropy), None,
                _data(d, 4)))
    x, y = _data(torch.float32, 4)
    out.append(("float16", functional_model(_model("mlp", torch.float32), F.cross_entropy), None,
                (x.half(), y)))
    # (several stacked checkpoints are certified too: tests/test_certified_plan_ckpts.py)
    return out


@pytest.mark.parametrize("case", _refused(), ids=lambda c: c[0])
def test_what_mlp_io_refuses_gets_the_check(case):
    _, fm, stacked, batch = case
    plan = layer_plan(fm)
    stacked = _stacked(fm) if stacked is None else stacked
    assert certified_plan(plan, stacked, batch) is None


def test_inside_vmap_gets_the_check():
    fm = functional_model(_model("mlp", torch.float64), F.cross_entropy)
    plan, stacked, batch = layer_plan(fm), _stacked(fm), _data(torch.float64, 4)
    assert certified_plan(plan, stacked, batch) is not None
    got = []
    torch.func.vmap(lambda t: (got.append(certified_plan(plan, stacked, batch)), t)[1])(
        torch.ones(2))
    assert got == [None]


def _bad_batches(dtype):
    x, y = _data(dtype, 4)
    nan = x.clone()
    nan[1, 2] = float("nan")
    return {"nan": (nan, y), "float_label": (x, y.to(dtype)), "wide": (_data(dtype, 4)[0].repeat(1, 2), y),
            "label_range": (x, y + 10),
            "overflow": (x * (torch.finfo(dtype).max / 4), y)}


# "overflow" in float32 only: the same inputs' float64 logits stay finite
@pytest.mark.parametrize(("dtype", "bad"), [
    (dt, bad) for dt in (torch.float32, torch.float64)
    for bad in ("nan", "float_label", "wide", "label_range", "overflow")
    if not (bad == "overflow" and dt == torch.float64)])
def test_bad_examples_raise_as_before(monkeypatch, dtype, bad):
    """check_plan and grad_dot's prepare raise the same error type and message with the
    certified path as with the check alone (the check owns them: certified_plan gives None)."""
    # (an MLP's tanh would saturate an overflowing input to a zero gradient: lr overflows)
    fm = functional_model(_model("lr" if bad == "overflow" else "mlp", dtype), F.cross_entropy)
    batch = _bad_batches(dtype)[bad]
    assert certified_plan(layer_plan(fm), _stacked(fm), batch) is None

    def errors():
        out = []
        for call in (lambda: check_plan(layer_plan(fm), fm.params, batch),
                     lambda: grad_dot(fm).prepare(fm.params, [batch])):
            with pytest.raises(Exception) as info:
                call()
            out.append((type(info.value), str(info.value)))
        return out

    new = errors()
    with monkeypatch.context() as mp:
        _no_certify(mp)
        assert errors() == new
    if bad == "nan":
        assert all(issubclass(t, ValueError) and "finite" in m for t, m in new)
    if bad == "overflow":  # finite inputs, non-finite gradients: the check's own refusal
        assert new[0][0] is NonFiniteExamples


def test_rows_that_overflow_from_finite_factors_get_the_check(monkeypatch):
    """float32: a = x ~1e37 and g ~1e3 both finite, their product g a^T overflows (no NaN or inf
    in the pass): not certified, and the check refuses the examples as before."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).eval()
    with torch.no_grad():
        m[0].weight.copy_(1e-30 * torch.randn(5, 6, generator=g))
        m[2].weight.copy_(1e3 * torch.randn(4, 5, generator=g))
    fm = functional_model(m, F.cross_entropy)
    x, y = torch.randn(4, 6, generator=g) * 1e37, torch.randint(0, 4, (4,), generator=g)
    io = layer_grads._certified.__globals__["_mlp_io"].mlp_io(
        m, F.cross_entropy, dict(fm.params), (x,), {}, y, ("0", "2"))
    assert all(bool(torch.isfinite(t).all()) for pair in io.values() for t in pair)
    assert not bool(torch.isfinite(io["0"][1][:, :, None] * io["0"][0][:, None, :]).all())
    assert certified_plan(layer_plan(fm), _stacked(fm), (x, y)) is None
    with pytest.raises(NonFiniteExamples):
        check_plan(layer_plan(fm), fm.params, (x, y))


@pytest.mark.parametrize("kind,dtype,bias", CASES)
def test_unchecked_plans_applied_per_call_equal_the_checks(monkeypatch, kind, dtype, bias):
    """per_sample_layer_grads without a plan and layer_grads_stacked with an unchecked one (each
    call decides its plan) give the checked plan's gradients, torch.equal, batches of 1 and 5;
    and the stream's first batch with losses wanted (the engine's pass) too."""
    fm = functional_model(_model(kind, dtype, bias), F.cross_entropy)
    plan, stacked = layer_plan(fm), _stacked(fm)

    def run():
        out = []
        for n in (1, 5):
            batch = _data(dtype, n, n)
            out.append(per_sample_layer_grads(fm, fm.params, batch))
            out.append(layer_grads_stacked(plan, stacked, batch))
            losses = []
            out.append(layer_grads_stream(plan)[0](stacked, batch, losses=losses))
            out.append(losses[0] if losses else None)
        return out

    new = run()
    with monkeypatch.context() as mp:
        _no_certify(mp)
        old = run()
    for x, y in zip(new, old, strict=True):
        if isinstance(x, torch.Tensor) or x is None:
            # losses wanted: the check, as before (set for 5 examples, not for 1)
            assert (x is None and y is None) or torch.equal(x, y)
        else:
            _same_lg(x, y)


def _outcome(call):
    """(error type, message) of ``call``, or ("ok", its LayerGrads' dense rows)."""
    try:
        lg = call()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return "ok", lg.to_dense()


def _both_paths(monkeypatch, calls):
    """Each call's outcome with the certified path and with the check alone (as before issue 14)."""
    new = [_outcome(c) for c in calls]
    with monkeypatch.context() as mp:
        _no_certify(mp)
        old = [_outcome(c) for c in calls]
    return new, old


def _apply_paths(plan, stacked, batch):
    """The unchecked plan applied per call: layer_grads_stacked, the stream's first batch."""
    return [lambda: layer_grads_stacked(plan, stacked, batch),
            lambda: layer_grads_stream(plan)[0](stacked, batch)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("row", [3, 6])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_example_past_the_first_three_is_refused_as_before(monkeypatch, dtype, row,
                                                                           value):
    """Review RA F1: the certification reads only the first 3 examples' rows; a NaN/inf input
    at row >= 3 is refused by layer_grads_stacked (unchecked plan) and the stream with the
    check's error, naming the row, not returned as NaN rows."""
    fm = functional_model(_model("mlp", dtype), F.cross_entropy)
    x, y = _data(dtype, 7)
    x[row, 2] = value
    new, old = _both_paths(monkeypatch, _apply_paths(layer_plan(fm), _stacked(fm), (x, y)))
    assert new == old
    assert all(t is ValueError and f"row {row}" in m for t, m in new)


def test_an_empty_batch_gets_the_libraries_error(monkeypatch):
    """Review RA F2: B = 0 raises the check's "expected a non-empty batch" (not torch's max()
    RuntimeError); certified_plan itself gives None on it (the check then raises)."""
    fm = functional_model(_model("mlp", torch.float32), F.cross_entropy)
    x, y = _data(torch.float32, 4)
    batch, plan, stacked = (x[:0], y[:0]), layer_plan(fm), _stacked(fm)
    assert certified_plan(plan, stacked, batch) is None
    new, old = _both_paths(monkeypatch, _apply_paths(plan, stacked, batch))
    assert new == old
    assert all(t is ValueError and "non-empty batch" in m for t, m in new)


def test_a_stacked_key_naming_a_fixed_weight_is_refused_by_name(monkeypatch):
    """Review RA F3: {attributed key, fixed key} in stacked with an unchecked plan: the fixed
    weight is not overridden (finite gradients at 3 W0 before the fix): layer_grads_stacked and
    the stream's first batch raise the check's error naming the key; certified_plan gives None."""
    fm = functional_model(_model("mlp", torch.float32), F.cross_entropy, params=["4.weight"])
    plan = layer_plan(fm)
    bad = {**_stacked(fm), "0.weight": (3 * fm.fixed["0.weight"])[None]}
    batch = _data(torch.float32, 5)
    assert certified_plan(plan, bad, batch) is None
    new, old = _both_paths(monkeypatch, _apply_paths(plan, bad, batch))
    assert new == old
    assert all(t is ValueError and "0.weight" in m for t, m in new)
