"""record: what a user's own loop (library steps or plain torch.optim) hands over, kept exactly."""

import json
import os

import pytest
import torch
from test_training import mlp_problem

from dattri_fn import io
from dattri_fn.store import open_store
from dattri_fn.training import (
    GradSpec,
    Record,
    adamw,
    batch_order,
    finish_record,
    make_step,
    record_step,
    record_trajectory,
    sgd,
    start_record,
    take,
    train,
)

DT = torch.float64


def library_run(every=2, epochs=3):
    module, params, loss, data = mlp_problem(n=12, seed=1)
    order = batch_order(12, batch_size=5, epochs=epochs, seed=3)
    opt = adamw(lambda t: 0.05 / (1 + t), weight_decay=0.1)
    step = make_step(loss, opt)
    state = (params, opt.init(params))
    rec = start_record("adamw", checkpoint_every=every, weight_decay=0.1)
    ones = torch.ones(5, dtype=DT)
    for t, rows in enumerate(order):
        rec = record_step(rec, rows, lr=0.05 / (1 + t), params=state[0], opt_state=state[1])
        state = step(*state, take(data, rows), ones[:len(rows)])
    return finish_record(rec, params=state[0], opt_state=state[1]), step, opt, params, data, order


def test_record_in_a_library_loop_equals_the_trainer_checkpoints():
    """Recorded checkpoints (params, m, v, count) == train(checkpoint_every=2)'s states, bit for bit."""
    record, step, opt, params, data, order = library_run()
    run = train(step, params, opt.init(params), data, order, checkpoint_every=2)
    T = len(order)
    assert record.steps == T and [c.step for c in record.checkpoints] == sorted(run.checkpoints)
    assert all(torch.equal(a, b) for a, b in zip(record.order, order, strict=True))
    assert torch.equal(record.lrs, torch.tensor([0.05 / (1 + t) for t in range(T)], dtype=DT))
    for ck in record.checkpoints:
        p, s = run.checkpoints[ck.step]
        assert all(torch.equal(ck.params[k], p[k]) for k in p)
        assert ck.moments.count == s.count == ck.step
        assert all(torch.equal(ck.moments.mu[k], s.mu[k]) and torch.equal(ck.moments.nu[k], s.nu[k])
                   for k in p)
    assert record.optimizer == {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8,
                                "momentum": 0.0, "weight_decay": 0.1}


def test_record_in_a_plain_torch_loop_matches_the_functional_run():
    """torch.optim.AdamW loop, record reads opt.state: params and moments == functional run, 1e-12."""
    record, *_ = library_run(every=3)
    module, _, _, (x, y) = mlp_problem(n=12, seed=1)
    opt = torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    rec = start_record(opt, checkpoint_every=3)
    named = dict(module.named_parameters())
    for rows in record.order:
        rec = record_step(rec, rows, lr=opt.param_groups[0]["lr"], params=named, opt_state=opt)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x[rows]), y[rows]).backward()
        opt.step()
        sched.step()
    ours = finish_record(rec, params=named, opt_state=opt)
    assert ours.optimizer == record.optimizer
    torch.testing.assert_close(ours.lrs, record.lrs, rtol=1e-15, atol=0)
    assert [c.step for c in ours.checkpoints] == [c.step for c in record.checkpoints]
    for a, b in zip(ours.checkpoints, record.checkpoints, strict=True):
        assert a.moments.count == b.moments.count
        for k in b.params:
            assert not a.params[k].requires_grad
            torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a.moments.mu[k], b.moments.mu[k], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a.moments.nu[k], b.moments.nu[k], rtol=1e-12, atol=1e-14)


def test_record_copies_detached_state_that_later_steps_do_not_change():
    """A checkpoint is a copy: training on in place leaves it equal to the state it was given."""
    module, _, _, (x, y) = mlp_problem(n=12, seed=2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    named = dict(module.named_parameters())
    before = {k: v.detach().clone() for k, v in named.items()}
    rec = record_step(start_record(opt, checkpoint_steps=[0]), torch.arange(4), lr=0.1,
                      params=named, opt_state=opt)
    torch.nn.functional.cross_entropy(module(x[:4]), y[:4]).backward()
    opt.step()
    record = finish_record(rec, params=named, opt_state=opt)
    assert all(torch.equal(record.checkpoints[0].params[k], before[k]) for k in before)
    assert not torch.equal(record.final.params["0.weight"], before["0.weight"])
    assert record.checkpoints[0].moments is None and record.optimizer["momentum"] == 0.9


def test_record_saves_and_loads_atomically(tmp_path):
    """io.save(record) then io.load == the record field by field (a Record again)."""
    record, *_ = library_run()
    back = io.load(io.save(record, tmp_path / "run.rec"))
    assert isinstance(back, Record) and back.optimizer == record.optimizer
    assert torch.equal(back.lrs, record.lrs)
    assert all(torch.equal(a, b) for a, b in zip(back.order, record.order, strict=True))
    for a, b in zip(back.checkpoints, record.checkpoints, strict=True):
        assert a.step == b.step and a.moments.count == b.moments.count
        assert a.moments.betas == b.moments.betas
        assert all(torch.equal(a.params[k], b.params[k]) and torch.equal(a.moments.nu[k], b.moments.nu[k])
                   for k in b.params)


@pytest.mark.parametrize("proj_dim", [None, 7])
def test_record_stores_per_example_gradients_of_every_step(tmp_path, proj_dim):
    """Store of step t == [grad loss(theta_t, z_i) for i in rows_t] (projected by R if asked), 1e-12."""
    from dattri_fn.transforms.project import make_projector

    _, params, loss, data = mlp_problem(n=12, seed=4)
    opt = sgd(0.2, momentum=0.5)
    step = make_step(loss, opt)
    order = batch_order(12, batch_size=4, epochs=1, seed=1)
    rec = start_record("sgd", momentum=0.5, grads=GradSpec(loss, str(tmp_path), proj_dim, seed=3))
    state, seen = (params, opt.init(params)), []
    for rows in order:
        batch = take(data, rows)
        rec = record_step(rec, rows, lr=0.2, params=state[0], batch=batch)
        seen.append((state[0], batch))
        state = step(*state, batch, torch.ones(len(rows), dtype=DT))
    record = finish_record(rec, params=state[0])
    assert len(record.grad_stores) == len(order)
    P = sum(v.numel() for v in params.values())
    for path, (p, (xb, yb)) in zip(record.grad_stores, seen, strict=True):
        ref = torch.stack([_grad(loss, p, (xb[i], yb[i])) for i in range(len(yb))])
        if proj_dim is not None:
            ref = ref @ make_projector(P, proj_dim=proj_dim, seed=3, dtype=DT).matrix()
        torch.testing.assert_close(open_store(path).read(), ref, rtol=1e-12, atol=1e-12)


def test_record_stores_gradients_from_a_plain_torch_loop(tmp_path):
    """nn.Parameters in, torch.optim.SGD loop: step t's store == per-example grads at theta_t, 1e-12."""
    module, _, loss, (x, y) = mlp_problem(n=12, seed=5)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    named = dict(module.named_parameters())
    rec = start_record(opt, grads=GradSpec(loss, str(tmp_path)))
    seen = []
    for rows in batch_order(12, batch_size=6, epochs=1, seed=0):
        seen.append({k: v.detach().clone() for k, v in named.items()})
        rec = record_step(rec, rows, lr=torch.tensor(0.1), params=named, opt_state=opt,
                          batch=(x[rows], y[rows]))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x[rows]), y[rows]).backward()
        opt.step()
    record = finish_record(rec, params=named, opt_state=opt)
    for path, p, rows in zip(record.grad_stores, seen, record.order, strict=True):
        ref = torch.stack([_grad(loss, p, (x[i], y[i])) for i in rows])
        torch.testing.assert_close(open_store(path).read(), ref, rtol=1e-12, atol=1e-12)


def _grad(loss, params, example):
    p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(p, example), list(p.values()))])


def test_record_trajectory_equals_recording_the_same_loop():
    """record_trajectory(train(..., checkpoint_every=2)) == the record taken inside the loop."""
    record, step, opt, params, data, order = library_run()
    run = train(step, params, opt.init(params), data, order, checkpoint_every=2)
    back = record_trajectory(run, order, lr=lambda t: 0.05 / (1 + t), optimizer="adamw",
                             weight_decay=0.1)
    assert back.optimizer == record.optimizer and torch.equal(back.lrs, record.lrs)
    assert all(torch.equal(a, b) for a, b in zip(back.order, record.order, strict=True))
    for a, b in zip(back.checkpoints, record.checkpoints, strict=True):
        assert a.step == b.step and a.moments.count == b.moments.count
        assert all(torch.equal(a.params[k], b.params[k]) and torch.equal(a.moments.mu[k], b.moments.mu[k])
                   for k in b.params)
    with pytest.raises(ValueError, match=r"record_trajectory\(order=...\): expected the order"):
        record_trajectory(run, order[:-2], lr=0.05, optimizer="adamw")  # no state at step 7


def test_record_errors_name_the_argument():
    """Bad optimizer, missing params at a checkpoint, wrong opt_state kind: errors name the call."""
    with pytest.raises(TypeError, match=r"start_record\(optimizer=...\): expected 'sgd'"):
        start_record("lion")
    rec = start_record("adam", checkpoint_every=1)
    with pytest.raises(ValueError, match=r"record_step\(params=...\): expected the params at "
                                         r"checkpoint step 0"):
        record_step(rec, torch.arange(3), lr=0.1)
    _, params, _, _ = mlp_problem()
    with pytest.raises(TypeError, match=r"record_step\(opt_state=...\): expected the adam state"):
        record_step(rec, torch.arange(3), lr=0.1, params=params, opt_state=None)
    with pytest.raises(ValueError, match=r"record_step\(rows=...\): expected a 1-d integer"):
        record_step(rec, torch.zeros(3), lr=0.1, params=params)
    with pytest.raises(ValueError, match=r"finish_record\(rec=...\): expected at least one"):
        finish_record(rec, params=params)


def _sgd_record(path, *, steps_per_shard=None, stop=None, proj_dim=None, loss_wrap=None,
                perturb=0.0):
    """Record 7 steps of SGD (batches of 4, 2 epochs of 14 rows) with per-step gradient stores;
    ``stop``: return the Recording before step ``stop`` as a killed run would leave it."""
    _, params, loss, data = mlp_problem(n=14, seed=6)
    params = {k: v + perturb for k, v in params.items()}
    opt = sgd(0.2)
    step = make_step(loss, opt)
    order = batch_order(14, batch_size=4, epochs=2, seed=2)[:7]
    spec = GradSpec(loss if loss_wrap is None else loss_wrap(loss), str(path), proj_dim, seed=1,
                    steps_per_shard=steps_per_shard)
    rec, state = start_record("sgd", grads=spec), (params, opt.init(params))
    for t, rows in enumerate(order):
        if t == stop:
            return rec
        batch = take(data, rows)
        rec = record_step(rec, rows, lr=0.2, params=state[0], batch=batch)
        state = step(*state, batch, torch.ones(len(rows), dtype=DT))
    return finish_record(rec, params=state[0])


@pytest.mark.parametrize("proj_dim", [None, 5])
def test_append_mode_equals_one_store_per_step(tmp_path, proj_dim):
    """steps_per_shard=3: step t's rows (read alone through open_store of its entry) == the
    per-step store's bit for bit, over 7 steps (groups 0-2, 3-5 and the partial 6 written by
    finish_record); one grouped shard per 3 steps."""
    ref = _sgd_record(tmp_path / "ref", proj_dim=proj_dim)
    rec = _sgd_record(tmp_path / "app", steps_per_shard=3, proj_dim=proj_dim)
    assert [p.rsplit(os.sep, 2)[-2:] for p in rec.grad_stores][:4] == [
        ["steps-0000000", "step-0000000"], ["steps-0000000", "step-0000001"],
        ["steps-0000000", "step-0000002"], ["steps-0000003", "step-0000003"]]
    assert sorted(os.listdir(tmp_path / "app")) == ["steps-0000000", "steps-0000003", "steps-0000006"]
    for a, b in zip(rec.grad_stores, ref.grad_stores, strict=True):
        got, want = open_store(a), open_store(b)
        assert torch.equal(got.read(), want.read()) and got.n_rows == want.n_rows
        assert got.manifest["params_hash"] == want.manifest["params_hash"]
        assert got.manifest["config"]["proj_dim"] == proj_dim
    group = open_store(tmp_path / "app" / "steps-0000003")  # the whole group: steps 3-5
    assert torch.equal(group.read(), torch.cat([open_store(p).read() for p in ref.grad_stores[3:6]]))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_append_mode_resumes_after_a_kill_bit_identically(tmp_path):
    """A run stopped before step 5 (group 3-5 half filled, a killed save's temp left in it) and
    run again computes gradients for steps 3-6 only (groups 0-2 re-read by hash) and leaves
    the groups byte for byte those of an uninterrupted run, with no temp file."""
    _sgd_record(tmp_path / "ref", steps_per_shard=3)
    _sgd_record(tmp_path / "run", steps_per_shard=3, stop=5)
    group = tmp_path / "run" / "steps-0000003"
    group.mkdir()
    (group / ".shard-000000.npy.ab12cd_9.tmp").write_bytes(b"partial")
    calls = []

    def counting(loss):
        def wrapped(p, ex):
            calls.append(1)
            return loss(p, ex)
        return wrapped

    _sgd_record(tmp_path / "run", steps_per_shard=3, loss_wrap=counting)
    assert calls  # vmap calls the loss once per traced batch: steps 3, 4, 5 and 6
    assert len(calls) == 4
    for name in ("steps-0000000", "steps-0000003", "steps-0000006"):
        for f in ("shard-000000.npy", "manifest.json"):
            a, b = tmp_path / "run" / name / f, tmp_path / "ref" / name / f
            if f == "manifest.json":
                assert json.loads(a.read_text()) == json.loads(b.read_text())
            else:
                assert a.read_bytes() == b.read_bytes()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_append_mode_refuses_another_run(tmp_path):
    """Recording into groups committed by another run is refused naming params (other weights)
    or batch (other rows), never silently reused."""
    _sgd_record(tmp_path, steps_per_shard=3)
    with pytest.raises(ValueError, match=r"record_step\(params=...\): expected step 0's params as "
                                         r"recorded in"):
        _sgd_record(tmp_path, steps_per_shard=3, perturb=1e-9)
    with pytest.raises(TypeError, match=r"start_record\(grads.steps_per_shard=...\)"):
        _sgd_record(tmp_path / "bad", steps_per_shard=2.5)


def test_dvemb_reads_an_append_mode_record_like_one_store_per_step(tmp_path):
    """DVEmb (Fisher) reads every step's rows through open_store(grad_stores[t]): its embeddings
    from an append-mode record (3 steps a group) equal those from one store per step bit for bit."""
    from dattri_fn.attribute.dvemb import dvemb

    _, _, loss, data = mlp_problem(n=14, seed=6)
    ref = _sgd_record(tmp_path / "ref")
    app = _sgd_record(tmp_path / "app", steps_per_shard=3)
    m = dvemb(loss)
    a, b = m.prepare(app, data), m.prepare(ref, data)
    assert torch.equal(a.embeddings, b.embeddings) and a.projection == b.projection
