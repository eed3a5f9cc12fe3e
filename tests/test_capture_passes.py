"""Fewer capture passes, same gradients: checkpoints one by one, merged in-memory batches."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.attribute.gradsim import grad_cos, grad_dot, tracin, tracin_cos
from dattri_fn.transforms import layer_grads_paths as paths
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _init(module, seed):
    g = _gen(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    return module.eval()


def _mlp(seed=0):
    return _init(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), seed)


def _xy(seed, n):
    g = _gen(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _stacked(fm, C, seed=1):
    g = _gen(seed)
    return {k: torch.stack([v] + [v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                                  for _ in range(C - 1)]) for k, v in fm.params.items()}


def test_checkpoints_one_by_one_equal_each_checkpoint_alone(monkeypatch):
    """G[c] == layer_grads(C = 1 at theta_c) bit for bit, and == autodiff per example at 1e-10;
    no probe-shape forward and no vmap over checkpoints (plain autograd, no dense params)."""
    fm = functional_model(_mlp(), F.cross_entropy)
    stacked, batch = _stacked(fm, 3), _xy(2, 7)
    plan = check_plan(layer_plan(fm), {k: v[:1] for k, v in stacked.items()}, _xy(0, 3))
    forwards, real = [], paths.output_shapes
    monkeypatch.setattr(paths, "output_shapes", lambda *a, **k: forwards.append(1) or real(*a, **k))
    G = layer_grads_stacked(plan, stacked, batch).to_dense()
    assert forwards == [] and G.shape == (3, 7, 51)
    for c in range(3):
        one = layer_grads_stacked(plan, {k: v[c:c + 1] for k, v in stacked.items()}, batch)
        assert torch.equal(G[c], one.to_dense()[0])
        want = per_sample_grad(fm.loss, {k: v[c] for k, v in stacked.items()}, batch)  # [B, P]
        torch.testing.assert_close(G[c], want, rtol=0, atol=1e-10)


def test_checkpoints_vmapped_inside_a_transform_equal_one_by_one():
    """Inside torch.func (a caller's own vmap over a dummy axis) the checkpoints are vmapped:
    the same gradients at 1e-12 as the plain path's checkpoint-by-checkpoint passes."""
    fm = functional_model(_mlp(3), F.cross_entropy)
    stacked, batch = _stacked(fm, 2, seed=4), _xy(5, 6)
    plan = check_plan(layer_plan(fm), stacked, _xy(0, 3))
    plain = layer_grads_stacked(plan, stacked, batch).to_dense()
    mapped = torch.func.vmap(lambda s: layer_grads_stacked(plan, {k: v + s for k, v in stacked.items()},
                                                           batch).to_dense())(torch.zeros(1, dtype=DT))
    torch.testing.assert_close(mapped[0], plain, rtol=0, atol=1e-12)


class _Reiterable:
    """A re-iterable that is not a list: the usual path, batch by batch."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _counted_passes(monkeypatch):
    """Capture passes: the engine's (batched_io) and, for a held plan of a plain MLP, mlp_io's
    (the same (a, g) by the same kernels; layer_grads._plain_mlp)."""
    from dattri_fn.transforms import mlp_io

    calls, real, real_mlp = [], paths.batched_io, mlp_io.mlp_io
    monkeypatch.setattr(paths, "batched_io", lambda *a, **k: calls.append(1) or real(*a, **k))

    def counted_mlp(*a, **k):
        io = real_mlp(*a, **k)
        if io is not None:
            calls.append(1)
        return io

    monkeypatch.setattr(mlp_io, "mlp_io", counted_mlp)
    return calls


@pytest.mark.parametrize("name", ["grad_dot", "grad_cos", "tracin", "tracin_cos"])
def test_one_capture_pass_for_test_and_train_equals_batch_by_batch(name, monkeypatch):
    """score (full and top-k) from one pass over [test, *train] == batch by batch, torch.equal;
    the pass count is 1 (C = 1, prepared) or C, and a budget too small for it takes the usual
    path (1 + n_batches passes per checkpoint). One thread: GEMMs of other row counts may split
    their sums differently across threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _one_pass_case(name, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _one_pass_case(name, monkeypatch):
    C = 1 if name.startswith("grad") else 2
    build = {"grad_dot": lambda fm: grad_dot(fm), "grad_cos": lambda fm: grad_cos(fm),
             "tracin": lambda fm: tracin(fm, lrs=[0.3, 0.2]),
             "tracin_cos": lambda fm: tracin_cos(fm, lrs=[0.3, 0.2])}[name]
    fm = functional_model(_mlp(1), F.cross_entropy)
    m = build(fm)
    stacked = _stacked(fm, C, seed=2)
    params = fm.params if C == 1 else [{k: v[c] for k, v in stacked.items()} for c in range(C)]
    train, test = [_xy(3, 5), _xy(4, 4), _xy(5, 6)], _xy(6, 3)
    state = m.prepare(params, train)
    m.score(params, state, train, test)  # a tracin call checks its plan on the first pass
    calls = _counted_passes(monkeypatch)
    merged = m.score(params, state, train, test)
    top = m.score(params, state, train, test, top_k=2, largest=False)
    assert len(calls) == 2 * C
    usual = m.score(params, state, _Reiterable(train), test)
    usual_top = m.score(params, state, _Reiterable(train), test, top_k=2, largest=False)
    assert torch.equal(merged, usual) and torch.equal(top.values, usual_top.values)
    assert torch.equal(top.indices, usual_top.indices) and merged.shape == (15, 3)
    calls.clear()
    monkeypatch.setenv("DATTRI_FN_MEMORY", "64")
    assert torch.equal(m.score(params, state, train, test), usual) and len(calls) == 4 * C


def test_one_pass_keeps_the_usual_errors():
    """A bad train batch (labels out of range) and an ambiguous list of tensors are reported as
    the usual path reports them, naming grad_dot(train=...)."""
    fm = functional_model(_mlp(2), F.cross_entropy)
    m = grad_dot(fm)
    state = m.prepare(fm.params, [_xy(1, 4)])
    x, y = _xy(2, 4)
    with pytest.raises(ValueError, match=r"grad_dot\(train=\.\.\.\)"):
        m.score(fm.params, state, [_xy(1, 4), (x, y + 10)], _xy(3, 3))
    with pytest.raises(ValueError, match=r"grad_dot\(train=\.\.\.\): expected a tuple"):
        m.score(fm.params, state, [x, x], _xy(3, 3))


class _TiedHead(nn.Module):
    """An embedding whose weight is read again as the output layer's (one tensor, two names)."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx)))


def test_functional_model_unties_only_a_module_with_tied_tensors():
    """loss(p) == the module's own loss at p, and grad w.r.t. the one tied key == autograd on
    the module (1e-12), with ties found at build; a plain MLP is decided untied."""
    from dattri_fn.model import _has_tied_tensors

    tied = _init(_TiedHead().double(), 5)
    fm = functional_model(tied, F.cross_entropy)
    assert _has_tied_tensors(tied) and not _has_tied_tensors(_mlp())
    assert list(fm.params) == ["emb.weight"]
    idx, y = torch.tensor(2), torch.tensor(4)
    p = {"emb.weight": fm.params["emb.weight"] + 0.1}
    with torch.no_grad():
        tied.emb.weight.add_(0.1)  # the module at p (both names move: one tensor)
    want = F.cross_entropy(tied(idx[None]), y[None])
    (g_want,) = torch.autograd.grad(want, [tied.emb.weight])
    torch.testing.assert_close(fm.loss(p, (idx, y)), want, rtol=0, atol=1e-12)
    g = torch.func.grad(fm.loss)(p, (idx, y))["emb.weight"]
    torch.testing.assert_close(g, g_want, rtol=0, atol=1e-12)


class _Tokens(nn.Module):
    """Embedding -> Linear on [B, T, D] -> mean over T -> Linear, fed by keyword (a dict batch)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.lin(self.emb(ids))).mean(1))


@pytest.mark.parametrize("case", ["mlp", "tied", "dict"])
def test_check_reference_rows_equal_model_loss_rows(case):
    """The check's reference rows (each example a batch of one, straight to functional_call)
    == autodiff of model.loss on each example alone (torch.equal), for a plain MLP, a module
    with a tied tensor and a dict batch read by keyword."""
    from dattri_fn.model import _has_tied_tensors
    from dattri_fn.transforms.layer_grads_paths import _autodiff_rows, _example_rows

    g = _gen(7)
    if case == "mlp":
        module, batch = _mlp(4), _xy(8, 3)
    elif case == "tied":
        module = _init(_TiedHead().double(), 6)
        batch = (torch.randint(0, 5, (3,), generator=g), torch.randint(0, 5, (3,), generator=g))
    else:
        module = _init(_Tokens().double(), 6)
        batch = {"ids": torch.randint(0, 7, (3, 5), generator=g),
                 "labels": torch.randint(0, 3, (3,), generator=g)}
    fm = functional_model(module, F.cross_entropy)
    got = _example_rows(fm, fm.params, batch, _has_tied_tensors(module))
    want = _autodiff_rows(fm.loss, fm.params, batch)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["grad_dot", "tracin_cos"])
def test_self_score_takes_one_pass_per_batch(name, monkeypatch):
    """self_score of a list of batches: both sides of each batch from one pass (C passes per
    batch, was 2C) == the streamed path over a non-list re-iterable (torch.equal)."""
    C = 1 if name == "grad_dot" else 2
    fm = functional_model(_mlp(5), F.cross_entropy)
    m = grad_dot(fm) if C == 1 else tracin_cos(fm, lrs=[0.3, 0.2])
    stacked = _stacked(fm, C, seed=3)
    params = fm.params if C == 1 else [{k: v[c] for k, v in stacked.items()} for c in range(C)]
    train = [_xy(1, 5), _xy(2, 4)]
    state = m.prepare(params, train)
    m.self_score(params, state, train)
    calls = _counted_passes(monkeypatch)
    got = m.self_score(params, state, train)
    assert len(calls) == 2 * C and got.shape == (9,)
    assert torch.equal(got, m.self_score(params, state, _Reiterable(train)))


def test_one_pass_budget_counts_flat_layers_once_per_example(monkeypatch):
    """A flat (no positions) layer holds one (in + out) row per example: a 64-input MLP's 18 rows
    need 18 * 8 * (70 + 9) = 11,376 bytes, so a 100 kB budget takes one pass (the estimate that
    multiplied by an example's 65 entries, 739 kB, fell back to 4 passes)."""
    net = _init(nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 3)).double(), 0)
    fm = functional_model(net, F.cross_entropy)
    g = _gen(9)
    data = [(torch.randn(n, 64, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
            for n in (5, 4, 6, 3)]
    train, test = data[:3], data[3]
    m = grad_dot(fm)
    state = m.prepare(fm.params, train)
    monkeypatch.setenv("DATTRI_FN_MEMORY", "100000")
    calls = _counted_passes(monkeypatch)
    one = m.score(fm.params, state, train, test)
    assert len(calls) == 1
    want = per_sample_grad(fm.loss, fm.params, (torch.cat([x for x, _ in train]),
                                                torch.cat([y for _, y in train])))
    test_g = per_sample_grad(fm.loss, fm.params, test)
    torch.testing.assert_close(one, want @ test_g.T, rtol=0, atol=1e-10)


def test_one_pass_takes_at_most_one_pass_rows(monkeypatch):
    """More than capture_rows.ONE_PASS_ROWS rows in [test, *train] take the usual path (1 + 3
    passes; the same scores, torch.equal) however large the memory budget: the pass's held
    factors grow with every row while the per-pass cost it saves does not."""
    import dattri_fn.attribute.capture_rows as capture_rows

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fm = functional_model(_mlp(1), F.cross_entropy)
        m = grad_dot(fm)
        train, test = [_xy(3, 5), _xy(4, 4), _xy(5, 6)], _xy(6, 3)
        state = m.prepare(fm.params, train)
        calls = _counted_passes(monkeypatch)
        one = m.score(fm.params, state, train, test)
        assert len(calls) == 1
        calls.clear()
        monkeypatch.setattr(capture_rows, "ONE_PASS_ROWS", 17)  # 18 rows in all
        assert torch.equal(m.score(fm.params, state, train, test), one) and len(calls) == 4
    finally:
        torch.set_num_threads(threads)
