"""Bare parameters read by rows (text-lm's ``self.pos[:T]``): captured as dense rows in the one
capture pass, ``dW[v] = sum_{t: id_t = v} g_t``, against per-example autodiff (float64, 1e-10).

A 1-D or 2-D ``nn.Parameter`` of a hand-written module (kind ``"bare"`` of
``layer_specs(..., bare=True)``) is a candidate of every plan; the check keeps it where the
forward reads it by rows (a slice, an int or integer ids on dim 0) and adds the rows to a
batch-first tensor, drops it after one warning naming it where a row read is used otherwise,
and drops it silently where the forward never reads it by rows (``x * s``, ``x @ W``: those
keep vmap(grad), as before).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_cos, grad_dot, tracin
from dattri_fn.attribute.trak import trak
from dattri_fn.eval.tasks import lm_loss
from dattri_fn.eval.tiny_lm import TinyLM
from dattri_fn.transforms import layer_grads_ties as ties
from dattri_fn.transforms.capture import layer_specs
from dattri_fn.transforms.grad import per_sample_grad
from dattri_fn.transforms.layer_grads import check_plan, layer_plan, per_sample_layer_grads

DT = torch.float64
TOL = dict(rtol=0, atol=1e-10)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = _gen(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / 2)
    return model


class _Holder(nn.Module):
    """A hand-written module holding one bare 1-D parameter (registered last: the twin's order)."""

    def __init__(self, C):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(C))


class PosNet(nn.Module):
    """tok(idx) + pos rows -> fc -> (+ pos rows again) -> head, mean over positions.

    ``read``: how the rows are read: ``"slice"`` ``pos[:T]``, ``"twice"`` (``pos[:T]`` added
    again after fc), ``"ids"`` ``pos[arange(T)[None]]`` (shared ids ``[1, T]``), ``"int"`` ``pos[1]``
    (one row for every position), ``"batch"`` ``pos[idx % ctx]`` (per-example ids, an
    Embedding's lookup), ``"bias1d"`` a 1-D ``b[:C]`` added to the logits, ``"unsqueeze"``
    ``pos[:T].unsqueeze(0)`` (a view of the rows: not captured), ``"cols"`` ``pos[:T, :D]``
    (not a row selection), ``"mul"`` the 1-D ``b`` only multiplied (never read by rows),
    ``"fembed"`` / ``"fembed_batch"`` ``F.embedding(ids, pos)`` at shared / per-example ids,
    ``"whole"`` pos itself added (T = its rows) and the 1-D b itself subtracted and added in
    place."""

    def __init__(self, V=7, ctx=6, D=4, C=3, read="slice"):
        super().__init__()
        self.tok, self.fc, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, C)
        self.pos = nn.Parameter(torch.zeros(ctx, D))
        self.extra = _Holder(C)
        self.read = read

    def forward(self, idx):
        T, r = idx.shape[1], self.read
        pos = {"ids": lambda: self.pos[torch.arange(T)[None]], "int": lambda: self.pos[1],
               "batch": lambda: self.pos[idx % self.pos.shape[0]],
               "unsqueeze": lambda: self.pos[:T].unsqueeze(0),
               "cols": lambda: self.pos[:T, :self.pos.shape[1]],
               "fembed": lambda: F.embedding(torch.arange(T)[None], self.pos),
               "fembed_batch": lambda: F.embedding(idx % self.pos.shape[0], self.pos),
               "whole": lambda: self.pos,
               "ids1d": lambda: self.pos[torch.arange(T)],
               }.get(r, lambda: self.pos[:T])()
        h = torch.tanh(self.fc(self.tok(idx) + pos))
        if r == "twice":
            h = h + self.pos[:T]
        out = self.head(h)
        if r == "bias1d":
            out = out + self.extra.b[:out.shape[-1]]
        elif r == "whole":  # the bias itself, subtracted; then added in place
            out = (self.extra.b - out).neg()
            out += self.extra.b
        elif r == "mul":
            out = out * self.extra.b
        return out.mean(1)


class Twin(nn.Module):
    """PosNet("slice" / "twice") with pos an nn.Embedding read at arange(T)[None] (the engine's
    broadcast Embedding, GPT-2's wpe), registered first: the same keys' order and sizes."""

    def __init__(self, net: PosNet):
        super().__init__()
        self.pos = nn.Embedding(*net.pos.shape)
        self.tok, self.fc, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.extra, self.read = _Holder(3), net.read
        self.double().eval()
        with torch.no_grad():
            for k, v in net.state_dict().items():
                dict(self.named_parameters())["pos.weight" if k == "pos" else k].copy_(v)

    def forward(self, idx):
        T = idx.shape[1]
        h = torch.tanh(self.fc(self.tok(idx) + self.pos(torch.arange(T)[None])))
        if self.read == "twice":
            h = h + self.pos(torch.arange(T)[None])
        return self.head(h).mean(1)


def _data(seed, n, T):
    g = _gen(seed)
    return torch.randint(0, 7, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)


def _silent(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def test_bare_specs_list_hand_written_parameters_only():
    """layer_specs(bare=True) adds pos [6, 4] (width 4) and extra.b [3] (width 1) by their keys;
    torch's layers' parameters (tok, fc, head) are never bare; without bare they are absent."""
    net = PosNet()
    specs = layer_specs(net, norms=True, bare=True)
    assert [(n, s.kind, s.weight, s.out_features) for n, s in specs.items() if s.kind == "bare"] \
        == [("pos", "bare", "pos", 4), ("extra.b", "bare", "extra.b", 1)]
    assert set(layer_specs(net)) == {"tok", "fc", "head"}
    assert set(layer_specs(TinyLM(11, 6, 8, 2, 12), bare=True)) - set(
        layer_specs(TinyLM(11, 6, 8, 2, 12), norms=True)) == {"pos"}


def test_text_lm_pos_rows_equal_vmap_grad():
    """text-lm's TinyLM, every param: G_i == vmap(grad) rows (1e-10), pos captured (plan.bare,
    no vmap(grad) key left) with no warning."""
    model = _init(TinyLM(11, 6, 8, 2, 12), 0)
    fm = functional_model(model, lm_loss)
    g = _gen(1)
    batch = (torch.randint(0, 11, (5, 6), generator=g), torch.randint(0, 11, (5, 6), generator=g))
    plan = _silent(lambda: check_plan(layer_plan(fm), fm.params, batch))
    assert plan.bare == ("pos",) and plan.autodiff == () and not plan.dense
    lg = _silent(lambda: per_sample_layer_grads(fm, fm.params, batch, plan=plan))
    torch.testing.assert_close(lg.to_dense()[0], per_sample_grad(fm.loss, fm.params, batch), **TOL)


@pytest.mark.parametrize("read", ["slice", "twice", "ids", "int", "batch", "bias1d", "fembed",
                                  "fembed_batch"])
@pytest.mark.parametrize("T", [2, 3, 6])
def test_rows_read_and_added_are_captured(read, T):
    """pos[:T] (T = 2, 3, 6 of 6 rows), read twice (two records, summed), by shared ids, one
    int row, per-example ids, a 1-D b[:C], F.embedding(ids, pos): G_i == vmap(grad) (1e-10),
    captured, silent; a plan checked at one T applies at another."""
    fm = functional_model(_init(PosNet(read=read), T), F.cross_entropy)
    plan = _silent(lambda: check_plan(layer_plan(fm), fm.params, _data(0, 3, T)))
    assert plan.bare == (("pos", "extra.b") if read == "bias1d" else ("pos",))
    assert plan.autodiff == (() if read == "bias1d" else ("extra.b",))
    for batch in (_data(1, 4, T), _data(2, 3, max(T - 1, 1))):
        lg = _silent(lambda b=batch: per_sample_layer_grads(fm, fm.params, b, plan=plan))
        torch.testing.assert_close(lg.to_dense()[0], per_sample_grad(fm.loss, fm.params, batch),
                                   **TOL)


@pytest.mark.parametrize("n", [3, 6])
def test_whole_bare_weights_added_are_captured(n):
    """pos [6, D] itself added to [B, 6, D]; the 1-D b itself subtracted from the logits and
    added in place (B = 3, and B = 6 = pos's rows): G_i == vmap(grad) (1e-10), both captured."""
    fm = functional_model(_init(PosNet(read="whole"), 5), F.cross_entropy)
    plan = _silent(lambda: check_plan(layer_plan(fm), fm.params, _data(0, n, 6)))
    assert plan.bare == ("pos", "extra.b") and plan.autodiff == () and not plan.dense
    batch = _data(1, n, 6)
    lg = _silent(lambda: per_sample_layer_grads(fm, fm.params, batch, plan=plan))
    torch.testing.assert_close(lg.to_dense()[0], per_sample_grad(fm.loss, fm.params, batch), **TOL)


@pytest.mark.parametrize("read", ["unsqueeze", "cols"])
def test_rows_used_otherwise_warn_once_and_stay_exact(read):
    """pos[:T].unsqueeze(0) (a view of the rows) or pos[:T, :D] (not a row selection): one
    warning naming pos, pos back on vmap(grad), rows exact (1e-10)."""
    fm = functional_model(_init(PosNet(read=read), 0), F.cross_entropy)
    with pytest.warns(RuntimeWarning, match=r"densely \(vmap\(grad\)\).* pos: ") as record:
        plan = check_plan(layer_plan(fm), fm.params, _data(0, 3, 4))
    assert len([w for w in record if "layer_grads" in str(w.message)]) == 1
    assert "pos" in plan.autodiff and plan.bare == () and not plan.dense
    batch = _data(1, 5, 4)
    lg = _silent(lambda: per_sample_layer_grads(fm, fm.params, batch, plan=plan))
    torch.testing.assert_close(lg.to_dense()[0], per_sample_grad(fm.loss, fm.params, batch), **TOL)


@pytest.mark.parametrize("n", [3, 4])
def test_shared_flat_ids_of_the_batch_size_fall_back_exactly(n):
    """pos[arange(T)] (ids [T], T = 4): at B = 3 shared rows, captured silently; at B = T = 4 the
    ids read as one per example and then meet [B, T, D] as positions: one warning naming pos
    (the Embedding kind's hazard), pos on vmap(grad). Rows == vmap(grad) (1e-10) both ways."""
    fm = functional_model(_init(PosNet(read="ids1d"), 2), F.cross_entropy)
    batch = _data(0, n, 4)
    if n == 4:
        with pytest.warns(RuntimeWarning, match=r"pos: its flat indices \[4\] are broadcast"):
            plan = check_plan(layer_plan(fm), fm.params, batch)
        assert plan.bare == () and "pos" in plan.autodiff
    else:
        plan = _silent(lambda: check_plan(layer_plan(fm), fm.params, batch))
        assert plan.bare == ("pos",)
    lg = _silent(lambda: per_sample_layer_grads(fm, fm.params, batch, plan=plan))
    torch.testing.assert_close(lg.to_dense()[0], per_sample_grad(fm.loss, fm.params, batch), **TOL)


def test_a_bare_parameter_never_read_by_rows_is_dropped_silently():
    """out * b (b 1-D, only multiplied): no warning, b on vmap(grad), rows exact (1e-10)."""
    fm = functional_model(_init(PosNet(read="mul"), 0), F.cross_entropy)
    assert layer_plan(fm).bare == ("pos", "extra.b")
    plan = _silent(lambda: check_plan(layer_plan(fm), fm.params, _data(0, 3, 4)))
    assert plan.bare == ("pos",) and plan.autodiff == ("extra.b",)
    batch = _data(1, 5, 4)
    lg = _silent(lambda: per_sample_layer_grads(fm, fm.params, batch, plan=plan))
    torch.testing.assert_close(lg.to_dense()[0], per_sample_grad(fm.loss, fm.params, batch), **TOL)


@pytest.mark.parametrize("broken", [0, 1, 2])
def test_the_check_catches_a_broken_capture_of_bare_rows(broken, monkeypatch):
    """pos rows 1% off on example 0, 1 (middle: the sum identity) or 2 of the 3 checked: the
    check warns and the plan is dense; the rows are then vmap(grad)'s (1e-10)."""
    fm = functional_model(_init(PosNet(), 0), F.cross_entropy)
    real = ties._embedding_rows

    def off(spec, a, g, lead, shape):
        rows = real(spec, a, g, lead, shape)
        if spec.kind == "bare":
            rows = rows.clone()
            rows[:, broken] *= 1.01
        return rows

    monkeypatch.setattr(ties, "_embedding_rows", off)
    batch = _data(0, 3, 4)
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        plan = check_plan(layer_plan(fm), fm.params, batch)
    assert plan.dense
    lg = per_sample_layer_grads(fm, fm.params, batch, plan=plan)
    torch.testing.assert_close(lg.to_dense()[0], per_sample_grad(fm.loss, fm.params, batch), **TOL)


@pytest.mark.parametrize("read", ["slice", "twice"])
def test_consumers_scores_equal_the_embedding_twin(read):
    """Grad-Dot (== G_train G_test^T from vmap(grad)), Grad-Cos, TracIn and TRAK on PosNet ==
    the same methods on its twin whose pos is an nn.Embedding (1e-10)."""
    fm = functional_model(_init(PosNet(read=read), 3), F.cross_entropy)
    twin = functional_model(Twin(fm.module), F.cross_entropy)
    train, test = [_data(1, 4, 5), _data(2, 3, 5)], _data(3, 3, 5)
    G = torch.cat([per_sample_grad(fm.loss, fm.params, b) for b in train])
    want = G @ per_sample_grad(fm.loss, fm.params, test).T
    methods = {"grad-dot": (lambda f: grad_dot(f), lambda f: f.params),
               "grad-cos": (lambda f: grad_cos(f), lambda f: f.params),
               "tracin": (lambda f: tracin(f, lrs=[0.1]), lambda f: [f.params]),
               "trak": (lambda f: trak(f, proj_dim=8), lambda f: f.params)}
    for name, (make, params) in methods.items():
        scores = []
        for f in (fm, twin):
            m = make(f)
            state = _silent(lambda m=m, f=f: m.prepare(params(f), train))
            scores.append(_silent(lambda m=m, f=f, s=state: m.score(params(f), s, train, test)))
        torch.testing.assert_close(scores[0], scores[1], **TOL, msg=name)
        if name == "grad-dot":
            torch.testing.assert_close(scores[0], want, **TOL)


def test_a_refused_bare_parameter_costs_no_narrowing_forward(monkeypatch):
    """out * b on 3 examples (no tie group): the check drops b from the refused pass itself,
    with no tapped.check forward; the checked plan and rows equal those of a plan built
    without b (1e-10)."""
    fm = functional_model(_init(PosNet(read="mul"), 0), F.cross_entropy)
    plan = layer_plan(fm)
    calls = []
    monkeypatch.setattr(plan.tapped, "check", lambda *a, **k: calls.append(1) or {})
    batch = _data(0, 3, 4)
    checked = _silent(lambda: check_plan(plan, fm.params, batch))
    assert calls == [] and checked.autodiff == ("extra.b",) and checked.bare == ("pos",)
    lg = per_sample_layer_grads(fm, fm.params, batch, plan=checked)
    torch.testing.assert_close(lg.to_dense()[0], per_sample_grad(fm.loss, fm.params, batch), **TOL)
