"""FactGraSS dispatches no tensor op that would be a no-op: ``.to`` to the dtype or device a tensor
already has, a slice or ``narrow`` of a block spanning every column, a buffer for a single row block
(stop 27, issue 18: each is ~5-10 us of dispatch on digits-lr's ~90-op round; values unchanged)."""

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.model import functional_model

_ROWS = sys.modules["dattri_fn.attribute.factgrass_rows"]
_FISHER = sys.modules["dattri_fn.attribute.factgrass_fisher"]


class _Record(TorchFunctionMode):
    """Every torch call, as ``(name, first argument)``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append((getattr(func, "__name__", str(func)), args[0] if args else None))
        return func(*args, **(kwargs or {}))

    def names(self) -> list:
        return [n for n, _ in self.calls]


def _bare(dtype, n=40, seed=0):
    """A bare Linear (one block, spanning every column of the features) and its data."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    fm = functional_model(nn.Linear(12, 5).to(dtype), F.cross_entropy)
    x = torch.randn(n, 12, generator=g, dtype=dtype)
    return fm, (x, torch.randint(0, 5, (n,), generator=g))


def _rows(width: int, sketch_bytes: int):
    rows = _ROWS._Rows.__new__(_ROWS._Rows)
    rows.sk = SimpleNamespace(stage2={"l": None}, dense={"l": None})
    rows.stage1 = SimpleNamespace(dims={"l": width})
    rows.sketch_bytes = sketch_bytes
    return rows


def test_write_flat_one_block_spanning_every_column_takes_no_narrow_nor_buffer():
    gen = torch.Generator().manual_seed(1)
    pg, pa = (torch.randn(6, 4, generator=gen, dtype=torch.float64),
              torch.randn(6, 3, generator=gen, dtype=torch.float64))
    want = (pg[:, :, None] * pa[:, None, :]).flatten(1)
    rows = _rows(12, 2**20)
    out = torch.zeros(6, 12, dtype=torch.float64)
    with _Record() as rec:
        rows.write_flat([("l", 0, 12, pa, pg)], out, 0)
    assert torch.equal(out, want)
    names = rec.names()
    assert "narrow" not in names and "new_empty" not in names and "split" not in names, names
    # a block that is one of several column blocks is still cut by its narrow, into its columns
    out = torch.zeros(6, 15, dtype=torch.float64)
    with _Record() as rec:
        rows.write_flat([("l", 3, 15, pa, pg)], out, 0)
    assert torch.equal(out[:, 3:], want) and not out[:, :3].any()
    assert "narrow" in rec.names()
    # row blocks: one buffer, as before
    out = torch.zeros(6, 12, dtype=torch.float64)
    with _Record() as rec:
        _rows(12, 12 * 8 * 2).write_flat([("l", 0, 12, pa, pg)], out, 0)
    assert torch.equal(out, want) and rec.names().count("new_empty") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepare_and_score_skip_no_op_casts_and_whole_width_slices(dtype):
    fm, data = _bare(dtype)
    fg = factgrass(fm, proj_dim=16, mask_dim=4)
    with _Record() as rec:
        state = fg.prepare(fm.params, [data])
    feats = state.train_features
    assert feats is not None and len(state.blocks) == 1 and state.blocks[0][1:] == (0, 16)
    # the Fisher's gram reads the features whole (no slice of the one block), and the inverse
    # is not cast to the dtype it has
    on_feats = [n for n, t in rec.calls if isinstance(t, torch.Tensor) and t is not None
                and t.data_ptr() == feats.data_ptr() and t.shape == feats.shape]
    assert "__getitem__" not in on_feats, on_feats
    inv = next(iter(state.inverses.values()))
    assert inv.dtype == dtype
    with _Record() as rec:
        s = fg.score(fm.params, state, None, data)
    assert not [1 for n, t in rec.calls if n == "to" and t is feats], "cached rows cast in place"
    assert s.shape == (40, 40) and torch.isfinite(s).all()


def test_inverses_cast_only_where_the_dtype_differs(monkeypatch):
    """A half-precision Fisher is factored in float32 and cast back (one .to); a float32 one
    takes no cast."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(30, 4, generator=gen)
    for dtype, casts in ((torch.float32, 0), (torch.bfloat16, 2)):  # up to float32, back
        G = (X.mT @ X).to(dtype)
        with _Record() as rec:
            inv = _FISHER._inverses("f", {"b": G}, (("b", 0, 4),), 30, None, lambda: iter(()))
        assert inv["b"].dtype == dtype
        assert rec.names().count("to") + rec.names().count("float") == casts, rec.names()
        A = (G.float() / 30)
        A.diagonal().add_(0.1 * A.diagonal().mean())
        assert torch.allclose(inv["b"].float(), torch.linalg.inv(A),
                              rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)
