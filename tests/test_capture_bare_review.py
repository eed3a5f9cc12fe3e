"""Review R7's findings on the capture engine's row reads (bare weights and Embeddings).

Every test compares per-example rows from a plan with float64 ``per_sample_grad`` (vmap(grad))
at 1e-10: a row read the engine cannot prove to be one row per example is refused by name (one
warning, that parameter on vmap(grad)), never captured with mixed examples.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.transforms.grad import per_sample_grad
from dattri_fn.transforms.layer_grads import check_plan, layer_plan, per_sample_layer_grads

DT = torch.float64
CTX = 8


class Net(nn.Module):
    """Token embedding, a Linear ``fc`` and a Linear head, plus the ``parts`` ``fwd`` uses: the
    query/key Linears ``q``, ``k`` of a score [B, T, T], the hand-written tables ``rel``
    [2 CTX - 1], ``pos`` [CTX, D], ``w`` [D], ``col`` [CTX, 1], or the Embedding ``remb``."""

    def __init__(self, fwd, parts: tuple[str, ...], *, scale: float = 1.0):
        super().__init__()
        self.tok, self.fc, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        make = {"q": lambda: nn.Linear(4, 4), "k": lambda: nn.Linear(4, 4),
                "rel": lambda: nn.Parameter(torch.zeros(2 * CTX - 1)),
                "remb": lambda: nn.Embedding(2 * CTX - 1, 1),
                "pos": lambda: nn.Parameter(torch.zeros(CTX, 4)),
                "w": lambda: nn.Parameter(torch.zeros(4)),
                "col": lambda: nn.Parameter(torch.zeros(CTX, 1))}
        for part in parts:
            setattr(self, part, make[part]())
        self.fwd = fwd
        g = torch.Generator().manual_seed(0)
        self.double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / 2)
            self.fc.weight.mul_(scale)

    def forward(self, idx):
        return self.fwd(self, idx)


def _rid(T: int) -> torch.Tensor:
    # relative position i - j of every query/key pair, shared by the batch: [T, T]
    return torch.arange(T)[:, None] - torch.arange(T)[None] + CTX - 1


def _attend(m, x, s):
    return m.head(torch.tanh(m.fc(torch.softmax(s, -1) @ x))).mean(1)


def _scores(m, idx):
    x = m.tok(idx)
    return x, m.q(x) @ m.k(x).transpose(1, 2)  # [B, T, T]


def rel_add(m, idx):
    x, s = _scores(m, idx)
    return _attend(m, x, s + m.rel[_rid(idx.shape[1])])


def rel_radd_after_shape_query(m, idx):
    x, s = _scores(m, idx)
    r = m.rel[_rid(idx.shape[1])]
    assert r.shape == s.shape[1:] and r.dtype == s.dtype  # queries are no use of the rows
    return _attend(m, x, r + s)


def rel_inplace(m, idx):
    x, s = _scores(m, idx)
    s += m.rel[_rid(idx.shape[1])]
    return _attend(m, x, s)


def rel_contiguous(m, idx):
    x, s = _scores(m, idx)
    return _attend(m, x, s + m.rel[_rid(idx.shape[1])].contiguous())  # returns the rows themselves


def rel_unsqueezed(m, idx):
    x, s = _scores(m, idx)
    return _attend(m, x, s + m.rel[_rid(idx.shape[1])].unsqueeze(0))


def rel_none(m, idx):
    x, s = _scores(m, idx)
    return _attend(m, x, s + m.rel[_rid(idx.shape[1])][None])


def rel_expanded(m, idx):
    x, s = _scores(m, idx)
    return _attend(m, x, s + m.rel[_rid(idx.shape[1])].expand(idx.shape[0], -1, -1))


def rel_transposed_scaled(m, idx):
    x, s = _scores(m, idx)
    return _attend(m, x, s + 0.5 * m.rel[_rid(idx.shape[1])].transpose(0, 1).neg())


def emb_add(m, idx):
    x, s = _scores(m, idx)
    return _attend(m, x, (s[..., None] + m.remb(_rid(idx.shape[1])))[..., 0])


def data(seed: int, n: int, T: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)


def _rows(fm, plan, batch):
    got = per_sample_layer_grads(fm, fm.params, batch, plan=plan).to_dense()[0]
    return (got - per_sample_grad(fm.loss, fm.params, batch)).abs().max().item()


@pytest.mark.parametrize("fwd", [rel_add, rel_radd_after_shape_query, rel_inplace, rel_contiguous,
                                 rel_unsqueezed, rel_none, rel_expanded, rel_transposed_scaled, emb_add])
def test_shared_2d_ids_checked_at_b_ne_t_stay_exact_at_b_eq_t(fwd):
    """Ids [T, T] shared by the batch look batch-first at B == T: G(plan) = vmap(grad) at 1e-10
    on B == T batches of a plan checked at B != T, with a warning naming the table when the
    rows of that batch cannot be captured (R7 F1: silently 0.16 off before)."""
    fm = functional_model(Net(fwd, ("q", "k", "remb" if fwd is emb_add else "rel")), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # refused at the check (unsqueeze) or not: both exact
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 5))
    table = "remb" if fwd is emb_add else "rel"
    for n, T in [(5, 5), (6, 6), (3, 3)]:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            err = _rows(fm, plan, data(1, n, T))
        assert err <= 1e-10, (n, T, err)
        if table in plan.captured:
            assert any(table in str(x.message) for x in w), [str(x.message) for x in w]


def test_shared_2d_ids_with_an_unchecked_plan_at_b_eq_t_are_exact():
    """An unchecked plan is checked on the B == T batch it is applied to: rows = vmap(grad)."""
    for fwd in (rel_add, rel_unsqueezed, emb_add):
        fm = functional_model(Net(fwd, ("q", "k", "remb" if fwd is emb_add else "rel")), F.cross_entropy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert _rows(fm, layer_plan(fm), data(1, 5, 5)) <= 1e-10


def test_the_b_eq_t_refusal_names_the_broadcast():
    """The refusal says what it saw: the rows [T, T] broadcast against [B, T, T]."""
    fm = functional_model(Net(rel_add, ("q", "k", "rel")), F.cross_entropy)
    with pytest.warns(RuntimeWarning, match=r"rel: its indices, batch-first by shape only, give rows "
                                            r"\[5, 5\] that are broadcast as positions against \[5, 5, 5\]"):
        plan = check_plan(layer_plan(fm), fm.params, data(0, 5, 5))
    assert "rel" not in plan.bare and not plan.dense


def _frozen_pos(m, idx):
    with torch.no_grad():  # frozen positions: vmap(grad) gives pos zero rows
        pe = m.pos[:idx.shape[1]]
    return m.head(torch.tanh(m.fc(m.tok(idx) + pe))).mean(1)


@pytest.mark.parametrize("scale", [1.0, 1e-8])
def test_rows_read_under_no_grad_and_used_outside_are_refused(scale):
    """Rows read under no_grad have g = 0; their held probe would give them dL/d(x + rows) (R7 F2,
    missed by the check at fc * 1e-8 before): refused by name, the rest captured, rows exact."""
    fm = functional_model(Net(_frozen_pos, ("pos",), scale=scale), F.cross_entropy)
    with pytest.warns(RuntimeWarning, match=r"pos: .*read under torch.no_grad\(\) and used outside it"):
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 4))
    assert "pos" in plan.autodiff and "fc" in plan.captured and not plan.dense
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rows(fm, plan, data(1, 4, 5)) <= 1e-10


def test_rows_read_and_used_under_no_grad_stay_captured_silently():
    """A frozen part wholly under no_grad (read and use): g = 0 from the capture as from vmap(grad)."""
    def fwd(m, idx):
        x = m.tok(idx)
        with torch.no_grad():
            x = x + m.pos[:idx.shape[1]]
        return m.head(torch.tanh(m.fc(x))).mean(1)

    fm = functional_model(Net(fwd, ("pos",)), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 4))
        assert "pos" in plan.bare
        assert _rows(fm, plan, data(1, 4, 5)) <= 1e-10


@pytest.mark.parametrize("how", ["1+w", "w+1.0", "w-1", "2*w"])
def test_a_gain_offset_by_a_python_scalar_is_silent(how):
    """``h * (1 + w)`` (Gemma's RMSNorm) is no row read (R7 F4): no warning, w on vmap(grad), exact."""
    gain = {"1+w": lambda w: 1 + w, "w+1.0": lambda w: w + 1.0, "w-1": lambda w: w - 1,
            "2*w": lambda w: 2 * w}[how]

    def fwd(m, idx):
        h = m.tok(idx)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * gain(m.w)
        return m.head(torch.tanh(m.fc(h))).mean(1)

    fm = functional_model(Net(fwd, ("w",)), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 4))
        assert "w" in plan.autodiff and "fc" in plan.captured
        assert _rows(fm, plan, data(1, 4, 5)) <= 1e-10


def test_a_uint8_index_is_a_mask_not_row_ids():
    """torch reads a uint8 index as a mask (R7 F5): refused as "not ... integer rows", the rest
    captured (before: the pass crashed and every layer went dense), rows exact."""
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.uint8)

    def fwd(m, idx):
        return m.head(torch.tanh(m.fc(m.tok(idx) + m.pos[mask]))).mean(1)

    fm = functional_model(Net(fwd, ("pos",)), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "indexing with dtype torch.uint8")
        with pytest.warns(RuntimeWarning, match=r"pos: an index \[\[8\] torch.uint8\] that is not a "
                                                r"slice, an int or integer rows"):
            plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 3))
        assert "pos" in plan.autodiff and "fc" in plan.captured and not plan.dense
        assert _rows(fm, plan, data(1, 4, 3)) <= 1e-10


@pytest.mark.parametrize("whole", [False, True])
def test_width_one_rows_broadcast_over_the_width_are_refused_alone(whole):
    """A [V, 1] table's rows broadcast over D (R7 F3): that table refused by name ("rows of width
    1"), the other layers still captured (before: the whole model dense), rows exact."""
    def fwd(m, idx):
        c = m.col if whole else m.col[:idx.shape[1]]
        x = m.tok(torch.cat([idx, idx[:, :CTX - idx.shape[1]]], 1)) if whole else m.tok(idx)
        return m.head(torch.tanh(m.fc(x + c))).mean(1)

    fm = functional_model(Net(fwd, ("col",)), F.cross_entropy)
    with pytest.warns(RuntimeWarning, match=r"col: .*has rows of width 1 broadcast over \[3, 8, 4\]'s "
                                            r"width" if whole else r"col: .*has rows of width 1"):
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 4))
    assert "col" in plan.autodiff and "fc" in plan.captured and not plan.dense
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rows(fm, plan, data(1, 4, 4)) <= 1e-10


def test_per_example_rows_used_batch_first_stay_captured_at_b_eq_t():
    """Per-example ids [B, T] (from the data) at B == T, rows added to [B, T, D]: captured, silent,
    rows = vmap(grad) (the F1 refusal does not touch same-rank uses)."""
    def fwd(m, idx):
        return m.head(torch.tanh(m.fc(m.tok(idx) + m.pos[idx]))).mean(1)

    fm = functional_model(Net(fwd, ("pos",)), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 5))
        assert "pos" in plan.bare
        for n, T in [(5, 5), (4, 4)]:
            assert _rows(fm, plan, data(1, n, T)) <= 1e-10


@pytest.mark.parametrize("table", ["pos", "tok"])
def test_per_example_rows_read_under_no_grad_have_zero_rows(table):
    """Per-example rows (ids from the data) read under no_grad, used outside it: g = 0 as from
    vmap(grad), on a plan checked at B != T and applied at B == T."""
    def fwd(m, idx):
        with torch.no_grad():
            pe = m.pos[idx] if table == "pos" else m.tok(idx)
        x = m.tok(idx) if table == "pos" else m.pos[idx]
        return m.head(torch.tanh(m.fc(x + pe))).mean(1)

    fm = functional_model(Net(fwd, ("pos",)), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 5))
        for n, T in [(3, 5), (5, 5)]:
            assert _rows(fm, plan, data(1, n, T)) <= 1e-10


@pytest.mark.parametrize("fwd", [rel_unsqueezed, rel_none, rel_expanded])
def test_shared_rows_moved_behind_new_dims_at_b_eq_t_are_refused(fwd):
    """rel[rid] [T, T] at B == T moved behind a new leading dim (unsqueeze(0), [None], expand):
    refused by name at the read's use, whatever the check's tolerance; the rest captured, exact."""
    fm = functional_model(Net(fwd, ("q", "k", "rel")), F.cross_entropy)
    with pytest.warns(RuntimeWarning, match=r"rel: its rows \[3, 3\], batch-first by shape only, "
                                            r"are moved behind new dims"):
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 3))
    assert "rel" in plan.autodiff and "q" in plan.captured and not plan.dense
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _rows(fm, plan, data(1, 3, 3)) <= 1e-10


def test_shared_rows_through_same_rank_ops_at_b_eq_t_are_refused():
    """rel[rid] [T, T] at B == T through transpose, neg and * 0.5 (same rank, dim 0 still of size B),
    then added to [B, T, T]: still watched, refused by name at the add, the rest captured, exact."""
    fm = functional_model(Net(rel_transposed_scaled, ("q", "k", "rel")), F.cross_entropy)
    with pytest.warns(RuntimeWarning, match=r"rel: its indices, batch-first by shape only, give rows "
                                            r"\[3, 3\] that are broadcast as positions against \[3, 3, 3\]"):
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 3))
    assert "rel" in plan.autodiff and "q" in plan.captured and not plan.dense
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _rows(fm, plan, data(1, 3, 3)) <= 1e-10


def test_rows_of_one_example_are_never_refused():
    """B = 1: one example cannot be mixed with another, so rel[rid] at B = T = 1 stays captured
    silently and exact (tok is used once, rows = vmap(grad))."""
    fm = functional_model(Net(rel_none, ("q", "k", "rel")), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = check_plan(layer_plan(fm), fm.params, data(0, 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rows(fm, layer_plan(fm), data(1, 1, 1)) <= 1e-10
        assert _rows(fm, plan, data(1, 1, 1)) <= 1e-10
