"""Stop 28, engineer F (issue 14, item 1): the plain-loss forms of LESS, DVEmb, SOURCE and TRAK on a
model torch.func.vmap cannot run raise ``VmapRefusal`` naming ``method(arg=...)`` and a remedy
that holds for that method (LESS/DVEmb/SOURCE vmap every model; TRAK takes the FunctionalModel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model, grad, per_sample_layer_grads
from dattri_fn.attribute import dvemb, source, trak
from dattri_fn.attribute.less import less
from dattri_fn.attribute.outputs import classification_margin_loss, classification_weight_loss
from dattri_fn.training import (
    GradSpec,
    adam,
    batch_order,
    finish_record,
    make_step,
    record_step,
    sgd,
    start_record,
    take,
)

DT = torch.float64


class _Net(nn.Module):
    """``branch=True``: Python control flow on a tensor's value, which vmap refuses (as HF's
    mask helpers' ``.item()``); the same parameters and values as ``branch=False``."""

    def __init__(self, branch: bool):
        super().__init__()
        self.branch, self.a, self.b = branch, nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.branch and h.sum() > 1e9:
            h = h * 0
        return self.b(h)


def _models(loss_fn=F.cross_entropy):
    torch.manual_seed(0)
    good = _Net(False).double().eval()
    bad = _Net(True).double().eval()
    bad.load_state_dict(good.state_dict())
    return functional_model(good, loss_fn), functional_model(bad, loss_fn)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)


def _record(opt_name: str, grads_dir=None):
    """Two steps of SGD or Adam on the vmappable twin, every step a checkpoint."""
    fg, _ = _models()
    data = _data()
    opt = sgd(0.1) if opt_name == "sgd" else adam(0.05)
    step = make_step(fg.loss, opt)
    state = (fg.params, opt.init(fg.params))
    spec = None if grads_dir is None else GradSpec(fg.loss, str(grads_dir), None, seed=2)
    rec = start_record(opt_name, checkpoint_every=1, grads=spec)
    for rows in batch_order(8, batch_size=4, epochs=1, seed=0):
        b = take(data, rows)
        rec = record_step(rec, rows, lr=0.1, params=state[0], opt_state=state[1],
                          **({"batch": b} if spec is not None else {}))
        state = step(*state, b, torch.ones(len(rows), dtype=DT))
    return finish_record(rec, params=state[0], opt_state=state[1])


def _run(method, params):
    data = _data()
    return method.score(params, method.prepare(params, data), data, data)


def _refused(func: str, arg: str, capture: bool):
    fix = (rf"{func} vmaps {arg} per example for every model, a FunctionalModel too .*"
           r"grad_dot\(fm\), trak\(fm\)" if not capture else
           rf"Pass the FunctionalModel itself \({arg}=fm, not {arg}=fm\.loss\): its per-layer "
           r"capture needs no vmap")
    return pytest.raises(ValueError, match=rf"^{func}\({arg}=\.\.\.\): expected a loss "
                         rf"torch\.func\.vmap can run per example, got vmap's refusal.*{fix}")


def _chained(info) -> None:
    """Torch's error chained, and still a RuntimeError for code that catches it to loop."""
    err = info.value
    assert isinstance(err, RuntimeError) and str(err.__cause__).startswith("vmap:")


@pytest.mark.parametrize("which", ["loss", "fm", "target"])
def test_less_names_the_argument_and_a_vmappable_forward(which):
    fg, fb = _models()
    method = {"loss": lambda: less(fb.loss), "fm": lambda: less(fb),
              "target": lambda: less(fg.loss, target=fb.loss)}[which]()
    with _refused("less", "target" if which == "target" else "loss", False) as info:
        _run(method, _record("adam"))
    _chained(info)


@pytest.mark.parametrize("curvature", ["fisher", "hessian"])
def test_dvemb_names_the_loss(tmp_path, curvature):
    _, fb = _models()
    with _refused("dvemb", "loss", False) as info:  # hessian: prepare's batch Hessian
        _run(dvemb(fb.loss, curvature=curvature), _record("sgd", tmp_path))
    _chained(info)


def test_dvemb_names_the_target(tmp_path):
    fg, fb = _models()
    with _refused("dvemb", "target", False):
        _run(dvemb(fg.loss, target=fb), _record("sgd", tmp_path))


@pytest.mark.parametrize("case", ["hessian", "gn", "target"])
def test_source_names_the_argument(case):
    fg, fb = _models()
    method = {"hessian": lambda: source(fb.loss, curvature="hessian", segments=1),
              "gn": lambda: source(fb, segments=1),  # the curvature runs; the rows vmap
              "target": lambda: source(fg, target=fb.loss, segments=1)}[case]()
    with _refused("source", "target" if case == "target" else "loss", False) as info:
        _run(method, _record("sgd"))
    _chained(info)


@pytest.mark.filterwarnings("ignore:layer_grads. vmap cannot run")
@pytest.mark.parametrize("proj_dim", [None, 4])
def test_trak_plain_output_fn_names_it_and_the_remedy_runs(proj_dim):
    _, mb = _models(classification_margin_loss)
    with _refused("trak", "output_fn", True) as info:
        _run(trak(mb.loss, proj_dim=proj_dim), mb.params)
    _chained(info)
    assert torch.isfinite(_run(trak(mb, proj_dim=proj_dim), mb.params)).all()  # the remedy


@pytest.mark.filterwarnings("ignore:layer_grads. vmap cannot run")
def test_trak_plain_weight_fn_names_it_and_the_remedy_runs():
    _, mb = _models(classification_margin_loss)
    _, wb = _models(classification_weight_loss)
    with _refused("trak", "weight_fn", True) as info:
        _run(trak(mb, proj_dim=4, weight_fn=lambda p, ex: wb.loss(p, ex)), mb.params)
    _chained(info)
    assert torch.isfinite(_run(trak(mb, proj_dim=4, weight_fn=wb), mb.params)).all()


def test_grad_names_the_loss_and_its_remedy_is_the_mean_gradient():
    fg, fb = _models()
    data = _data()
    with pytest.raises(ValueError, match=r"^grad\(loss=\.\.\.\): expected a loss torch\.func\.vmap "
                       r"can run per example.*per_sample_layer_grads\(fm, params, batch\) instead "
                       r"\(for one batch, \.to_dense\(\)\[0\]\.mean\(0\) is this mean gradient\)"
                       ) as info:
        grad(fb.loss, fb.params, data)
    _chained(info)
    remedy = per_sample_layer_grads(fb, fb.params, data).to_dense()[0].mean(0)
    torch.testing.assert_close(remedy, grad(fg.loss, fg.params, data), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["less", "less_target", "dvemb", "source_target", "grad_dot"])
def test_a_non_scalar_loss_names_the_method_not_per_sample_grad(tmp_path, case):
    """A [2]-valued loss: the method's own (arg=...), where it said per_sample_grad(loss=...)."""
    from dattri_fn.attribute import grad_dot

    fg, _ = _models()
    vec = lambda p, ex: fg.loss(p, ex) * torch.ones(2, dtype=DT)  # noqa: E731
    method, params, named = {
        "less": (lambda: less(vec), lambda: _record("adam"), "less(loss"),
        "less_target": (lambda: less(fg.loss, target=vec), lambda: _record("adam"),
                        "less(target"),
        "dvemb": (lambda: dvemb(vec), lambda: _record("sgd", tmp_path), "dvemb(loss"),
        "source_target": (lambda: source(fg, target=vec, segments=1), lambda: _record("sgd"),
                          "source(target"),
        "grad_dot": (lambda: grad_dot(vec), lambda: fg.params, "grad_dot(loss")}[case]
    with pytest.raises(ValueError, match=rf"^{named.replace('(', '[(]')}=\.\.\.\): expected a "
                       r"per-example function .*returning a 0-d Tensor for ONE example"):
        _run(method(), params())


@pytest.mark.parametrize("case", ["less", "dvemb", "source", "trak", "grad_dot"])
def test_a_loss_that_samples_names_the_method_and_its_argument(tmp_path, case):
    """A plain loss with dropout on: 'less(loss=...)', where it said 'less(test=...)',
    'per_sample_grad(loss=...)' (trak) or raised torch's raw vmap error (source's Hessian)."""
    from dattri_fn.attribute import grad_dot

    fg, _ = _models()
    drop = lambda p, ex: F.dropout(fg.loss(p, ex)[None], 0.5, training=True)[0]  # noqa: E731
    method, params, named = {
        "less": (lambda: less(drop), lambda: _record("adam"), "less(loss"),
        "dvemb": (lambda: dvemb(drop), lambda: _record("sgd", tmp_path), "dvemb(loss"),
        "source": (lambda: source(drop, curvature="hessian", segments=1), lambda: _record("sgd"),
                   "source(loss"),
        "trak": (lambda: trak(drop), lambda: fg.params, "trak(output_fn"),
        "grad_dot": (lambda: grad_dot(drop), lambda: fg.params, "grad_dot(loss")}[case]
    with pytest.raises(ValueError, match=rf"^{named.replace('(', '[(]')}=\.\.\.\): expected a "
                       r"loss that draws no random numbers"):
        _run(method(), params())
