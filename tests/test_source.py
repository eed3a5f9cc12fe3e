"""SOURCE from a Record: exact against MAGIC where its approximation is exact, and against a dense
matrix-exponential reference of its own formula elsewhere."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training import mlp_problem
from torch import nn
from torch.func import grad, vmap

from dattri_fn.attribute.magic import metagradient
from dattri_fn.attribute.source import source
from dattri_fn.model import functional_model
from dattri_fn.testing.problems import dense_hessian, linear_regression, per_example_grads
from dattri_fn.training import (
    adam,
    adamw,
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

DT = torch.float64


def run_with_record(loss, params, data, opt, order, name, every=1, **hp):
    """Train with a library loop and record it (checkpoint every ``every`` steps)."""
    step = make_step(loss, opt)
    state = (params, opt.init(params))
    lr = hp.pop("schedule")
    rec = start_record(name, checkpoint_every=every, **hp)
    for t, rows in enumerate(order):
        rec = record_step(rec, rows, lr=lr(t), params=state[0], opt_state=state[1])
        state = step(*state, take(data, rows), torch.ones(len(rows), dtype=DT))
    return finish_record(rec, params=state[0], opt_state=state[1]), step


def test_power_unroll_equals_magic_on_full_batch_gd_of_a_quadratic():
    """Least squares, full-batch GD with a cosine schedule, one-step segments, unroll='power':
    SOURCE == MAGIC's exact metagradient d(-loss_j(theta_T))/dw_i, 1e-10."""
    params, loss, (x, y) = linear_regression(n=10, dim=3, seed=2)[:3]
    T, n = 8, 10
    order = batch_order(n, epochs=T)
    sched = cosine_schedule(0.3, T)
    opt = sgd(sched)
    record, step = run_with_record(loss, params, (x, y), opt, order, "sgd", schedule=sched)
    g = torch.Generator().manual_seed(3)
    test = (torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT))
    method = source(loss, segments=T, curvature="hessian", unroll="power")
    scores = method.score(record, method.prepare(record, (x, y)), (x, y), test)
    traj = train(step, params, opt.init(params), (x, y), order, checkpoint_every=1)
    cot = vmap(grad(lambda p, ex: -loss(p, ex)), in_dims=(None, 0))(traj.params, test)
    exact = metagradient(step, traj, (x, y), order, cot).weights.T
    torch.testing.assert_close(scores, exact, rtol=1e-10, atol=1e-12)


def dense_reference(record, loss, data, test, segments, damping=0.0):
    """The module formula with dense matrices: matrix_exp and solves, no eigenbasis, no whitening."""
    hp, T = record.optimizer, record.steps
    ckpts = [c for c in record.checkpoints if c.step < T]
    sizes = [len(ckpts) // segments + (i < len(ckpts) % segments) for i in range(segments)]
    groups, s = [], 0
    for k in sizes:
        groups.append(ckpts[s:s + k])
        s += k
    bounds = [0] + [gr[0].step for gr in groups[1:]] + [T]
    n = data[1].shape[0]
    keys = list(record.final.params)
    flat = lambda tree: torch.cat([tree[k].reshape(-1) for k in keys])  # noqa: E731
    wd = hp["weight_decay"]
    b2, eps = hp["betas"][1], hp["eps"]
    q = per_example_grads(loss, record.final.params, test)  # [k, P]
    P = q.shape[1]
    out = torch.zeros(n, q.shape[0], dtype=DT)
    for li in reversed(range(segments)):
        gr = groups[li]
        H = sum(dense_hessian(loss, c.params, data) for c in gr) / len(gr)
        H = H + (damping + (wd if hp["name"] != "adamw" else 0.0)) * torch.eye(P, dtype=DT)
        if hp["name"] == "sgd":
            Pm = torch.eye(P, dtype=DT)
        else:
            with_v = [c for c in gr if c.moments.count > 0] or [
                next(c for c in record.checkpoints if c.step > gr[-1].step and c.moments.count > 0)]
            v = torch.stack([flat(c.moments.nu) / (1 - b2 ** c.moments.count)
                             for c in with_v]).mean(0)
            Pm = torch.diag(1 / (v.sqrt() + eps))
        A = Pm @ H + (wd if hp["name"] == "adamw" else 0.0) * torch.eye(P, dtype=DT)
        c = float(record.lrs[bounds[li]:bounds[li + 1]].sum()) / (1 - hp["momentum"])
        M = torch.linalg.matrix_exp(-c * A)
        Seg = (torch.eye(P, dtype=DT) - M) @ torch.linalg.solve(A, Pm)
        gbar = sum(per_example_grads(loss, ck.params, data) for ck in gr) / len(gr)  # [n, P]
        out += gbar @ Seg.T @ q.T / n
        q = q @ M
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_exp_unroll_equals_the_dense_matrix_exponential_formula(optimizer):
    """SGD(momentum)/Adam/AdamW minibatch run, 3 segments: SOURCE == (1/N) sum_l q_l^T
    (I - e^{-cA}) A^-1 P gbar_l with q_{l-1} = e^{-cA}^T q_l by matrix_exp and solve
    (A = P H + wd I, c = sum lr / (1 - mu)), 1e-9."""
    _, params, loss, data = mlp_problem(n=12, seed=5)
    if optimizer == "sgd":
        opt, hp = sgd(0.05, momentum=0.6, weight_decay=0.05), {"momentum": 0.6}
    else:
        factory = adamw if optimizer == "adamw" else adam
        opt, hp = factory(0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.05), {
            "betas": (0.8, 0.9), "eps": 1e-3}
    order = batch_order(12, batch_size=5, epochs=3, seed=1)
    record, _ = run_with_record(loss, params, data, opt, order, optimizer, every=2,
                                weight_decay=0.05, schedule=lambda t: 0.05, **hp)
    g = torch.Generator().manual_seed(6)
    test = (torch.randn(3, 3, generator=g, dtype=DT), torch.randint(0, 3, (3,), generator=g))
    method = source(loss, segments=3, curvature="hessian", damping=0.1)
    scores = method.score(record, method.prepare(record, data), data, test)
    torch.testing.assert_close(scores, dense_reference(record, loss, data, test, 3, damping=0.1),
                               rtol=1e-9, atol=1e-12)


def test_gauss_newton_equals_hessian_for_a_linear_model_with_squared_error():
    """nn.Linear + MSE: GN == Hessian, so curvature='gn' (FunctionalModel) == 'hessian', 1e-10."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 2, generator=g, dtype=DT)
    module = nn.Linear(3, 2).to(DT)
    fm = functional_model(module, lambda out, t: 0.5 * ((out - t) ** 2).sum(-1).mean())
    opt = sgd(0.1, momentum=0.5, weight_decay=0.01)
    order = batch_order(10, batch_size=4, epochs=3, seed=0)
    record, _ = run_with_record(fm, fm.params, (x, y), opt, order, "sgd", every=3, momentum=0.5,
                                weight_decay=0.01, schedule=lambda t: 0.1)
    test = (x[:3] + 1, y[:3])
    gn = source(fm, segments=2).score(record, source(fm, segments=2).prepare(record, (x, y)),
                                      (x, y), test)
    hs = source(fm.loss, segments=2, curvature="hessian")
    torch.testing.assert_close(gn, hs.score(record, hs.prepare(record, (x, y)), (x, y), test),
                               rtol=1e-10, atol=1e-12)


def test_self_score_is_the_diagonal_and_batching_does_not_matter():
    """self_score == diag(score(train, train)); train as 3 batches == one batch (prepare too), 1e-12."""
    _, params, loss, (x, y) = mlp_problem(n=12, seed=7)
    opt = adamw(0.05, weight_decay=0.01)
    order = batch_order(12, batch_size=4, epochs=2, seed=0)
    record, _ = run_with_record(loss, params, (x, y), opt, order, "adamw", every=2,
                                weight_decay=0.01, schedule=lambda t: 0.05)
    method = source(loss, segments=2, curvature="hessian")
    state = method.prepare(record, (x, y))
    full = method.score(record, state, (x, y), (x, y))
    parts = [(x[:5], y[:5]), (x[5:9], y[5:9]), (x[9:], y[9:])]
    split = method.score(record, method.prepare(record, parts), parts, (x, y))
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(method.self_score(record, state, (x, y)), full.diagonal(),
                               rtol=1e-12, atol=1e-14)


def test_ekfac_curvature_equals_the_matrix_functions_of_the_ekfac_matrix():
    """SGD(momentum) run, 2 segments, curvature='ekfac': SOURCE == the dense formula with H_l =
    kfac_operator(EK-FAC at the segment's middle checkpoint).dense() + damping + wd, 1e-9."""
    from dattri_fn.operators.kfac import ekfac_factors, kfac_operator

    module, params, loss, data = mlp_problem(n=12, seed=9)
    fm = functional_model(module, torch.nn.functional.cross_entropy)
    opt = sgd(0.1, momentum=0.5, weight_decay=0.02)
    order = batch_order(12, batch_size=4, epochs=3, seed=2)
    record, _ = run_with_record(fm, fm.params, data, opt, order, "sgd", every=2, momentum=0.5,
                                weight_decay=0.02, schedule=lambda t: 0.1)
    test = (data[0][:3] - 0.5, data[1][:3])
    method = source(fm, segments=2, curvature="ekfac", damping=0.05)
    scores = method.score(record, method.prepare(record, data), data, test)
    ckpts = [c for c in record.checkpoints if c.step < record.steps]
    groups = [ckpts[:3], ckpts[3:]]  # 5 checkpoints (steps 0, 2, 4, 6, 8) in 2 segments
    bounds = [0, groups[1][0].step, record.steps]
    q = per_example_grads(fm.loss, record.final.params, test)
    P = q.shape[1]
    ref = torch.zeros(12, 3, dtype=DT)
    for li in (1, 0):
        mid = groups[li][len(groups[li]) // 2]
        H = kfac_operator(ekfac_factors(module, torch.nn.functional.cross_entropy, mid.params, data,
                                        fisher="true")).dense() + 0.07 * torch.eye(P, dtype=DT)
        c = float(record.lrs[bounds[li]:bounds[li + 1]].sum()) / 0.5
        M = torch.linalg.matrix_exp(-c * H)
        Seg = (torch.eye(P, dtype=DT) - M) @ torch.linalg.inv(H)
        gbar = sum(per_example_grads(fm.loss, ck.params, data) for ck in groups[li]) / len(groups[li])
        ref += gbar @ Seg.T @ q.T / 12
        q = q @ M
    torch.testing.assert_close(scores, ref, rtol=1e-9, atol=1e-12)
    adam_record, _ = run_with_record(fm, fm.params, data, adam(0.01), order, "adam", every=2,
                                     schedule=lambda t: 0.01)
    with pytest.raises(ValueError, match=r"source\(curvature=...\): expected 'gn' or 'hessian' "
                                         r"for an Adam/AdamW record"):
        method.prepare(adam_record, data)


def test_errors_name_the_argument():
    """Bad curvature/unroll, gn without a model, a non-Record, a foreign state: clear errors."""
    _, params, loss, data = mlp_problem()
    with pytest.raises(ValueError, match=r"source\(curvature=...\): expected 'gn', 'hessian' or 'ekfac'"):
        source(loss, curvature="kfac")
    with pytest.raises(ValueError, match=r"source\(unroll=...\): expected 'exp' or 'power'"):
        source(loss, curvature="hessian", unroll="euler")
    with pytest.raises(TypeError, match=r"source\(loss=...\): expected a FunctionalModel"):
        source(loss)
    method = source(loss, curvature="hessian")
    with pytest.raises(TypeError, match=r"source\(params=...\): expected the Record of the run"):
        method.prepare(params, data)


@settings(max_examples=6)
@given(n=st.integers(3, 9), dim=st.integers(1, 4), T=st.integers(1, 6), seed=st.integers(0, 2**16),
       lr=st.floats(0.01, 0.4), wd=st.sampled_from([0.0, 0.05]))
def test_power_unroll_equals_magic_for_drawn_quadratics(n, dim, T, seed, lr, wd):
    """Drawn least squares, full-batch GD (coupled wd), one-step segments, unroll='power':
    SOURCE == MAGIC's metagradient, 1e-9."""
    params, loss, (x, y) = linear_regression(n=n, dim=dim, seed=seed)[:3]
    order = batch_order(n, epochs=T)
    opt = sgd(lr, weight_decay=wd)
    record, step = run_with_record(loss, params, (x, y), opt, order, "sgd", weight_decay=wd,
                                   schedule=lambda t: lr)
    test = (x[:2] * 0.5, y[:2] + 1)
    method = source(loss, segments=T, curvature="hessian", unroll="power")
    scores = method.score(record, method.prepare(record, (x, y)), (x, y), test)
    traj = train(step, params, opt.init(params), (x, y), order, checkpoint_every=1)
    cot = vmap(grad(lambda p, ex: -loss(p, ex)), in_dims=(None, 0))(traj.params, test)
    exact = metagradient(step, traj, (x, y), order, cot).weights.T
    torch.testing.assert_close(scores, exact, rtol=1e-9, atol=1e-12)


def _hand_ekfac(fm, group, data):
    """EK-FAC of ``mlp_problem``'s two Linear layers pooled over the checkpoints of ``group``, by
    hand (empirical Fisher): a~ = [layer input, 1], g = d loss_n / d layer output (= the bias
    gradient), A = mean_{c,n} a~a~^T, G = mean_{c,n} g g^T, Lambda = mean_{c,n} (Q_G^T g a~^T Q_A)^2;
    returned as the dense [P, P] matrix in the params' raveled order (W0, b0, W2, b2)."""
    cut = [(0, 15, 20, 5, 3), (20, 35, 38, 3, 5)]  # (W start, b start, end, out, in) per layer
    stats = []
    for c in group:
        grads = per_example_grads(fm.loss, c.params, data)  # [n, P]
        h = torch.tanh(data[0] @ c.params["0.weight"].T + c.params["0.bias"])
        ones = torch.ones(len(h), 1, dtype=DT)
        acts = [torch.cat([data[0], ones], 1), torch.cat([h, ones], 1)]
        stats.append([(a, grads[:, s1:e]) for a, (_, s1, e, _, _) in zip(acts, cut, strict=True)])
    blocks = []
    for li in range(2):
        a = torch.cat([st_[li][0] for st_ in stats])  # [C n, in+1]
        g = torch.cat([st_[li][1] for st_ in stats])  # [C n, out]
        qa = torch.linalg.eigh(a.T @ a / len(a))[1]
        qg = torch.linalg.eigh(g.T @ g / len(g))[1]
        lam = ((g @ qg)[:, :, None] * (a @ qa)[:, None, :]).square().mean(0)  # [out, in+1]
        blocks.append((qa, qg, lam))
    P = 38
    dense = torch.zeros(P, P, dtype=DT)
    for col in range(P):
        v = torch.zeros(P, dtype=DT)
        v[col] = 1
        for (qa, qg, lam), (s0, s1, e, out, inp) in zip(blocks, cut, strict=True):
            V = torch.cat([v[s0:s1].view(out, inp), v[s1:e, None]], 1)
            R = qg @ ((qg.T @ V @ qa) * lam) @ qa.T
            dense[s0:s1, col], dense[s1:e, col] = R[:, :inp].reshape(-1), R[:, inp]
    return dense


def test_pooled_ekfac_equals_the_hand_built_pooled_ekfac():
    """curvature='ekfac', pooled=True, empirical Fisher, 2 segments of 3 and 2 checkpoints: SOURCE ==
    its dense formula with H_l = the EK-FAC pooled over segment l's checkpoints built by hand
    (_hand_ekfac) + damping + wd, 1e-9; and != the middle checkpoint's EK-FAC."""
    module, params, loss, data = mlp_problem(n=12, seed=9)
    fm = functional_model(module, torch.nn.functional.cross_entropy)
    opt = sgd(0.1, momentum=0.5, weight_decay=0.02)
    order = batch_order(12, batch_size=4, epochs=3, seed=2)
    record, _ = run_with_record(fm, fm.params, data, opt, order, "sgd", every=2, momentum=0.5,
                                weight_decay=0.02, schedule=lambda t: 0.1)
    test = (data[0][:3] - 0.5, data[1][:3])
    method = source(fm, segments=2, curvature="ekfac", damping=0.05, fisher="empirical", pooled=True)
    scores = method.score(record, method.prepare(record, data), data, test)
    ckpts = [c for c in record.checkpoints if c.step < record.steps]
    groups = [ckpts[:3], ckpts[3:]]  # 5 checkpoints (steps 0, 2, 4, 6, 8) in 2 segments
    bounds = [0, groups[1][0].step, record.steps]
    q = per_example_grads(fm.loss, record.final.params, test)
    P = q.shape[1]
    ref = torch.zeros(12, 3, dtype=DT)
    for li in (1, 0):
        H = _hand_ekfac(fm, groups[li], data) + 0.07 * torch.eye(P, dtype=DT)
        c = float(record.lrs[bounds[li]:bounds[li + 1]].sum()) / 0.5
        M = torch.linalg.matrix_exp(-c * H)
        Seg = (torch.eye(P, dtype=DT) - M) @ torch.linalg.inv(H)
        gbar = sum(per_example_grads(fm.loss, ck.params, data) for ck in groups[li]) / len(groups[li])
        ref += gbar @ Seg.T @ q.T / 12
        q = q @ M
    torch.testing.assert_close(scores, ref, rtol=1e-9, atol=1e-12)
    middle = source(fm, segments=2, curvature="ekfac", damping=0.05, fisher="empirical")
    other = middle.score(record, middle.prepare(record, data), data, test)
    assert (other - scores).abs().max() > 1e-3 * scores.abs().max()


def test_pooled_ekfac_of_one_checkpoint_is_that_checkpoints_ekfac():
    """One checkpoint per segment (true Fisher, sampled labels): pooling one checkpoint is its own
    EK-FAC, so pooled=True == pooled=False bit for bit; pooled with curvature='gn' is refused."""
    module, params, loss, data = mlp_problem(n=12, seed=9)
    fm = functional_model(module, torch.nn.functional.cross_entropy)
    opt = sgd(0.1, momentum=0.5)
    order = batch_order(12, batch_size=4, epochs=2, seed=2)
    record, _ = run_with_record(fm, fm.params, data, opt, order, "sgd", every=2, momentum=0.5,
                                schedule=lambda t: 0.1)
    test = (data[0][:3] - 0.5, data[1][:3])
    out = []
    for pooled in (True, False):
        method = source(fm, segments=3, curvature="ekfac", damping=0.05, pooled=pooled)
        out.append(method.score(record, method.prepare(record, data), data, test))
    assert torch.equal(out[0], out[1]) and out[0].abs().max() > 0
    with pytest.raises(ValueError, match=r"source\(pooled=...\): expected False with curvature='gn'"):
        source(fm, pooled=True)


@pytest.mark.parametrize("pooled", [False, True])
def test_ekfac_with_params_outside_kronecker_layers_is_refused_in_source_terms(pooled):
    """curvature='ekfac' on a record whose params include a LayerNorm's: refused by source,
    naming the keys and SOURCE's own remedies (no others= hint: source has no such option)."""
    g = torch.Generator().manual_seed(3)
    module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)
    fm = functional_model(module, torch.nn.functional.cross_entropy)
    record, _ = run_with_record(fm, fm.params, (x, y), sgd(0.1), batch_order(8, batch_size=4,
                                epochs=1, seed=0), "sgd", schedule=lambda t: 0.1)
    method = source(fm, segments=1, curvature="ekfac", damping=0.05, pooled=pooled)
    with pytest.raises(ValueError, match=r"source\(curvature=...\): expected 'ekfac' on params "
                                         r"that are all weights and biases.*\['1.weight', "
                                         r"'1.bias'\].*curvature='gn' or 'hessian'") as err:
        method.prepare(record, (x, y))
    assert "others=" not in str(err.value)
