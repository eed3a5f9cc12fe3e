"""Capture plans as values: built and checked once, then only read (dattri_fn.transforms.layer_grads)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.transforms import capture
from dattri_fn.transforms.layer_grads import (
    LayerGrads,
    LayerPlan,
    check_plan,
    layer_grads_stacked,
    layer_plan,
    per_sample_layer_grads,
)
from dattri_fn.transforms.layers import batched_io, input_signature, output_shapes, streamed_io

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
    """Embedding -> Linear used twice on [B, T, D] -> mean over T -> Linear (a dense layer
    norm's parameters next to the captured layers)."""

    def __init__(self, V=7, D=4, c=3):
        super().__init__()
        self.emb, self.lin, self.norm, self.head = (nn.Embedding(V, D), nn.Linear(D, D),
                                                    _DenseNorm(D), nn.Linear(D, c))

    def forward(self, idx):
        h = torch.tanh(self.lin(torch.tanh(self.lin(self.emb(idx)))))
        return self.head(self.norm(h).mean(1))


class _Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 16, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class _Branchy(nn.Module):
    """Python control flow on a tensor's value: vmap cannot run it (a loop fallback)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.s = nn.Linear(4, 5), nn.Linear(5, 3), nn.Parameter(torch.ones(5))

    def forward(self, x):
        h = torch.tanh(self.a(x)) * self.s
        if h.sum() > 1e9:
            h = h * 0
        return self.b(h)


class _SizeSwitch(nn.Module):
    """Reads its weight through ``W.T`` (not capturable) on batches above 4 rows only."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return h @ self.b.weight.T + self.b.bias if x.shape[0] > 4 else self.b(h)


class _Mixing(nn.Module):
    """Subtracts the batch mean: example i's output depends on the others."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True) + 0.5 * h)


def _mlp(seed):
    return _init(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), seed)


def _xy(seed, n, shape=(4,)):
    g = _gen(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _tokens(seed, n, T):
    g = _gen(seed)
    return torch.randint(0, 7, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)


def _snapshot(plan: LayerPlan):
    """Everything a use could change: the plan's fields, the tapped function's attributes,
    the model's parameters."""
    return (copy.deepcopy({f: getattr(plan, f) for f in LayerPlan._fields
                           if f not in ("model", "tapped")}),
            sorted(vars(plan.tapped)), copy.deepcopy(plan.tapped.specs),
            {k: v.clone() for k, v in plan.model.params.items()})


def _same_snapshot(a, b):
    assert a[:3] == b[:3]
    assert all(torch.equal(a[3][k], b[3][k]) for k in a[3])


def _stacked(fm, C=1, seed=0):
    g = _gen(seed)
    return {k: torch.stack([v] + [v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                                  for _ in range(C - 1)]) for k, v in fm.params.items()}


def _loop_ref(fm, params, batch):
    """``[B, P]``: one autograd pass per example (vmap cannot run every model here)."""
    rows = []
    for i in range(batch[0].shape[0]):
        live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(fm.loss(live, (batch[0][i], batch[1][i])), list(live.values()))
        rows.append(torch.cat([g.flatten() for g in gs]))
    return torch.stack(rows)


CASES = {
    "mlp": (lambda: _mlp(0), lambda s, n: _xy(s, n)),
    "seq": (lambda: _init(_Seq().double(), 1), lambda s, n: _tokens(s, n, 3 + s % 3)),
    "cnn": (lambda: _init(_Cnn().double(), 2), lambda s, n: _xy(s, n, (2, 4, 4))),
    "loop": (lambda: _init(_Branchy().double(), 3), lambda s, n: _xy(s, n)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("C", [1, 2])
def test_a_plan_is_not_changed_by_use(case, C):
    """snapshot(plan) before == after applying it (checked or not) to batches of two sizes."""
    build, data = CASES[case]
    fm = functional_model(build(), F.cross_entropy)
    stacked = _stacked(fm, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the loop case warns once, by design
        for plan in (layer_plan(fm), check_plan(layer_plan(fm), stacked, data(0, 5))):
            before = _snapshot(plan)
            for n in (5, 2, 7, 1):
                layer_grads_stacked(plan, stacked, data(n, n))
            _same_snapshot(before, _snapshot(plan))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("C", [1, 2])
def test_one_plan_for_two_batch_shapes_equals_two_fresh_plans(case, C):
    """G(plan checked on A, batch B) == G(plan checked on B, batch B), bit for bit, and == the
    dense per_sample_grad (1e-12), whatever batch came first."""
    build, data = CASES[case]
    fm = functional_model(build(), F.cross_entropy)
    stacked = _stacked(fm, C)
    A, B = data(1, 6), data(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        held = check_plan(layer_plan(fm), stacked, A)
        for batch in (B, A):
            fresh = check_plan(layer_plan(fm), stacked, batch)
            got = layer_grads_stacked(held, stacked, batch).to_dense()
            assert torch.equal(got, layer_grads_stacked(fresh, stacked, batch).to_dense())
            ref = torch.stack([_loop_ref(fm, {k: s[c] for k, s in stacked.items()}, batch)
                               for c in range(C)])
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_and_second_calls_are_bit_identical(case):
    """Call 1 == call 2 == a call after other batches (torch.equal), held plan or not; the
    public per_sample_layer_grads with a held plan equals it without."""
    build, data = CASES[case]
    fm = functional_model(build(), F.cross_entropy)
    batch = data(3, 5)
    stacked = _stacked(fm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for plan in (layer_plan(fm), check_plan(layer_plan(fm), fm.params, batch)):
            one = layer_grads_stacked(plan, stacked, batch).to_dense()
            two = layer_grads_stacked(plan, stacked, batch).to_dense()
            layer_grads_stacked(plan, stacked, data(4, 2))
            three = layer_grads_stacked(plan, stacked, batch).to_dense()
            assert torch.equal(one, two) and torch.equal(one, three)
        held = per_sample_layer_grads(fm, fm.params, batch,
                                      plan=check_plan(layer_plan(fm), fm.params, batch))
        assert torch.equal(held.to_dense(), per_sample_layer_grads(fm, fm.params, batch).to_dense())


def test_check_decides_once_what_use_reads():
    """The checked plan records the narrowed layers, the loop fallback and the layout; using it
    warns no more (the unchecked plan decides nothing)."""
    fm = functional_model(_init(_Branchy().double(), 3), F.cross_entropy)
    plan = layer_plan(fm)
    assert (plan.checked, plan.dense, plan.loop, plan.layout, plan.shapes) == (False, False, False,
                                                                             (), ())
    with pytest.warns(RuntimeWarning, match="vmap cannot run _Branchy"):
        checked = check_plan(plan, _stacked(fm, 2), _xy(0, 5))
    assert checked.checked and checked.loop and not checked.dense
    assert checked.layout == (("a", "flat"), ("b", "flat")) and checked.rest == ("s",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer_grads_stacked(checked, _stacked(fm, 2), _xy(1, 4))
    assert check_plan(checked, fm.params, _xy(2, 3)) is checked  # already checked: as it is
    seq = functional_model(_init(_Seq().double(), 1), F.cross_entropy)
    held = check_plan(layer_plan(seq), _stacked(seq, 2), _tokens(0, 4, 5))
    args = (_tokens(0, 4, 5)[0],)
    assert held.shapes == ((input_signature(args, {}),
                            output_shapes(held.tapped, {**seq.fixed, **seq.params}, args, {},
                                          seq.params["lin.weight"])),)


def test_a_batch_off_the_checked_path_is_dense_for_that_batch_only():
    """A batch the example did not show (W.T above 4 rows) is computed by vmap(grad) after a
    warning; the plan is unchanged and the next small batch is factored again, silently."""
    fm = functional_model(_init(_SizeSwitch().double(), 4), F.cross_entropy)
    plan = check_plan(layer_plan(fm), fm.params, _xy(0, 4))
    before = _snapshot(plan)
    stacked = _stacked(fm)
    with pytest.warns(RuntimeWarning, match="this batch's per-example gradients of _SizeSwitch"):
        big = layer_grads_stacked(plan, stacked, _xy(1, 6))
    assert not big.factors
    torch.testing.assert_close(big.to_dense()[0], per_sample_grad(fm.loss, fm.params, _xy(1, 6)),
                               rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(layer_grads_stacked(plan, stacked, _xy(2, 3)).factors) == ["a", "b"]
    _same_snapshot(before, _snapshot(plan))


def test_blocks_of_different_layouts_concatenate_densely():
    """LayerGrads.cat([dense block, factored block]) == cat of their to_dense() (bit for bit);
    its scores are the blocks' scores stacked (1e-12: products over other row counts)."""
    fm = functional_model(_mlp(5), F.cross_entropy)
    stacked = _stacked(fm)
    plan = check_plan(layer_plan(fm), fm.params, _xy(1, 4))
    one = layer_grads_stacked(plan._replace(dense=True), stacked, _xy(0, 1))  # all dense
    many = layer_grads_stacked(plan, stacked, _xy(1, 4))
    assert not one.factors and many.factors
    both = LayerGrads.cat([one, many])
    assert torch.equal(both.to_dense(), torch.cat([one.to_dense(), many.to_dense()], 1))
    torch.testing.assert_close(both.scores(many), torch.cat([one.scores(many), many.scores(many)]),
                               rtol=0, atol=1e-12)


def test_a_batch_of_one_is_factored_and_checked_on_itself():
    """An unchecked plan on a batch of one: factored (no dense [1, P] block), equal to autodiff
    (1e-12), and a stream does not hold a plan checked on one example (mixing stays caught)."""
    from dattri_fn.transforms.layer_grads import layer_grads_fn

    fm = functional_model(_mlp(6), F.cross_entropy)
    lg = layer_grads_stacked(layer_plan(fm), _stacked(fm), _xy(0, 1))
    assert lg.factors and lg.dense.shape[-1] == 0
    torch.testing.assert_close(lg.to_dense()[0], _loop_ref(fm, fm.params, _xy(0, 1)), rtol=0,
                               atol=1e-12)
    mixing = functional_model(_init(_Mixing().double(), 6), F.cross_entropy)
    grads = layer_grads_fn(layer_plan(mixing))
    assert grads(_stacked(mixing), _xy(0, 1)).factors  # one example: nothing mixed, exact
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        assert not grads(_stacked(mixing), _xy(1, 5)).factors


def test_plan_errors():
    """Bad plans, params and batches are named errors."""
    fm = functional_model(_mlp(0), F.cross_entropy)
    plan = layer_plan(fm)
    with pytest.raises(TypeError, match=r"check_plan\(plan=...\): expected a LayerPlan"):
        check_plan(fm, fm.params, _xy(0, 3))
    with pytest.raises(ValueError, match=r"check_plan\(batch=...\): expected at least 2 examples"):
        check_plan(plan, fm.params, _xy(0, 1))
    with pytest.raises(ValueError, match=r"check_plan\(params=...\): expected model.params' shapes"):
        check_plan(plan, {k: v[..., :1] for k, v in fm.params.items()}, _xy(0, 3))
    with pytest.raises(ValueError, match=r"check_plan\(params=...\): expected the keys"):
        check_plan(plan, dict(list(fm.params.items())[:1]), _xy(0, 3))
    other = functional_model(_mlp(1), F.cross_entropy)
    with pytest.raises(ValueError, match=r"per_sample_layer_grads\(plan=...\): expected a "
                                         r"LayerPlan of this model"):
        per_sample_layer_grads(fm, fm.params, _xy(0, 3), plan=layer_plan(other))


class _TwoCalls(nn.Module):
    """A Linear on [B, T, d] called three times, one call's output never used."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        self.lin(h)  # never reaches the loss: g = 0 for these positions
        h = torch.tanh(self.lin(h))
        return self.head(h.mean(1))


@given(st.integers(0, 2**16), st.sampled_from(["mlp", "seq", "cnn", "two"]), st.integers(1, 5))
def test_per_call_probes_equal_probes_of_known_shape(seed, case, n):
    """batched_io(shapes=None) == batched_io(shapes=output_shapes(...)) and streamed_io(None)
    gives the same (a, g) per layer, bit for bit; nothing is stored on tapped."""
    if case == "two":
        module, (x, y) = _init(_TwoCalls().double(), seed), _xy(seed, n, (2, 3))
    else:
        build, data = CASES[case]
        module, (x, y) = build(), data(seed, n)
    tapped = capture.tap(module, list(capture.layer_specs(module)))
    state = {k: v.detach() for k, v in module.named_parameters()}
    like = next(iter(state.values()))
    attrs = dict(vars(tapped))
    shapes = output_shapes(tapped, state, (x,), {}, like)
    ref = batched_io(tapped, F.cross_entropy, state, (x,), {}, y, shapes, like)
    got = batched_io(tapped, F.cross_entropy, state, (x,), {}, y, None, like)
    streamed = {}
    streamed_io(tapped, F.cross_entropy, state, (x,), {}, y, None, like,
                lambda name, a, g: streamed.__setitem__(name, (a, g)))
    assert vars(tapped) == attrs and not hasattr(tapped, "shapes")
    assert list(got) == list(ref) and sorted(streamed) == sorted(ref)
    for name, (a, g) in ref.items():
        for other in (got[name], streamed[name]):
            assert torch.equal(other[0], a) and torch.equal(other[1], g)
            assert other[1].shape == shapes[name]


def test_a_stream_checks_its_first_batch_of_two_then_holds_the_plan():
    """layer_grads_fn(plan): a batch of one checked alone, then every batch == check_plan(plan,
    first batch of >= 2) applied to it (torch.equal); plan unchanged."""
    from dattri_fn.transforms.layer_grads import layer_grads_fn

    fm = functional_model(_init(_Seq().double(), 1), F.cross_entropy)
    plan = layer_plan(fm)
    before = _snapshot(plan)
    stacked = _stacked(fm, 2)
    grads = layer_grads_fn(plan)
    batches = [_tokens(0, 1, 4), _tokens(1, 5, 4), _tokens(2, 3, 6), _tokens(3, 1, 2)]
    got = [grads(stacked, b) for b in batches]
    held = check_plan(plan, stacked, batches[1])
    assert got[0].factors and got[1].factors
    for b, lg in zip(batches[1:], got[1:], strict=True):
        assert torch.equal(lg.to_dense(), layer_grads_stacked(held, stacked, b).to_dense())
    _same_snapshot(before, _snapshot(plan))
