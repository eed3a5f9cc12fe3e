"""LESS and AdamW-influence from a Record, against loops of the formulas on a few recorded steps."""

import pytest
import torch
from test_training import mlp_problem

from dattri_fn.attribute.adamw_influence import adamw_influence
from dattri_fn.attribute.less import less
from dattri_fn.training import (
    adam,
    adamw,
    batch_order,
    finish_record,
    make_step,
    record_step,
    sgd,
    start_record,
    take,
)
from dattri_fn.transforms.project import make_projector

DT = torch.float64
B1, B2, EPS = 0.8, 0.9, 1e-3


def recorded_run(optimizer="adamw", every=2, seed=0):
    """A 12-example MLP trained 3 epochs (batches of 5) with the record taken in the loop."""
    _, params, loss, data = mlp_problem(n=12, seed=seed)
    if optimizer == "sgd":
        opt = sgd(0.1, momentum=0.5)
    else:
        opt = (adamw if optimizer == "adamw" else adam)(lambda t: 0.05 / (1 + 0.1 * t),
                                                        betas=(B1, B2), eps=EPS, weight_decay=0.01)
    step = make_step(loss, opt)
    state = (params, opt.init(params))
    rec = start_record(optimizer, checkpoint_every=every, betas=(B1, B2), eps=EPS,
                       weight_decay=0.01)
    for t, rows in enumerate(batch_order(12, batch_size=5, epochs=3, seed=2)):
        rec = record_step(rec, rows, lr=0.05 / (1 + 0.1 * t), params=state[0], opt_state=state[1])
        state = step(*state, take(data, rows), torch.ones(len(rows), dtype=DT))
    return finish_record(rec, params=state[0], opt_state=state[1]), loss, data


def query_data(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)


def grad_of(loss, params, example):
    p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(p, example), list(p.values()))])


def flat(tree):
    return torch.cat([v.reshape(-1) for v in tree.values()])


def brute_force(record, loss, data, test, kind, R=None):
    """Loop over checkpoints, train and test examples: the formula of the module docstring."""
    (x, y), (xt, yt) = data, test
    out = torch.zeros(len(y), len(yt), dtype=DT)
    for ck in record.checkpoints[:-1]:
        t, lr = ck.moments.count, float(record.lrs[ck.step])
        m, v = flat(ck.moments.mu), flat(ck.moments.nu)
        if kind == "adamw_influence" and t == 0:
            continue
        for i in range(len(y)):
            g = grad_of(loss, ck.params, (x[i], y[i]))
            if kind == "less":
                mh = (B1 * m + (1 - B1) * g) / (1 - B1 ** (t + 1))
                vh = (B2 * v + (1 - B2) * g * g) / (1 - B2 ** (t + 1))
                u = mh / (vh.sqrt() + EPS)
            else:
                u = g / ((v / (1 - B2 ** t)).sqrt() + EPS)
            if R is not None:
                u = u @ R
            for j in range(len(yt)):
                w = grad_of(loss, ck.params, (xt[j], yt[j]))
                if R is not None:
                    w = w @ R
                out[i, j] += lr * (torch.nn.functional.cosine_similarity(u, w, dim=0)
                                   if kind == "less" else u @ w)
    return out


@pytest.mark.parametrize("name", ["less", "adamw_influence"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_scores_equal_the_formula_on_recorded_steps(name, optimizer):
    """score == sum_c lr_c cos(Gamma_c(g_i), g_j) (LESS) / sum_c lr_c <D_c g_i, g_j> (AdamW-inf), 1e-10."""
    record, loss, data = recorded_run(optimizer)
    test = query_data()
    method = (less if name == "less" else adamw_influence)(loss)
    scores = method.score(record, method.prepare(record, data), data, test)
    torch.testing.assert_close(scores, brute_force(record, loss, data, test, name),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["less", "adamw_influence"])
def test_projected_scores_equal_the_formula_with_the_projector_matrix(name):
    """proj_dim=6: the same sums with u R, w R (R = make_projector(P, 6, seed=4).matrix()), 1e-10."""
    record, loss, data = recorded_run()
    test = query_data()
    P = sum(v.numel() for v in record.final.params.values())
    R = make_projector(P, proj_dim=6, seed=4, dtype=DT).matrix()
    method = (less if name == "less" else adamw_influence)(loss, proj_dim=6, seed=4)
    scores = method.score(record, (), data, test)
    torch.testing.assert_close(scores, brute_force(record, loss, data, test, name, R),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["less", "adamw_influence"])
def test_self_score_is_the_diagonal_and_batching_does_not_matter(name):
    """self_score == diag(score(train, train)); train as 3 batches == one batch, 1e-12."""
    record, loss, (x, y) = recorded_run(seed=1)
    method = (less if name == "less" else adamw_influence)(loss, chunk_size=5)
    full = method.score(record, (), (x, y), (x, y))
    split = method.score(record, (), [(x[:4], y[:4]), (x[4:9], y[4:9]), (x[9:], y[9:])], (x, y))
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(method.self_score(record, (), (x, y)), full.diagonal(),
                               rtol=1e-12, atol=1e-14)


def test_checkpoint_selection_sums_only_the_chosen_steps():
    """checkpoints=[2, 4]: LESS == the sum of the single-checkpoint scores at 2 and 4, 1e-12."""
    record, loss, data = recorded_run()
    test = query_data()
    both = less(loss, checkpoints=[2, 4]).score(record, (), data, test)
    parts = sum(less(loss, checkpoints=[s]).score(record, (), data, test) for s in (2, 4))
    torch.testing.assert_close(both, parts, rtol=1e-12, atol=1e-14)


def test_errors_name_the_method_and_argument():
    """A non-Record, an SGD record, an unknown or moment-less checkpoint: clear errors."""
    record, loss, data = recorded_run()
    with pytest.raises(TypeError, match=r"less\(params=...\): expected the Record of the run"):
        less(loss).prepare(record.final.params, data)
    sgd_record, _, _ = recorded_run("sgd")
    with pytest.raises(ValueError, match=r"adamw_influence\(params=...\): expected a Record of an "
                                         r"Adam or AdamW run"):
        adamw_influence(loss).prepare(sgd_record, data)
    with pytest.raises(ValueError, match=r"less\(checkpoints=...\): expected steps among"):
        less(loss, checkpoints=[3]).prepare(record, data)
    with pytest.raises(ValueError, match=r"adamw_influence\(checkpoints=...\): expected "
                                         r"checkpoints with >= 1 Adam steps"):
        adamw_influence(loss, checkpoints=[0]).prepare(record, data)


def test_a_saved_and_loaded_record_scores_the_same(tmp_path):
    """io.load(io.save(record)) scores equal the in-memory record's (LESS, AdamW-influence), exactly."""
    from dattri_fn import io

    record, loss, data = recorded_run()
    back = io.load(io.save(record, tmp_path / "run.rec"))
    test = query_data()
    for method in (less(loss), adamw_influence(loss)):
        assert torch.equal(method.score(back, (), data, test), method.score(record, (), data, test))
