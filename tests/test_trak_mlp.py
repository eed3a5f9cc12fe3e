"""trak_mlp: a plain MLP's margin pass equals the capture engine's bit for bit, TRAK through it
(no plan check) equals TRAK through the engine and its check, and anything else is left to them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import trak_features, trak_mlp
from dattri_fn.attribute.trak import classification_margin_loss, classification_weight_loss, trak
from dattri_fn.transforms import capture
from dattri_fn.transforms import layer_grads as lgm
from dattri_fn.transforms.layer_grads import layer_plan
from dattri_fn.transforms.layers import batched_io

_PASS_PLAN = trak_mlp.pass_plan


def _margin_pass(on: bool, monkeypatch) -> None:
    """TRAK's margin pass on (trak_mlp.pass_plan as shipped) or off (the engine and its check)."""
    monkeypatch.setattr(trak_mlp, "pass_plan", _PASS_PLAN if on else lambda plan: None)


def _mlp(seed: int, acts: list, bias: bool, dtype, sizes=(13, 9, 7)) -> nn.Module:
    torch.manual_seed(seed)
    if len(sizes) == 2:
        return nn.Linear(*sizes, bias=bias).to(dtype).eval()
    mods = [nn.Linear(sizes[0], sizes[1], bias=bias)]
    for i in range(1, len(sizes) - 1):
        mods += [a() for a in acts] + [nn.Linear(sizes[i], sizes[i + 1], bias=bias)]
    return nn.Sequential(*mods).to(dtype).eval()


def _data(seed: int, B: int, width: int, classes: int, dtype):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(B, width, generator=g, dtype=dtype),
            torch.randint(0, classes, (B,), generator=g))


def _layers(m: nn.Module) -> tuple:
    return tuple(n for n, c in m.named_modules() if type(c) is nn.Linear)


_SHAPES = [([], (13, 7)), ([], (13, 9, 7)), ([nn.Tanh], (13, 9, 7)), ([nn.ReLU], (13, 9, 6, 7)),
           ([nn.Sigmoid, nn.Tanh], (13, 9, 7)), ([nn.Tanh], (5, 1, 3)), ([], (13, 1)),
           ([nn.Tanh], (13, 9, 1)), ([], (13, 2))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("acts", "sizes"), _SHAPES)
def test_margin_io_equals_the_engine_bit_for_bit(dtype, acts, sizes):
    """a_l, g_l = dm/dz_l of m = sum_i margin_i and the margins [B] are torch.equal to
    batched_io's (the capture engine) for lr and MLPs, bias or not, B = 1 (a width-1 hidden
    layer then has column-major strides), 7, 300; K = 1 (a binary logit, 0/1 labels: the
    loss's own graph), K = 2 and K = 7 (trak_mlp._margin_head); logits far apart (exp
    underflows to 0 off the label: the sign of those zeros)."""
    for seed, (B, bias) in enumerate([(1, True), (7, False), (300, True)]):
        m = _mlp(seed, acts, bias, dtype, sizes)
        x, y = _data(seed, B, sizes[0], max(2, sizes[-1]), dtype)
        layers = _layers(m)
        if seed == 2:  # logits thousands apart: exp(s - r) underflows to 0 in float32/64
            with torch.no_grad():
                m.get_submodule(layers[-1]).weight.mul_(3000)
        fm = functional_model(m, classification_margin_loss)
        ref_rows, rows = [], []
        ref = batched_io(capture.tap(m, layers), classification_margin_loss, dict(fm.params),
                         (x,), {}, y, None, x, losses=ref_rows)
        got = trak_mlp.margin_io(layer_plan(fm), dict(fm.params), (x, y), rows)
        assert list(got) == list(layers)
        for n in layers:
            assert torch.equal(got[n][0], ref[n][0]) and torch.equal(got[n][1], ref[n][1])
            assert torch.equal(got[n][1].signbit(), ref[n][1].signbit())  # zeros' signs too
        assert torch.equal(rows[0], ref_rows[0])
        if seed == 2 and sizes[-1] > 2:  # (K = 2: the one other logit is its own logsumexp)
            assert bool((ref[layers[-1]][1] == 0).any())  # the underflow case is exercised


def _scores(m, train, test, *, fast: bool, C: int = 3, monkeypatch=None, **kw):
    """(state, scores, self-scores, plan checks run) of TRAK with the margin pass on or off."""
    out = functional_model(m, classification_margin_loss)
    w = functional_model(m, classification_weight_loss)
    g = torch.Generator().manual_seed(5)
    params = [dict(out.params)] + [{k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                                    for k, v in out.params.items()} for _ in range(C - 1)]
    calls, real = [], lgm._check
    monkeypatch.setattr(lgm, "_check", lambda *a, **k: calls.append(1) or real(*a, **k))
    _margin_pass(fast, monkeypatch)
    method = trak(out, weight_fn=w, **{"proj_dim": 5, "damping": 0.1, "seed": 3, **kw})
    state = method.prepare(params, train)
    return (state, method.score(params, state, train, test),
            method.self_score(params, state, train), len(calls))


def _same_state(a, b) -> bool:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif hasattr(x, "factors"):  # LayerGrads
            if not (torch.equal(x.dense, y.dense) and all(
                    torch.equal(p, q) for k in x.factors for p, q in zip(x.factors[k],
                                                                         y.factors[k], strict=True))):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("acts", "sizes"), [([], (13, 7)), ([nn.Tanh], (13, 9, 7))])
@pytest.mark.parametrize("kw", [{}, {"proj_dim": None}, {"cache_features": False},
                                {"chunk_size": 4}])
def test_trak_through_the_margin_pass_equals_the_engine(dtype, acts, sizes, kw, monkeypatch):
    """State (kernel, features, weights, plan decisions, factors), scores and self-scores
    torch.equal with the margin pass on and off; on, the plan check never runs, except on a
    first batch of 1 example (checked, not held, as before: it decides nothing). Batches of 9
    and a short last one of 3, with and without a first one of 1; C = 3 checkpoints (and
    C = 1 in float64)."""
    k, o = sizes[0], sizes[-1]
    for C in (3, 1) if dtype == torch.float64 else (3,):
        for one in (False, True):
            m = _mlp(0, acts, True, dtype, sizes)
            train = [_data(1, 1, k, o, dtype)] * one + [_data(2, 9, k, o, dtype),
                                                        _data(3, 3, k, o, dtype)]
            test = _data(4, 6, k, o, dtype)
            ref = _scores(m, train, test, fast=False, C=C, monkeypatch=monkeypatch, **kw)
            got = _scores(m, train, test, fast=True, C=C, monkeypatch=monkeypatch, **kw)
            assert _same_state(got[0], ref[0])
            assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
            assert ref[3] >= 1 and got[3] == int(one)


def _tied():
    torch.manual_seed(0)
    lin = nn.Linear(9, 9).double()
    return nn.Sequential(nn.Linear(13, 9).double(), nn.Tanh(), lin, nn.Tanh(), lin,
                         nn.Linear(9, 7).double()).eval()


def _hooked():
    m = _mlp(0, [nn.Tanh], True, torch.float64)
    m[0].register_forward_hook(lambda mod, i, o: o * 2)
    return m


def _gelu():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 9), nn.GELU(), nn.Linear(9, 7)).double().eval()


@pytest.mark.parametrize("make", [_tied, _hooked, _gelu])
def test_other_models_are_left_to_the_engine_and_its_check(make, monkeypatch):
    """A reused Linear, a hook, an unknown activation: the check runs, the same results.
    (A fresh module per run, so each side is independent; the reused-Linear fault B found,
    a module left holding a checkpoint's tensors, is fixed by module_call at 42c6b29 and
    tested in tests/test_module_call.py.)"""
    train, test = [_data(2, 9, 13, 7, torch.float64)], _data(4, 6, 13, 7, torch.float64)
    ref = _scores(make(), train, test, fast=False, monkeypatch=monkeypatch)
    got = _scores(make(), train, test, fast=True, monkeypatch=monkeypatch)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert got[3] == ref[3] == 1


def test_other_calls_are_left_to_the_engine():
    """Another loss, label dtype, input rank, dtype mix, inference_mode, vmap: None."""
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    fm = functional_model(m, classification_margin_loss)
    plan, st = layer_plan(fm), dict(fm.params)
    x, y = _data(0, 8, 13, 7, torch.float32)
    assert trak_mlp.margin_io(plan, st, (x, y)) is not None
    assert trak_mlp.margin_io(layer_plan(functional_model(m, F.cross_entropy)), st, (x, y)) is None
    assert trak_mlp.certified(layer_plan(functional_model(m, F.cross_entropy))) is None
    assert trak_mlp.margin_io(plan, st, (x, y.int())) is None
    assert trak_mlp.margin_io(plan, st, (x[:, None], y)) is None
    assert trak_mlp.margin_io(plan, st, (x.double(), y)) is None
    with torch.inference_mode():
        assert trak_mlp.margin_io(plan, st, (x, y)) is None
    seen = []
    torch.func.vmap(lambda r: seen.append(trak_mlp.margin_io(plan, st, (r[None], y[:1]))) or r)(x)
    assert seen == [None]


def _refusal(m, train, fast: bool, monkeypatch):
    out = functional_model(m, classification_margin_loss)
    w = functional_model(m, classification_weight_loss)
    _margin_pass(fast, monkeypatch)
    with pytest.raises(Exception) as err:  # noqa: PT011 -- compared between the two paths
        trak(out, weight_fn=w, proj_dim=5, damping=0.1).prepare(dict(out.params), train)
    return type(err.value), str(err.value)


@pytest.mark.parametrize("later", [False, True])
@pytest.mark.parametrize("bad", ["nan0", "nan5", "float_label", "width", "label_range"])
def test_bad_examples_get_the_same_errors(bad, later, monkeypatch):
    """A NaN example (first 3 rows: the check's refusal; later: TRAK's scan), a float label, a
    wrong input width, a label out of range, in the first batch (the one that decides the plan)
    or the second: the same error class and message with the margin pass as without."""
    m = _mlp(0, [nn.Tanh], True, torch.float64)
    x, y = _data(1, 9, 13, 7, torch.float64)
    if bad == "nan0":
        x[1, 2] = float("nan")
    elif bad == "nan5":
        x[5, 2] = float("nan")
    elif bad == "float_label":
        y = y.double()
    elif bad == "label_range":
        y[4] = 7
    else:
        x = x[:, :12]
    train = [(x, y), _data(2, 4, 13, 7, torch.float64)]
    if later:
        train = train[::-1]
    got, ref = _refusal(m, train, True, monkeypatch), _refusal(m, train, False, monkeypatch)
    if bad == "label_range" and not later:
        # the check compared the first rows under vmap, where labels cannot be read first; the
        # margin pass reads them eagerly (margins' own check): the same class, argument and range
        want = ("classification_margin_loss(labels=...): expected class labels in [0, 7) for 7 "
                "logits, got ")
        assert got[0] is ref[0] is ValueError and got[1].startswith(want)
        assert ref[1].startswith(want) and got[1].endswith("got label 7.")
        return
    assert got == ref


@pytest.mark.parametrize("which", ["train", "test", "both"])
@pytest.mark.parametrize("kw", [{}, {"proj_dim": None}, {"cache_features": False}])
def test_inputs_that_require_grad(kw, which, monkeypatch):
    """A train and a test batch whose input requires grad (a leaf kept for saliency, an
    augmentation's output): the same state, scores and self-scores as the engine's (whose probes
    read the input detached), none of them requiring grad (review RB F1: the pass kept the
    caller's input as layer 1's ``a``; prepare then failed in the float64 Cholesky and score
    returned a graph into the test input)."""
    m = _mlp(0, [nn.Tanh], True, torch.float32)
    x, y = _data(2, 9, 13, 7, torch.float32)
    xt, yt = _data(4, 6, 13, 7, torch.float32)
    train = [(x.requires_grad_(which != "test"), y)]
    test = (xt.requires_grad_(which != "train"), yt)
    ref = _scores(m, train, test, fast=False, monkeypatch=monkeypatch, **kw)
    got = _scores(m, train, test, fast=True, monkeypatch=monkeypatch, **kw)
    assert _same_state(got[0], ref[0])
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert got[3] == 0
    for t in (*got[0], got[1], got[2]):
        for u in (t.factors.values() if hasattr(t, "factors") else [t]):
            for v in (u if isinstance(u, tuple) else [u]):
                assert not (isinstance(v, torch.Tensor) and v.requires_grad)


def _count_passes(monkeypatch) -> dict:
    """Count margin_io's passes that ran (non-None) and the capture engine's stream calls."""
    seen = {"margin": 0, "engine": 0}
    real_io, real_stream = trak_mlp.margin_io, trak_features.layer_grads_stream

    def margin_io(*a, **k):
        io = real_io(*a, **k)
        seen["margin"] += io is not None
        return io

    def stream(plan):
        apply, held = real_stream(plan)

        def counted(*a, **k):
            seen["engine"] += 1
            return apply(*a, **k)
        return counted, held

    monkeypatch.setattr(trak_mlp, "margin_io", margin_io)
    monkeypatch.setattr(trak_features, "layer_grads_stream", stream)
    return seen


@pytest.mark.parametrize("kw", [{}, {"cache_features": False}])
def test_prepare_score_and_self_score_take_the_margin_pass(kw, monkeypatch):
    """The certified MLP's every capture pass is margin_io's, none the engine's, in prepare
    (2 train batches x C = 3), score and self_score (review RB F3: switching the pass off in
    score, e.g. ``pass_plan`` returning None for a prepared state, passed every equality test).
    With the pass off every pass is the engine's (the counter itself works)."""
    m = _mlp(0, [nn.Tanh], True, torch.float64)
    train = [_data(2, 9, 13, 7, torch.float64), _data(3, 3, 13, 7, torch.float64)]
    test = _data(4, 6, 13, 7, torch.float64)
    out = functional_model(m, classification_margin_loss)
    w = functional_model(m, classification_weight_loss)
    g = torch.Generator().manual_seed(5)
    params = [dict(out.params)] + [{k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                                    for k, v in out.params.items()} for _ in range(2)]
    counts = {}
    for on in (True, False):
        _margin_pass(on, monkeypatch)
        seen = _count_passes(monkeypatch)
        method = trak(out, weight_fn=w, **{"proj_dim": 5, "damping": 0.1, "seed": 3, **kw})
        phases = []
        state = method.prepare(params, train)
        phases.append(dict(seen))
        method.score(params, state, train, test)
        phases.append(dict(seen))
        method.self_score(params, state, train)
        phases.append(dict(seen))
        counts[on] = phases
    # cumulative counts after prepare, score, self_score
    re_pass = 0 if kw.get("cache_features", True) else 6  # train passes again without the cache
    assert counts[True] == [{"margin": 6, "engine": 0}, {"margin": 9 + re_pass, "engine": 0},
                            {"margin": 9 + 2 * re_pass, "engine": 0}]
    assert all(c["margin"] == 0 for c in counts[False]) and counts[False][-1]["engine"] > 0


def test_a_class_patched_linear_forward_is_left_to_the_engine(monkeypatch):
    """A forward replaced on nn.Linear itself is what the model runs: the margin pass declines
    (mlp_io.plain_context), so TRAK equals the engine path (it was 0.685 off before)."""
    real = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: 2 * real(self, x))
    m = _mlp(0, [nn.Tanh], True, torch.float64)
    train, test = [_data(1, 9, 13, 7, torch.float64)], _data(2, 5, 13, 7, torch.float64)
    fast = _scores(m, train, test, fast=True, monkeypatch=monkeypatch)
    slow = _scores(m, train, test, fast=False, monkeypatch=monkeypatch)
    assert torch.equal(fast[1], slow[1]) and torch.equal(fast[2], slow[2])
    assert fast[3] == slow[3] > 0  # the plan check ran on both


def test_one_batch_checks_its_labels_and_certifies_its_chain_once(monkeypatch):
    """Stop 26: margin_pass's checkpoints share what does not depend on the params (margin_io's
    memo): the labels are checked and the chain certified once per batch, not once per
    checkpoint; the gradients and margins are those of separate margin_io calls (torch.equal)."""
    net = _mlp(0, [nn.Tanh], True, torch.float32)
    fm = functional_model(net, classification_margin_loss)
    x, y = _data(0, 40, 13, 7, torch.float32)
    plan = trak_mlp.certified(layer_plan(fm))
    ckpts = [{k: v + 0.01 * c for k, v in fm.params.items()} for c in range(3)]
    stacked = {k: torch.stack([p[k] for p in ckpts]) for k in fm.params}
    seen = {"labels": 0, "chain": 0}
    real_labels, real_chain = trak_mlp._class_labels, trak_mlp.mlp_chain
    def counted(key, real):
        return lambda *a, **k: seen.__setitem__(key, seen[key] + 1) or real(*a, **k)

    monkeypatch.setattr(trak_mlp, "_class_labels", counted("labels", real_labels))
    monkeypatch.setattr(trak_mlp, "mlp_chain", counted("chain", real_chain))
    margins = []
    lg = trak_mlp.margin_pass(plan, stacked, (x, y), margins)
    assert seen == {"labels": 1, "chain": 1}
    for c, p in enumerate(ckpts):
        rows = []
        io = trak_mlp.margin_io(plan, p, (x, y), rows)
        assert torch.equal(rows[0], margins[c])
        for name, (a, g) in io.items():
            a2, g2 = lg.factors[name]
            assert torch.equal(a2[c, :, :a.shape[1]], a) and torch.equal(g2[c], g)
