"""FactGraSS's flat path: the check from the first capture pass, bounded sketch blocks, [a, 1] unformed."""

import sys

import pytest
import torch
import torch.nn.functional as F
from test_factgrass import _problem
from torch import nn

from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.model import functional_model
from dattri_fn.transforms.kronecker import KroneckerLayer, make_kronecker_projector

DT = torch.float64
_MOD = sys.modules[factgrass.__module__]
# the stream (factgrass_rows._Rows) reads _flat_capturable, _plain_io, _flat_io_checked, _check and
# _stage_two from its own module globals (since the split, 62ef169): patched there, and each test
# asserts that its patched path ran (review R2 F1: patched on factgrass, they reached nothing)
_ROWS = sys.modules["dattri_fn.attribute.factgrass_rows"]


def _count(monkeypatch, name: str) -> list:
    """Wrap ``factgrass_rows.<name>``: the returned list gets one entry per call."""
    calls, real = [], getattr(_ROWS, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(_ROWS, name, spy)
    return calls


def _full_check(monkeypatch) -> list:
    """Every stream takes layer_grads' full check (the path before the flat check); returns the
    list of the full check's calls."""
    monkeypatch.setattr(_ROWS, "_flat_capturable", lambda plan: False)
    return _count(monkeypatch, "_check")


def m_layers(fm):
    """The captured layers of ``fm``'s unchecked plan, in module order."""
    from dattri_fn.transforms.layer_grads import layer_plan

    return layer_plan(fm).layers


def _conv1d_net():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    return nn.Sequential(Conv1D(9, 6), nn.Tanh(), nn.Linear(9, 3)).to(DT).eval()


class _Mixing(nn.Module):
    """Examples meet inside the batch (a batch mean): per-example factors are not the gradients."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        h = self.lin(x)
        return h - 0.5 * h.mean(0, keepdim=True)


def _data(n: int, width: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("net", ["mlp", pytest.param("conv1d", marks=pytest.mark.slow)])
def test_flat_check_gives_the_full_checks_plan_state_and_scores(monkeypatch, net):
    """Flat check from the capture pass == layer_grads' full check: plan, phi, (F + lam)^-1, S bit for bit."""
    if net == "mlp":
        fm, (x, y) = _problem("mlp", n=20, seed=2)
    else:
        fm = functional_model(_conv1d_net(), F.cross_entropy)
        x, y = _data(20, 6, 3, 2)
    train, test = [(x[:8], y[:8]), (x[8:], y[8:])], (x[:5], y[:5])
    m = factgrass(fm, proj_dim=8, mask_dim=3)
    plain = m.prepare(fm.params, train)  # the mlp's factors come from mlp_io: no check at all
    with monkeypatch.context() as mp:
        mp.setattr(_ROWS, "_plain_io", lambda *a: None)  # the engine's pass and the flat check
        flat = _count(mp, "_flat_io_checked")
        s = m.prepare(fm.params, train)
        S = m.score(fm.params, s, train, test)
    assert len(flat) == 1
    full = _full_check(monkeypatch)
    r = m.prepare(fm.params, train)
    assert len(full) == 1  # the train stream's first part, by layer_grads' full check
    for t in (plain, s):
        assert torch.equal(m.prepare.feature_rows(fm.params, t),
                           m.prepare.feature_rows(fm.params, r))
    assert s.plan == r.plan and not s.plan.dense and not s.plan.loop
    assert s.plan.layers == tuple(m_layers(fm))
    assert dict(s.plan.layout) == dict.fromkeys(s.plan.layers, "flat")
    assert torch.equal(m.prepare.feature_rows(fm.params, s), m.prepare.feature_rows(fm.params, r))
    assert all(torch.equal(s.inverses[b], r.inverses[b]) for b in r.inverses)
    assert torch.equal(S, m.score(fm.params, r, train, test))


@pytest.mark.slow  # the dense fallback's first vmap(grad) imports torch.func's machinery (~8 s alone)
def test_examples_mixed_in_a_batch_fall_back_to_the_full_check(monkeypatch):
    """A batch mean in the forward: the flat check refuses; the full check warns, goes dense (its state)."""
    fm = functional_model(_Mixing().to(DT).eval(), F.cross_entropy)
    x, y = _data(12, 5, 3, 7)
    train = [(x[:6], y[:6]), (x[6:], y[6:])]
    m = factgrass(fm, proj_dim=6, mask_dim=3)
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        s = m.prepare(fm.params, train)
    assert s.plan.dense
    full = _full_check(monkeypatch)
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        r = m.prepare(fm.params, train)
    assert len(full) == 1
    assert torch.equal(s.train_features, r.train_features)


def test_prepare_runs_one_capture_pass_and_the_checks_autodiff_rows():
    """Merged batches, flat plan: 1 capture forward + 3 single-example forwards (no narrowing pass)."""
    fm, (x, y) = _problem("mlp", n=20, seed=1)
    calls = []
    fm.module.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    factgrass(fm, proj_dim=8).prepare(fm.params, [(x[:8], y[:8]), (x[8:], y[8:])])
    assert sorted(calls) == [1, 1, 1, 20]


def test_sketch_row_blocks_do_not_change_the_features(monkeypatch):
    """Stage 1 formed one row at a time (_SKETCH_BYTES = 1) == all rows at once: phi at 1e-13 relative."""
    fm, (x, y) = _problem("mlp", n=15, seed=5)
    m = factgrass(fm, proj_dim=8, kind="gaussian")
    blocks = _count(monkeypatch, "_stage_two")
    want = m.prepare.feature_rows(fm.params, m.prepare(fm.params, [(x, y)]))
    assert [S.shape[0] for _, _, S, _ in blocks] == [15, 15]  # each layer's 15 rows at once
    blocks.clear()
    # factgrass() reads _SKETCH_BYTES when it is called (into its _Config): patched before it
    monkeypatch.setattr(_MOD, "_SKETCH_BYTES", 1)
    m = factgrass(fm, proj_dim=8, kind="gaussian")
    got = m.prepare.feature_rows(fm.params, m.prepare(fm.params, [(x, y)]))
    assert [S.shape[0] for _, _, S, _ in blocks] == [1] * 30
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["mask", "gaussian", "sjlt"])
def test_project_sides_with_ones_equal_the_sides_of_a_with_its_bias_column(kind):
    """project_sides(a, g, ones=True) == (P_in^T [a, 1], P_out^T g) bit for bit, bias picked or not."""
    g = torch.Generator().manual_seed(0)
    a, gr = torch.randn(5, 7, generator=g, dtype=DT), torch.randn(5, 9, generator=g, dtype=DT)
    picked = set()
    for seed in range(12):
        proj = make_kronecker_projector({"l": KroneckerLayer("l.weight", "l.bias", "linear", 9, 7)},
                                        proj_dim=3, kind=kind, seed=seed)
        pa, pg = proj.project_sides("l", a, gr, ones=True)
        fi, fo = proj.factors["l"]
        want_a = proj._side(torch.cat([a, torch.ones(5, 1, dtype=DT)], 1), fi)
        assert torch.equal(pa, want_a) and torch.equal(pg, proj._side(gr, fo))
        if kind == "mask":
            picked.add(bool((fi.picks(a.device)[0] == 7).any()))
    assert kind != "mask" or picked == {True, False}


def test_a_state_of_another_model_is_refused_by_name():
    """An MLP's plan decisions given to a sequence model's factgrass: ValueError naming score(state=...)."""
    fm, (x, y) = _problem("mlp", n=8, seed=0)
    other, (xs, ys) = _problem("seq", n=8, seed=0)
    s = factgrass(fm, proj_dim=8).prepare(fm.params, [(x[:4], y[:4]), (x[4:], y[4:])])
    m = factgrass(other, proj_dim=8)
    with pytest.raises(ValueError, match=r"factgrass.score\(state=...\): expected the FactGraSSState of "
                                         r"this factgrass's prepare"):
        m.score(other.params, s, None, (xs, ys))
    with pytest.raises(ValueError, match=r"factgrass.self_score\(state=...\): expected the FactGraSSState"):
        m.self_score(other.params, s, None)


@pytest.mark.parametrize("mixing", [False, True])
def test_one_engine_call_equals_the_pass_then_the_check(mixing):
    """_flat_io_checked == (_flat_io, _flat_checked): every (a, g) torch.equal, the same decision."""
    from dattri_fn.attribute.factgrass_flat import _flat_checked, _flat_io, _flat_io_checked
    from dattri_fn.transforms.layer_grads import layer_plan

    if mixing:
        torch.manual_seed(3)
        fm = functional_model(_Mixing().to(DT).eval(), F.cross_entropy)
        batch = _data(7, 5, 3, seed=5)
    else:
        fm, batch = _problem("mlp", n=7, seed=4)
    plan = layer_plan(fm)
    io, checked = _flat_io_checked(plan, fm.params, batch)
    want = _flat_io(plan, fm.params, batch)
    assert list(io) == list(want)
    assert all(torch.equal(io[n][0], want[n][0]) and torch.equal(io[n][1], want[n][1]) for n in io)
    ref = _flat_checked(plan, fm.params, batch, want)
    assert (checked is None) == (ref is None) == mixing
    if not mixing:
        assert checked.layout == ref.layout and checked.checked


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.float32, torch.float64),
                                    (torch.float64, torch.float32)])
def test_write_flat_row_blocks_reuse_one_buffer_exactly(dtypes):
    """write_flat's reused stage-1 buffer: 7 rows in blocks of 3, 3 and 1 (a short last block)
    == vec(g' a'^T) of every row at once, bit for bit, in g' * a''s promoted dtype; the
    destination's other columns untouched."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(4)
    pg = torch.randn(7, 4, generator=gen, dtype=dtypes[0])
    pa = torch.randn(7, 3, generator=gen, dtype=dtypes[1])
    rows = _ROWS._Rows.__new__(_ROWS._Rows)
    rows.sk = SimpleNamespace(stage2={"l": None}, dense={"l": None})
    rows.stage1 = SimpleNamespace(dims={"l": 12})
    rows.sketch_bytes = 12 * 8 * 3  # 3 rows of 12 float64 a block
    out = torch.full((9, 14), -1.0, dtype=torch.float64)
    rows.write_flat([("l", 1, 13, pa, pg)], out, 2)
    assert torch.equal(out[2:, 1:13], (pg[:, :, None] * pa[:, None, :]).flatten(1))
    assert (out[:2] == -1).all() and (out[:, 0] == -1).all() and (out[:, 13] == -1).all()


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.float32, torch.float64),
                                    (torch.float64, torch.float32), (torch.float32, torch.float32)])
def test_write_flat_row_blocks_bounded_in_the_promoted_dtype(monkeypatch, dtypes):
    """Each stage-1 row block write_flat hands to stage 2 takes at most ``sketch_bytes`` in
    g' * a''s promoted dtype, and as many rows as fit (review RD F3: a float32 a' with a float64
    g' was sized by a''s 4 bytes, twice the bound)."""
    from types import SimpleNamespace

    seen = []
    real = _ROWS._stage_two

    def spy(sk, blk, piece, out=None):
        seen.append((piece.shape[0], piece.nbytes, piece.dtype))
        return real(sk, blk, piece, out)

    monkeypatch.setattr(_ROWS, "_stage_two", spy)
    gen = torch.Generator().manual_seed(5)
    pg = torch.randn(7, 4, generator=gen, dtype=dtypes[0])
    pa = torch.randn(7, 3, generator=gen, dtype=dtypes[1])
    rows = _ROWS._Rows.__new__(_ROWS._Rows)
    rows.sk = SimpleNamespace(stage2={"l": None}, dense={"l": None})
    rows.stage1 = SimpleNamespace(dims={"l": 12})
    rows.sketch_bytes = 12 * 8 * 3  # 3 rows of 12 float64, 6 of float32
    out = torch.zeros(7, 12, dtype=torch.float64)
    rows.write_flat([("l", 0, 12, pa, pg)], out, 0)
    dt = torch.promote_types(*dtypes)
    per = 3 if dt == torch.float64 else 6
    assert [r for r, _, _ in seen] == [min(per, 7 - r) for r in range(0, 7, per)]
    assert all(b <= rows.sketch_bytes and d == dt for _, b, d in seen)
    assert torch.equal(out, (pg[:, :, None] * pa[:, None, :]).flatten(1).double())


def test_write_flat_costs_two_tensor_ops_a_row_block():
    """write_flat's torch calls grow by 3 a row block (the product g' a'^T, its stage 2, the
    block's row count): the block views are cut once per layer (stop 26: 5 calls a block before,
    each slice ~5 us of dispatch), and one block (a test batch) is not split. Values as one
    product."""
    from types import SimpleNamespace

    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(2)
    pg, pa = torch.randn(12, 4, generator=gen, dtype=DT), torch.randn(12, 3, generator=gen, dtype=DT)
    rows = _ROWS._Rows.__new__(_ROWS._Rows)
    rows.sk = SimpleNamespace(stage2={"l": None}, dense={"l": None})
    rows.stage1 = SimpleNamespace(dims={"l": 12})
    calls = {}
    for blocks in (1, 3, 6, 12):
        rows.sketch_bytes = 12 * 8 * (12 // blocks)
        out = torch.zeros(12, 12, dtype=DT)
        Count.n = 0
        with Count():
            rows.write_flat([("l", 0, 12, pa, pg)], out, 0)
        calls[blocks] = Count.n
        assert torch.equal(out, (pg[:, :, None] * pa[:, None, :]).flatten(1))
    assert calls[6] - calls[3] == 3 * 3 and calls[12] - calls[6] == 3 * 6, calls
    assert calls[1] < calls[3] - 2, calls  # one block: no split
