"""DVEmb from a Record with per-step gradient stores: exact against MAGIC with the batch Hessian,
against the closed-form product with the recorded (projected) Fisher."""

import pytest
import torch
from test_training import mlp_problem
from torch.func import grad, vmap

from dattri_fn.attribute.dvemb import dvemb
from dattri_fn.attribute.magic import metagradient
from dattri_fn.testing.problems import per_example_grads
from dattri_fn.training import (
    GradSpec,
    adam,
    batch_order,
    cosine_schedule,
    finish_record,
    make_step,
    record_step,
    sgd,
    start_record,
    take,
    train,
)
from dattri_fn.transforms.project import make_projector

DT = torch.float64


def sgd_run(tmp_path, proj_dim=None, opt_name="sgd", stores=True):
    """12 examples, batches of 4, 2 epochs of SGD (cosine lr, wd 0.01), every step recorded."""
    _, params, loss, data = mlp_problem(n=12, seed=8)
    order = batch_order(12, batch_size=4, epochs=2, seed=4)
    sched = cosine_schedule(0.5, len(order))
    opt = sgd(sched, weight_decay=0.01) if opt_name == "sgd" else adam(0.05)
    step = make_step(loss, opt)
    spec = GradSpec(loss, str(tmp_path / "grads"), proj_dim, seed=2) if stores else None
    rec = start_record(opt_name, checkpoint_every=1, weight_decay=0.01, grads=spec)
    state = (params, opt.init(params))
    for t, rows in enumerate(order):
        batch = take(data, rows)
        rec = record_step(rec, rows, lr=sched(t), params=state[0], opt_state=state[1], batch=batch)
        state = step(*state, batch, torch.ones(len(rows), dtype=DT))
    return finish_record(rec, params=state[0], opt_state=state[1]), loss, data, step, opt, params, order


def queries():
    g = torch.Generator().manual_seed(9)
    return torch.randn(5, 3, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)


def test_hessian_curvature_equals_magic_for_minibatch_sgd(tmp_path):
    """curvature='hessian': e(z) through prod (I - eta_k (H_k + wd I)) == MAGIC d(-loss_j)/dw_i, 1e-10."""
    record, loss, data, step, opt, params, order = sgd_run(tmp_path)
    test = queries()
    method = dvemb(loss, curvature="hessian")
    scores = method.score(record, method.prepare(record, data), data, test)
    traj = train(step, params, opt.init(params), data, order, checkpoint_every=1)
    cot = vmap(grad(lambda p, ex: -loss(p, ex)), in_dims=(None, 0))(traj.params, test)
    exact = metagradient(step, traj, data, order, cot).weights.T
    torch.testing.assert_close(scores, exact, rtol=1e-10, atol=1e-12)


def test_fisher_curvature_equals_the_closed_form_in_the_projected_space(tmp_path):
    """Projected stores (d=6): score == sum_t (eta_t/B) (R^T q)^T prod_k (I - eta_k (Gk^T Gk / B + wd I))
    R^T g_t(z), gradients by autograd at each step's params, 1e-10."""
    record, loss, data, *_ = sgd_run(tmp_path, proj_dim=6)
    test = queries()
    P = sum(v.numel() for v in record.final.params.values())
    R = make_projector(P, proj_dim=6, seed=2, dtype=DT).matrix()
    steps = {c.step: c.params for c in record.checkpoints}
    Gs = [per_example_grads(loss, steps[t], take(data, record.order[t])) @ R
          for t in range(record.steps)]
    q = per_example_grads(loss, record.final.params, test) @ R  # [5, 6]
    ref = torch.zeros(12, 5, dtype=DT)
    for t in range(record.steps):
        prod = torch.eye(6, dtype=DT)
        for k in range(t + 1, record.steps):
            A = Gs[k].T @ Gs[k] / 4 + 0.01 * torch.eye(6, dtype=DT)
            prod = (torch.eye(6, dtype=DT) - float(record.lrs[k]) * A) @ prod
        for r, i in enumerate(record.order[t].tolist()):
            ref[i] += float(record.lrs[t]) / 4 * (q @ prod @ Gs[t][r])
    method = dvemb(loss)
    scores = method.score(record, method.prepare(record, data), data, test)
    torch.testing.assert_close(scores, ref, rtol=1e-10, atol=1e-12)


def test_self_score_is_the_diagonal_and_batching_does_not_matter(tmp_path):
    """self_score == diag(score(train, train)); train given as 2 batches == one batch, 1e-12."""
    record, loss, (x, y), *_ = sgd_run(tmp_path, proj_dim=5)
    method = dvemb(loss)
    state = method.prepare(record, (x, y))
    full = method.score(record, state, (x, y), (x, y))
    parts = [(x[:7], y[:7]), (x[7:], y[7:])]
    torch.testing.assert_close(method.score(record, method.prepare(record, parts), parts, (x, y)),
                               full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(method.self_score(record, state, (x, y)), full.diagonal(),
                               rtol=1e-12, atol=1e-14)


def test_errors_name_the_argument(tmp_path):
    """Adam record, a record without stores, 'hessian' on projected stores: clear errors."""
    record, loss, data, *_ = sgd_run(tmp_path / "a", opt_name="adam")
    with pytest.raises(ValueError, match=r"dvemb\(params=...\): expected a Record of plain SGD"):
        dvemb(loss).prepare(record, data)
    record, *_ = sgd_run(tmp_path / "b", stores=False)
    with pytest.raises(ValueError, match=r"dvemb\(params=...\): expected a Record with per-step"):
        dvemb(loss).prepare(record, data)
    record, *_ = sgd_run(tmp_path / "c", proj_dim=4)
    with pytest.raises(ValueError, match=r"dvemb\(curvature=...\): expected 'fisher' for projected"):
        dvemb(loss, curvature="hessian").prepare(record, data)
    with pytest.raises(ValueError, match=r"dvemb\(curvature=...\): expected 'fisher' or 'hessian'"):
        dvemb(loss, curvature="gn")


def test_identity_projection_is_the_exact_embedding(tmp_path):
    """projection=eye(P) on unprojected stores == no projection (the exact DVEmb), 1e-12;
    self_score follows."""
    record, loss, data, *_ = sgd_run(tmp_path)
    test = queries()
    P = sum(v.numel() for v in record.final.params.values())
    exact = dvemb(loss)
    ident = dvemb(loss, projection=torch.eye(P, dtype=DT))
    s_exact = exact.score(record, exact.prepare(record, data), data, test)
    state = ident.prepare(record, data)
    assert state.embeddings.shape == (12, P) and "matrix" in state.projection
    torch.testing.assert_close(ident.score(record, state, data, test), s_exact, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ident.self_score(record, state, data),
                               exact.self_score(record, exact.prepare(record, data), data),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_seeded_projection_at_prepare_equals_stores_recorded_projected(tmp_path, kind):
    """projection=make_projector(P, d, kind, seed) on exact stores == stores recorded with the
    same (d, kind, seed) projection (the tested projected-space closed form), 1e-10."""
    from dattri_fn.training import record as record_mod

    record, loss, data, *_ = sgd_run(tmp_path / "exact")
    test = queries()
    P = sum(v.numel() for v in record.final.params.values())
    late = dvemb(loss, projection=make_projector(P, proj_dim=6, kind=kind, seed=2))
    ours = late.score(record, late.prepare(record, data), data, test)
    assert record_mod.GradSpec(loss, "x", 6, seed=2).kind == "rademacher"
    if kind == "rademacher":
        projected, *_ = sgd_run(tmp_path / "proj", proj_dim=6)
        early = dvemb(loss)
        torch.testing.assert_close(ours, early.score(projected, early.prepare(projected, data), data, test),
                                   rtol=1e-10, atol=1e-12)
    else:  # the dense matrix of the same projector gives the same embeddings
        R = make_projector(P, proj_dim=6, kind=kind, seed=2, dtype=DT).matrix()
        dense = dvemb(loss, projection=R)
        torch.testing.assert_close(ours, dense.score(record, dense.prepare(record, data), data, test),
                                   rtol=1e-10, atol=1e-12)


def test_projection_errors(tmp_path):
    """A projection with projected stores, with curvature='hessian', of the wrong width, or of
    the wrong type: errors naming dvemb(projection=...) / dvemb(curvature=...)."""
    record, loss, data, *_ = sgd_run(tmp_path / "p", proj_dim=4)
    with pytest.raises(ValueError, match=r"dvemb\(projection=...\): expected None for stores"):
        dvemb(loss, projection=torch.eye(4, dtype=DT)).prepare(record, data)
    record, loss, data, *_ = sgd_run(tmp_path / "e")
    with pytest.raises(ValueError, match=r"dvemb\(projection=...\): expected an input dimension"):
        dvemb(loss, projection=torch.eye(3, dtype=DT)).prepare(record, data)
    with pytest.raises(ValueError, match=r"dvemb\(curvature=...\): expected 'fisher' with a projection"):
        dvemb(loss, curvature="hessian", projection=torch.eye(3, dtype=DT))
    with pytest.raises(TypeError, match=r"dvemb\(projection=...\): expected None, a Projector"):
        dvemb(loss, projection=4)
