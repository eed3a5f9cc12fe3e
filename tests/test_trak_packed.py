"""TRAK without projection keeps its train rows factored and its dual kernel block-packed."""

import collections
import warnings

import pytest
import torch
from torch import nn

import dattri_fn.attribute.trak_kernel as trak_kernel
from dattri_fn import io
from dattri_fn.attribute.trak import (
    TRAKState,
    classification_margin,
    classification_margin_loss,
    classification_weight,
    classification_weight_loss,
    trak,
)
from dattri_fn.attribute.trak_kernel import (
    pack_rows,
    packed_blocks,
    packed_diag,
    packed_matmul,
    packed_size,
    unpacked,
)
from dattri_fn.model import functional_model

F64 = torch.float64


def _sym(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a + a.T


def _pack(K: torch.Tensor, rows: int) -> torch.Tensor:
    """The block-packed storage written by hand: K[s:e, :e] row-major, block after block."""
    return torch.cat([K[s:e, :e].reshape(-1) for s, e, _ in packed_blocks(K.shape[0], rows)])


@pytest.mark.parametrize(("n", "rows"), [(1, 1), (5, 32), (7, 3), (9, 3), (33, 32), (40, 7)])
def test_packed_kernel_products(n, rows):
    """Block-packed K (K[s:e, :e] per block): unpacked == K, K x == packed_matmul (also added to
    out), diag(K G) == packed_diag from blocks of G; size = sum_b (e - s) e (float64, 1e-12)."""
    K, G = _sym(n, n), _sym(n, n + 1)
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(rows), dtype=F64)
    flat = _pack(K, rows)
    assert flat.numel() == packed_size(n, rows)
    assert torch.equal(unpacked(flat, n, rows), K)
    torch.testing.assert_close(packed_matmul(flat, n, rows, x), K @ x, rtol=0, atol=1e-12)
    out = x.clone()
    assert packed_matmul(flat, n, rows, x, out) is out
    torch.testing.assert_close(out, x + K @ x, rtol=0, atol=1e-12)
    got = packed_diag(flat, n, rows, lambda s, e: G[s:e, :e])
    torch.testing.assert_close(got, (K @ G).diagonal(), rtol=0, atol=1e-12)


def test_pack_rows_bounds_the_overhead():
    """pack_rows(n) = max(32, ceil(n / 16)): the packed size is at most n (n + rows) / 2, i.e.
    within 1/16 (+ 32 / n) of the triangle, and at most 17 blocks."""
    for n in (1, 31, 32, 500, 1000, 4097):
        r = pack_rows(n)
        assert r == max(32, -(-n // 16))
        assert packed_size(n, r) <= n * (n + r) / 2 and len(list(packed_blocks(n, r))) <= 17


def _net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=F64))
    return net.eval()


def _data(n: int, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)
    return x.to(device), y.to(device)


def _setup(C: int, seed: int = 0, device="cpu"):
    net = _net(seed).to(device)
    g = torch.Generator().manual_seed(seed + 100)
    base = functional_model(net).params
    ckpts = [{k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=F64).to(device)
              for k, v in base.items()} for _ in range(C)]
    return net, ckpts


def _methods(net, **kw):
    """(factored: FunctionalModel output, dense: the same margin as a plain function)."""
    fm = functional_model(net)
    factored = trak(functional_model(net, classification_margin_loss),
                    weight_fn=functional_model(net, classification_weight_loss), **kw)
    dense = trak(classification_margin(fm.forward), weight_fn=classification_weight(fm.forward),
                 **kw)
    return factored, dense


@pytest.mark.parametrize(("C", "chunk"), [(1, None), (2, None), (2, 4)])
def test_factored_state_equals_dense_dual(C, chunk, monkeypatch, tmp_path, device):
    """n = 19 < P = 57 over batches of 8, 8, 3 (and chunks of 4), the kernel packed by blocks of
    3 rows: s_ij = Qbar_i / C sum_c [K_c G_c G_test_c^T]_ij, top-k and s_ii equal the dense dual
    form's (1e-10); the state keeps the factors, no [C, n, P] rows, and survives io.save/load."""
    monkeypatch.setattr(trak_kernel, "_PACK_MIN_ROWS", 3)
    monkeypatch.setattr(trak_kernel, "_PACK_BLOCKS", 100)
    net, ckpts = _setup(C, 0, device)
    x, y = _data(19, 1, device)
    train = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    test = [_data(4, 2, device), _data(3, 3, device)]
    factored, dense = _methods(net, damping=0.05, chunk_size=chunk)
    s_f, s_d = factored.prepare(ckpts, train), dense.prepare(ckpts, train)
    assert s_f.train_features is None and s_f.train_factors.num_rows == 19
    assert s_f.kernel_rows == 3 and tuple(s_f.kernel.shape) == (C, packed_size(19, 3))
    assert s_d.train_factors is None and s_d.kernel_rows == 0
    torch.testing.assert_close(s_f.kernel_matrix(), s_d.kernel, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_f.train_factors.to_dense(), s_d.train_features, rtol=0, atol=1e-12)
    ref = dense.score(ckpts, s_d, None, test)
    tol = dict(rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    torch.testing.assert_close(factored.score(ckpts, s_f, train, test), ref, **tol)
    for largest in (True, False):
        top = factored.score(ckpts, s_f, None, test, top_k=2, largest=largest)
        torch.testing.assert_close(top.values, torch.topk(ref, 2, dim=0, largest=largest).values,
                                   **tol)
    want = dense.self_score(ckpts, s_d, None)
    torch.testing.assert_close(factored.self_score(ckpts, s_f, None), want, rtol=1e-10,
                               atol=1e-10 * float(want.abs().max()))
    io.save(s_f, tmp_path / "trak.pt")
    back = io.load(tmp_path / "trak.pt")
    assert isinstance(back, TRAKState) and back.kernel_rows == 3
    torch.testing.assert_close(factored.score(ckpts, back, None, test), ref, **tol)


class _SeqNet(nn.Module):
    """A Linear read at 3 positions per example (its factors have a sequence dimension)."""

    def __init__(self, seed: int):
        super().__init__()
        self.inner, self.head = nn.Linear(5, 4), nn.Linear(4, 12)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.7 * torch.randn(p.shape, generator=g))

    def forward(self, x):  # [B, 3, 5] -> [B, 12]
        return self.head(torch.tanh(self.inner(x)).mean(1))


@pytest.mark.parametrize("narrow", [False, True])
def test_dense_blocks_and_narrow_layers(narrow):
    """A Linear read at positions goes to the dense block: the state keeps it next to the head's
    factors (P = 84 >= 2 x 41 entries a row: factored where that halves the rows). Layers
    5 -> 1 -> 3, whose factors (12 a row) are not
    narrower than the rows (P = 12), keep the dense rows, written from the captured ones, and
    the whole [C, n, n] kernel. Either way the dense dual form's scores (1e-10)."""
    if narrow:
        net = nn.Sequential(nn.Flatten(), nn.Linear(15, 1), nn.Tanh(), nn.Linear(1, 3)).to(F64)
        return _check_against_dense(net.eval(), factored=False)
    _check_against_dense(_SeqNet(3).to(F64).eval(), factored=True)


def _check_against_dense(net, factored: bool):
    g = torch.Generator().manual_seed(4)
    ckpts = [{k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=F64)
              for k, v in functional_model(net).params.items()} for _ in range(2)]
    x, y = torch.randn(7, 3, 5, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)
    train, test = [(x[:4], y[:4]), (x[4:], y[4:])], (x[:3] + 0.5, y[:3])
    m_f, dense = _methods(net, damping=0.1)
    s_f, s_d = m_f.prepare(ckpts, train), dense.prepare(ckpts, train)
    if factored:
        assert s_f.train_features is None and s_f.train_factors.dense.shape[-1] == 24
        rows = s_f.train_factors.to_dense()
    else:
        assert s_f.train_factors is None and s_f.kernel_rows == 0 and s_f.kernel.shape == (2, 7, 7)
        rows = s_f.train_features
    torch.testing.assert_close(rows, s_d.train_features, rtol=0, atol=1e-12)
    torch.testing.assert_close(s_f.kernel_matrix(), s_d.kernel, rtol=1e-10, atol=1e-10)
    ref = dense.score(ckpts, s_d, None, test)
    torch.testing.assert_close(m_f.score(ckpts, s_f, None, test), ref, rtol=1e-10,
                               atol=1e-10 * float(ref.abs().max()))
    want = dense.self_score(ckpts, s_d, None)
    torch.testing.assert_close(m_f.self_score(ckpts, s_f, None), want, rtol=1e-10,
                               atol=1e-10 * float(want.abs().max()))


class _Log(nn.Module):
    def forward(self, x):
        return x.abs().log()  # -inf where x == 0: that example's gradient is not finite


def test_non_finite_factors_are_refused():
    """A train or test example whose captured gradient is not finite: prepare and score name
    the call and the data (review R3 F5: not Projector(features=...)) instead of returning NaN
    scores."""
    net = nn.Sequential(_Log(), _net(5)).eval()
    x, y = _data(6, 6)
    factored, _ = _methods(net, damping=0.1)
    params = functional_model(net).params
    bad = x.clone()
    bad[2, 0] = 0.0
    # refused by the plan's check (no dense warning since 7ba14c5), named as TRAK's train
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match=r"^trak\.prepare\(train=\.\.\.\): expected "
                                             r"examples whose per-ex"):
            factored.prepare(params, (bad, y))
    state = factored.prepare(params, (x, y))
    assert state.train_factors is not None
    with pytest.raises(ValueError, match=r"^trak\.score\(test=\.\.\.\): expected examples whose per-example"):
        factored.score(params, state, None, (bad[1:4], y[1:4]))


def test_a_factored_state_is_refused_by_another_trak():
    """A factored state given to a projected trak (its kernel is packed: no other form reads it)
    or to the plain-function trak of the same margin is refused by name."""
    net, ckpts = _setup(1, 7)
    train, test = _data(6, 8), _data(2, 9)
    factored, dense = _methods(net, damping=0.1)
    state = factored.prepare(ckpts, train)
    projected = trak(functional_model(net, classification_margin_loss), proj_dim=4)
    with pytest.raises(ValueError, match=r"trak\.score\(state=\.\.\.\): expected a state without "
                                         r"plan decisions"):
        dense.score(ckpts, state, None, test)
    with pytest.raises(ValueError, match=r"trak\.self_score\(state=\.\.\.\): expected a factored"):
        projected.self_score(ckpts, state, None)


def test_io_loads_a_state_saved_before_the_factored_fields(tmp_path):
    """A TRAKState file with the four fields of before (kernel, train_features, train_weights,
    plan) loads as a TRAKState with train_factors None and kernel_rows 0, and scores."""
    net, ckpts = _setup(1, 9)
    train, test = _data(6, 10), _data(2, 11)
    _, dense = _methods(net, damping=0.1)
    state = dense.prepare(ckpts, train)
    Old = collections.namedtuple("TRAKState", TRAKState._fields[:4])
    Old.__module__, Old.__qualname__ = TRAKState.__module__, TRAKState.__qualname__
    io.save(Old(*state[:4]), tmp_path / "old.pt")
    back = io.load(tmp_path / "old.pt")
    assert isinstance(back, TRAKState) and back.train_factors is None and back.kernel_rows == 0
    assert torch.equal(dense.score(ckpts, back, None, test), dense.score(ckpts, state, None, test))


class _MostlyDense(_SeqNet):
    """_SeqNet with a 3-way head: the positions' dense block (24) is most of the width (P = 39,
    32 entries a row factored)."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.head = nn.Linear(4, 3)


def test_a_mostly_dense_model_keeps_dense_rows_and_a_float64_state_scores_float32_params():
    """Review R3: (F1) factors that would not halve the rows are not kept (their concatenation
    and widened copy made prepare peak above the dense rows'): dense rows, the dense dual form's
    scores; (F2) a float64 factored state scored with float32 params returns the float64
    scores to float32 rounding (it raised a dtype error)."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 3, 5, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)
    train, test = [(x[:4], y[:4]), (x[4:], y[4:])], (x[:3] + 0.5, y[:3])
    net = _MostlyDense(3).to(F64).eval()
    m_f, dense = _methods(net, damping=0.1)
    params = functional_model(net).params
    s_f, s_d = m_f.prepare(params, train), dense.prepare(params, train)
    assert s_f.train_factors is None and s_f.kernel_rows == 0
    torch.testing.assert_close(m_f.score(params, s_f, None, test), dense.score(params, s_d, None, test),
                               rtol=1e-10, atol=1e-10)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(15, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64).eval()
    m64, _ = _methods(mlp, damping=0.1)
    p64 = functional_model(mlp).params
    state = m64.prepare(p64, train)
    assert state.train_factors is not None
    want = m64.score(p64, state, None, test)
    got = m64.score({k: v.float() for k, v in p64.items()}, state, None, (test[0].float(), test[1]))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_state_refusals_name_what_differs():
    """Review R3: a factored state given to a trak with another feature_dtype is refused naming
    the settings that read it (F3); a dense dual state of another model with the same C and
    n < d is refused naming the feature width, not by a raw bmm error (F4)."""
    net, ckpts = _setup(1, 7)
    train, test = _data(6, 8), _data(2, 9)
    factored, _ = _methods(net, damping=0.1)
    state = factored.prepare(ckpts, train)
    bf16 = trak(functional_model(net, classification_margin_loss),
                weight_fn=functional_model(net, classification_weight_loss), damping=0.1,
                feature_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"trak\.score\(state=\.\.\.\): expected a factored state "
                                         r"only for a trak with proj_dim=None"):
        bf16.score(ckpts, state, None, test)
    wide = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)).to(F64).eval()
    _, dense_wide = _methods(wide, damping=0.1)
    _, dense = _methods(net, damping=0.1)
    other = dense_wide.prepare([functional_model(wide).params], train)
    with pytest.raises(ValueError, match=r"trak\.score\(state=\.\.\.\): expected train features of "
                                         r"width d = "):
        dense.score(ckpts, other, None, test)
