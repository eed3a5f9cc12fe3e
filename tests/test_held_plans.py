"""Checked capture plans held in the feature methods' prepared state (issue 14, stop 19).

``prepare`` checks each capture plan once (on the first training batch's first 3 examples) and
keeps its decisions as plain values; ``score``/``self_score`` apply them without checking again.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from plan_counting import count_plan_decisions
from torch import nn

from dattri_fn import functional_model, io
from dattri_fn.attribute.gradsim import GradSimState, grad_cos, grad_dot, tracin, tracin_cos
from dattri_fn.store_hash import state_hash
from dattri_fn.transforms.layer_grads import (
    PlanDecisions,
    check_plan,
    decided_plan,
    layer_grads_stacked,
    layer_grads_stream,
    layer_plan,
    plan_decisions,
)

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _init(module, seed):
    g = _gen(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    return module.eval()


class _DenseNorm(nn.Module):
    """An affine layer norm the capture engine does not know (not an nn.LayerNorm): its
    parameters stay dense (vmap(grad)), as an nn.LayerNorm's did before norms were captured."""

    def __init__(self, D):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class _Seq(nn.Module):
    """Embedding -> Linear on [B, T, D] -> a layer norm (dense parameters) -> mean -> Linear."""

    def __init__(self, V=7, D=4, c=3):
        super().__init__()
        self.emb, self.lin, self.norm, self.head = (nn.Embedding(V, D), nn.Linear(D, D),
                                                    _DenseNorm(D), nn.Linear(D, c))

    def forward(self, idx):
        return self.head(self.norm(torch.tanh(self.lin(self.emb(idx)))).mean(1))


class _Mixing(nn.Module):
    """Subtracts the batch mean: example i's output depends on the others (the check fails)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True) + 0.5 * h)


class _Tied(nn.Module):
    """``b``'s weight is also read through ``W.T``: not capturable, so the check drops ``b``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 5)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + h @ self.b.weight.T


class _Branchy(nn.Module):
    """Python control flow on a tensor's value, every parameter captured: vmap cannot run it (the
    factored pass takes checkpoints one by one and never tries)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.sum() > 1e9:
            h = h * 0
        return self.b(h)


def _mlp(seed=0):
    return _init(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), seed)


def _xy(seed, n):
    g = _gen(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _tokens(seed, n, T):
    g = _gen(seed)
    return torch.randint(0, 7, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)


def _ckpts(fm, C, seed=1):
    g = _gen(seed)
    return [fm.params] + [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                           for k, v in fm.params.items()} for _ in range(C - 1)]


def _counting(monkeypatch):
    """Count the plan decisions: the check's and a certified MLP's (tests/plan_counting.py)."""
    return count_plan_decisions(monkeypatch)


BUILDERS = {
    "grad_dot": (lambda fm: grad_dot(fm), 1),
    "grad_cos": (lambda fm: grad_cos(fm), 1),
    "tracin": (lambda fm: tracin(fm, lrs=[0.3, 0.2]), 2),
    "tracin_cos": (lambda fm: tracin_cos(fm, lrs=[0.3, 0.2]), 2),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("model", ["mlp", "seq", "branchy"])
def test_prepared_state_gives_the_scores_of_a_call_that_checks_itself(name, model, monkeypatch):
    """score/self_score(prepare(train)) == score/self_score(()) (torch.equal); one checkpoint:
    prepare checks once, score and self_score never; several (TracIn, C = 2): prepare checks
    nothing and each call checks once, as with () (test and train share the check)."""
    build, C = BUILDERS[name]
    if model != "seq":
        module = _mlp() if model == "mlp" else _init(_Branchy().double(), 4)
        fm = functional_model(module, F.cross_entropy)
        train, test = [_xy(1, 5), _xy(2, 4)], _xy(3, 3)
    else:
        fm = functional_model(_init(_Seq().double(), 1), F.cross_entropy)
        train, test = [_tokens(1, 5, 4), _tokens(2, 4, 4)], _tokens(3, 3, 5)
    params = _ckpts(fm, C) if C > 1 else fm.params
    m = build(fm)
    calls = _counting(monkeypatch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        state = m.prepare(params, train)
        assert isinstance(state, GradSimState) and state.test is None
        assert isinstance(state.train, PlanDecisions) == (C == 1) and len(calls) == (C == 1)
        held = m.score(params, state, train, test), m.self_score(params, state, train)
        assert len(calls) == (1 if C == 1 else 2)
        fresh = m.score(params, (), train, test)
        fresh_self = m.self_score(params, (), train)
        assert len(calls) == (3 if C == 1 else 4)
    # the factored pass takes checkpoints one by one (plain autograd, no dense parameters): vmap,
    # which cannot run the branchy model, is never tried, so nothing warns
    assert not any("vmap cannot run" in str(w.message) for w in seen)
    assert torch.equal(held[0], fresh) and torch.equal(held[1], fresh_self)


def test_a_target_model_of_its_own_is_checked_on_test_batches_only(monkeypatch):
    """grad_dot(fm, target=fm2) with the prepared state == with () (torch.equal): prepare checks
    the train plan only (1 check), each score call checks the target on its own test batch (1)."""
    fm = functional_model(_mlp(), F.cross_entropy)
    target = functional_model(fm.module, lambda out, y: F.cross_entropy(out, y) * 2)
    train, test = [_xy(1, 6)], _xy(2, 3)
    m = grad_dot(fm, target=target)
    calls = _counting(monkeypatch)
    state = m.prepare(fm.params, train)
    assert len(calls) == 1 and state.train is not None and state.test is None
    S = m.score(fm.params, state, train, test)
    assert len(calls) == 2
    assert torch.equal(S, m.score(fm.params, (), train, test))


def test_a_target_reading_another_batch_layout_prepares_and_scores():
    """A target FunctionalModel that reads dict test batches while train batches are (x, y)
    tuples: prepare never feeds it training rows; scores equal those of the unprepared call."""
    fm = functional_model(_mlp(), F.cross_entropy)
    target = functional_model(fm.module, F.cross_entropy,
                              unpack=lambda b: ((b["x"],), {}, b["y"]))
    train = [_xy(1, 6)]
    x, y = _xy(2, 3)
    test = {"x": x, "y": y}
    m = grad_dot(fm, target=target)
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    assert S.shape == (6, 3)
    assert torch.equal(S, m.score(fm.params, (), train, test))


class _ReadOnce:
    """A re-iterable that yields its batches on the first pass only (a loader over a stream)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):  # a pass counts once its first batch is read
        def read():
            self.passes += 1
            yield from self.batches if self.passes == 1 else []

        return read()


def test_prepare_reads_nothing_that_is_not_in_memory(monkeypatch):
    """A loader passed to prepare is not iterated (state empty), so score streams all of it:
    scores == those of the list; None and a first batch of one example check nothing either."""
    fm = functional_model(_mlp(), F.cross_entropy)
    batches, test = [_xy(1, 4), _xy(2, 3)], _xy(3, 2)
    m = grad_dot(fm)
    calls = _counting(monkeypatch)
    once = _ReadOnce(batches)
    state = m.prepare(fm.params, once)
    assert state == GradSimState() and once.passes == 0 and not calls
    assert m.prepare(fm.params, None) == GradSimState()
    assert m.prepare(fm.params, [_xy(4, 1), *batches]) == GradSimState() and not calls
    assert torch.equal(m.score(fm.params, state, once, test), m.score(fm.params, (), batches, test))
    assert once.passes == 1


@pytest.mark.parametrize("C", [1, 2])
@pytest.mark.parametrize("case", ["mlp", "seq", "tied", "mixing"])
def test_decided_plan_applies_what_check_plan_decided(case, C):
    """decided_plan(plan, plan_decisions(check_plan(plan, p, b))) gives the gradients of the
    checked plan (torch.equal) on batches of other sizes and lengths; the decisions are plain."""
    mods = {"mlp": (_mlp, lambda s, n: _xy(s, n)),
            "seq": (lambda: _init(_Seq().double(), 1), lambda s, n: _tokens(s, n, 3 + s % 2)),
            "tied": (lambda: _init(_Tied().double(), 2), lambda s, n: _xy(s, n)),
            "mixing": (lambda: _init(_Mixing().double(), 3), lambda s, n: _xy(s, n))}
    make, data = mods[case]
    fm = functional_model(make(), F.cross_entropy)
    plan = layer_plan(fm)
    stacked = {k: torch.stack([p[k] for p in _ckpts(fm, C)]) for k in fm.params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        checked = check_plan(plan, stacked, data(0, 3))
        d = plan_decisions(checked)
        again = decided_plan(plan, d)
        assert again.checked and again.shapes == () and list(again.captured) == list(d.layers)
        assert (again.dense, again.loop, again.layout) == (checked.dense, checked.loop,
                                                           checked.layout)
        for seed, n in ((1, 5), (2, 2), (3, 7)):
            b = data(seed, n)
            assert torch.equal(layer_grads_stacked(again, stacked, b).to_dense(),
                               layer_grads_stacked(checked, stacked, b).to_dense())
    assert (case == "tied") == (list(d.layers) == ["a"])
    assert d.dense == (case == "mixing")
    leaves = [d.dense, d.loop, *d.layers, *(x for pair in d.layout for x in pair)]
    assert all(isinstance(v, (bool, str)) for v in leaves)


def test_plan_decision_errors():
    """Unchecked plans and decisions about layers a plan does not capture are refused by name."""
    fm = functional_model(_mlp(), F.cross_entropy)
    plan = layer_plan(fm)
    with pytest.raises(TypeError, match=r"plan_decisions\(plan=...\): expected a LayerPlan from "
                                        r"check_plan, got an unchecked plan"):
        plan_decisions(plan)
    d = plan_decisions(check_plan(plan, fm.params, _xy(0, 3)))
    with pytest.raises(ValueError, match=r"decided_plan\(decisions=...\): expected decisions "
                                         r"about layers among the plan's"):
        decided_plan(plan, d._replace(layers=("9",)))
    with pytest.raises(TypeError, match=r"decided_plan\(decisions=...\): expected PlanDecisions"):
        decided_plan(plan, tuple(d))
    with pytest.raises(TypeError, match=r"decided_plan\(plan=...\): expected a LayerPlan"):
        decided_plan(None, d)


def test_a_stream_shows_the_plan_it_holds():
    """layer_grads_stream(plan): held() is the plan until a batch of >= 2 came, then its check
    (== check_plan on that batch's decisions); apply == layer_grads_fn's (torch.equal)."""
    fm = functional_model(_mlp(), F.cross_entropy)
    plan = layer_plan(fm)
    stacked = {k: v[None] for k, v in fm.params.items()}
    apply, held = layer_grads_stream(plan)
    apply(stacked, _xy(0, 1))
    assert held() is plan
    first = _xy(1, 4)
    got = apply(stacked, first)
    assert held().checked
    assert plan_decisions(held()) == plan_decisions(check_plan(plan, stacked, first))
    assert torch.equal(got.to_dense(), layer_grads_stacked(held(), stacked, first).to_dense())


def test_the_state_is_saved_loaded_and_hashed_like_any_state(tmp_path):
    """io.save/io.load(prepare(...)) == the state, scores torch.equal with it; state_hash works."""
    fm = functional_model(_mlp(), F.cross_entropy)
    train, test = [_xy(1, 5)], _xy(2, 3)
    m = grad_dot(fm)
    state = m.prepare(fm.params, train)
    back = io.load(io.save(state, tmp_path / "s.pt"))
    assert back == state and type(back) is GradSimState and type(back.train) is PlanDecisions
    assert torch.equal(m.score(fm.params, back, train, test), m.score(fm.params, state, train, test))
    assert state_hash(back) == state_hash(state)


def test_state_errors():
    """A state of another kind, or plan decisions for a plain loss, are refused by name."""
    fm = functional_model(_mlp(), F.cross_entropy)
    train = [_xy(1, 5)]
    state = grad_dot(fm).prepare(fm.params, train)
    with pytest.raises(TypeError, match=r"grad_dot\(state=...\): expected the GradSimState "
                                        r"returned by grad_dot's prepare \(or \(\)\), got dict"):
        grad_dot(fm).score(fm.params, {}, train, train)
    with pytest.raises(ValueError, match=r"tracin\(state=...\): expected an empty GradSimState"):
        tracin(fm.loss, lrs=[1.0]).score([fm.params], state, train, train)
    with pytest.raises(ValueError, match=r"grad_dot\(params=...\): expected the model's parameter "
                                         r"shapes"):
        grad_dot(fm).prepare({k: v[..., :1] for k, v in fm.params.items()}, train)
    with pytest.raises(ValueError, match=r"grad_dot\(train=...\)"):
        grad_dot(fm).prepare(fm.params, (torch.randn(4, 7, dtype=DT), torch.zeros(4).long()))


@pytest.mark.parametrize("projection", ["dense", "kronecker"])
def test_trak_features_apply_held_decisions_without_a_check(projection, monkeypatch):
    """feature_calls(..., decisions=calls.plan()) gives the features of a call that checks its
    first batch (torch.equal) with no check; calls.plan() is None until a batch of >= 2 came."""
    from dattri_fn.attribute.trak_features import FeatureConfig, feature_calls

    fm = functional_model(_mlp(), F.cross_entropy)
    ckpts = _ckpts(fm, 2)
    proj = (2, 3) if projection == "kronecker" else 5
    cfg = FeatureConfig(fm.loss, None, layer_plan(fm), list(fm.params), proj, "gaussian", 4,
                        None, None, None, {}, None, projection=projection)
    train, test = _xy(1, 6), _xy(2, 3)
    calls = feature_calls("trak", ckpts, cfg)
    assert calls.plan() is None
    want = calls.packed(train), calls.packed(test)
    decisions = calls.plan()
    assert isinstance(decisions, PlanDecisions)
    checks = _counting(monkeypatch)
    held = feature_calls("trak", ckpts, cfg, decisions)
    assert held.plan() == decisions
    assert torch.equal(held.packed(test), want[1]) and torch.equal(held.packed(train), want[0])
    assert not checks
    plain = cfg._replace(plan=None, keys=None, projection="dense")
    with pytest.raises(ValueError, match=r"trak\(state=...\): expected a state without plan "
                                         r"decisions"):
        feature_calls("trak", ckpts, plain, decisions)


@pytest.mark.parametrize("case", ["mlp", "seq", "tied", "mixing"])
def test_checking_the_compared_examples_alone_decides_as_a_larger_batch(case):
    """plan_decisions(check_plan(plan, p, b[:3])) == that of b[:6] (the 3-row check skips its
    narrowing forward); the reference rows equal one autograd pass per example (torch.equal)."""
    from dattri_fn.transforms.layer_grads_paths import _autodiff_rows, _loop_grads

    mods = {"mlp": (_mlp, lambda n: _xy(5, n)),
            "seq": (lambda: _init(_Seq().double(), 1), lambda n: _tokens(5, n, 4)),
            "tied": (lambda: _init(_Tied().double(), 2), lambda n: _xy(5, n)),
            "mixing": (lambda: _init(_Mixing().double(), 3), lambda n: _xy(5, n))}
    make, data = mods[case]
    fm = functional_model(make(), F.cross_entropy)
    plan = layer_plan(fm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for C in (1, 2):
            stacked = {k: torch.stack([p[k] for p in _ckpts(fm, C)]) for k in fm.params}
            assert plan_decisions(check_plan(plan, stacked, data(3))) == plan_decisions(
                check_plan(plan, stacked, data(6)))
    head = data(3)
    got, want = _autodiff_rows(fm.loss, fm.params, head), _loop_grads(fm.loss, fm.params, head)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_stream_runs_one_shapes_forward_per_signature(monkeypatch):
    """At C = 2 a decided plan's stream runs output_shapes once per input signature (was once per
    batch), and each batch's gradients == layer_grads_stacked(decided plan) (torch.equal)."""
    from dattri_fn.transforms import layer_grads_paths as paths

    fm = functional_model(_init(_Seq().double(), 1), F.cross_entropy)
    plan = layer_plan(fm)
    stacked = {k: torch.stack([p[k] for p in _ckpts(fm, 2)]) for k in fm.params}
    decided = decided_plan(plan, plan_decisions(check_plan(plan, {k: v[:1] for k, v in
                                                                  stacked.items()},
                                                           _tokens(0, 3, 4))))
    batches = [_tokens(1, 5, 4), _tokens(2, 5, 4), _tokens(3, 4, 4), _tokens(4, 5, 4)]
    want = [layer_grads_stacked(decided, stacked, b).to_dense() for b in batches]
    forwards, real = [], paths.output_shapes
    monkeypatch.setattr(paths, "output_shapes", lambda *a, **k: forwards.append(1) or real(*a, **k))
    apply, held = layer_grads_stream(decided)
    got = [apply(stacked, b).to_dense() for b in batches]
    assert len(forwards) == 2 and len(held().shapes) == 2  # [5, 4] and [4, 4] tokens
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert plan_decisions(held()) == plan_decisions(decided)


def test_decisions_from_another_model_are_refused_naming_the_state():
    """A GradSimState / TRAKState whose plan decisions name layers this model's plan does not
    capture is refused as the method's ``state`` argument, not deep inside decided_plan."""
    from dattri_fn.attribute.trak import classification_margin_loss, trak

    g = torch.Generator().manual_seed(0)
    big = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                        nn.Linear(6, 3)).double().eval()
    small = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    for p in [*big.parameters(), *small.parameters()]:
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    x = torch.randn(5, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=g)
    fb, fs = functional_model(big, F.cross_entropy), functional_model(small, F.cross_entropy)
    other = grad_dot(fb).prepare(fb.params, [(x, y)])
    with pytest.raises(ValueError, match=r"grad_dot\(state=...\): expected the GradSimState of "
                                         r"this grad_dot's prepare"):
        grad_dot(fs).score(fs.params, other, [(x, y)], (x, y))
    tb = trak(functional_model(big, classification_margin_loss), proj_dim=4, seed=0)
    ts = trak(functional_model(small, classification_margin_loss), proj_dim=4, seed=0)
    t_other = tb.prepare(fb.params, [(x, y)])
    t_mine = ts.prepare(fs.params, [(x, y)])
    with pytest.raises(ValueError, match=r"trak\.score\(state=...\): expected the TRAKState of "
                                         r"this trak's prepare"):
        ts.score(fs.params, t_mine._replace(plan=t_other.plan), [(x, y)], (x, y))
