"""Stop 27 review RU3 (M1-M4, L2) and review RH (L5): engineer H2's fixes."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    return functional_model(model, F.cross_entropy), (x, y)


@pytest.mark.parametrize("solver,kw,bad", [
    ("lissa", dict(scale=50.0, max_iter=50), "max_iter"), ("explicit", dict(max_iter=5), "max_iter"),
    ("cg", dict(rank=4), "rank"), ("ekfac", dict(max_iter=5), "max_iter"),
    ("datainf", dict(tol=1e-3), "tol"), ("minres", dict(M=None), "M")])
def test_unknown_solver_keyword_refused_at_construction(solver, kw, bad):
    # RU3 M1; mutation: drop _check_known's call -> constructs, prepare raises a raw TypeError
    fm, _ = _mlp()
    with pytest.raises(TypeError, match=rf"influence\({bad}=\.\.\.\): solver '{solver}' takes"):
        influence(fm, solver=solver, damping=0.1, **kw)


def test_known_solver_keywords_still_run():
    fm, (x, y) = _mlp()
    for solver, kw in [("lissa", dict(scale=50.0, depth=5, seed=0)), ("cg", dict(max_iter=5)),
                       ("arnoldi", dict(rank=4, rtol=1e-3)), ("ekfac", dict(query_rank=2)),
                       ("explicit", dict(method="lu"))]:
        m = influence(fm, solver=solver, damping=0.1, **kw)
        s = m.prepare(fm.params, (x, y))
        assert torch.isfinite(m.score(fm.params, s, (x, y), (x[:3], y[:3]))).all()


@pytest.mark.parametrize("method", ["cg", "ekfac", "logra"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factorisations(method, dtype):
    # RU3 M4; mutation: eigh/QR on the half factor -> "not implemented for 'Half'" (and block
    # CG without the empty-block stop -> a reshape error on the spent Krylov space)
    from dattri_fn.attribute import logra

    torch.manual_seed(1)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    out = {}
    for dt in (torch.float64, dtype):
        torch.manual_seed(0)
        fm = functional_model(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
                              .to(dt).eval(), F.cross_entropy)
        m = logra(fm, proj_dim=2) if method == "logra" else influence(fm, solver=method,
                                                                       damping=0.1)
        with warnings.catch_warnings():  # half-precision CG cannot reach rtol=1e-6: warned
            warnings.simplefilter("ignore")
            s = m.prepare(fm.params, (x.to(dt), y))
            out[dt] = m.score(fm.params, s, (x.to(dt), y), (x[:3].to(dt), y[:3]))
    assert out[dtype].dtype == dtype
    ref = out[torch.float64]
    assert float((out[dtype].double() - ref).abs().max() / ref.abs().max()) < 2e-2


def test_representer_frozen_backbone_feature_fn():
    # RU3 M2; mutation: drop rows()' no_grad -> score raises mm(out=) autograd error and the
    # state's features carry the backbone's grad_fn
    from dattri_fn.attribute import representer

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 5), nn.Tanh()).double().eval()
    head = nn.Linear(5, 3).double()
    fm = functional_model(head, F.cross_entropy)
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    rp = representer(lambda p, ex: backbone(ex[0][None])[0],
                     lambda p, h: p["weight"] @ h + p["bias"], F.cross_entropy, l2=0.01,
                     refit="labels")
    st = rp.prepare(fm.params, (x, y))
    assert all(t.grad_fn is None and not t.requires_grad for t in st)
    S = rp.score(fm.params, st, (x, y), (x[:4], y[:4]))
    assert S.grad_fn is None and rp.self_score(fm.params, st, (x, y)).grad_fn is None
    with torch.no_grad():
        assert torch.equal(S, rp.score(fm.params, st, (x, y), (x[:4], y[:4])))


@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_channels_last_maxpool_hessian(solver):
    # RU3 M3; mutation: drop hvp's per-batch .contiguous() -> torch's raw vmap NYI
    # (is_contiguous for channels_last) from the batched double backward
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).double().eval()
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    out = []
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        m = influence(fm, solver=solver, damping=1.0, curvature="hessian",
                      **({"rtol": 1e-12} if solver == "cg" else {}))
        out.append(m.score(fm.params, m.prepare(fm.params, (xx, y)), (xx, y), (xx[:2], y[:2])))
    assert float((out[1] - out[0]).abs().max() / out[0].abs().max()) < 1e-12


def test_labels_n_by_1_named():
    # RU3 L2; mutation: drop AssertionError from blame_data -> torch's raw AssertionError
    from dattri_fn.attribute import grad_dot

    fm, (x, y) = _mlp()
    with pytest.raises(ValueError, match=r"grad_dot\(train=\.\.\.\): expected examples"):
        grad_dot(fm).score(fm.params, (), (x, y[:, None]), (x[:2], y[:2]))


def test_fisher_refusal_names_replaced_loss():
    # review RH L5; mutation: the old advice only ("Pass the FunctionalModel itself"), which a
    # user who passed fm._replace(loss=...) already followed
    fm, (x, y) = _mlp()

    def branchy(p, ex):  # data-dependent control flow: vmap cannot run it
        return fm.loss(p, ex) * (2.0 if float(ex[1].sum()) > 1 else 1.0)

    m = influence(fm._replace(loss=branchy), solver="explicit", damping=0.1, curvature="fisher")
    with pytest.raises(ValueError, match=r"replaced by fm\._replace\(loss=\.\.\.\) has no layer "
                                         r"plan: make that loss vmappable"):
        m.prepare(fm.params, (x, y))
