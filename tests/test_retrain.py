"""Retraining engine: determinism, resume after a kill, cache keys, LOO signs, workers."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dattri_fn.eval import retrain
from dattri_fn.eval.metrics import brittleness
from dattri_fn.eval.retrain import (
    cache_key,
    draw_subsets,
    lds_ground_truth,
    loo_ground_truth,
    make_predict_fn,
)
from dattri_fn.eval.tasks import get_task, train_model


@pytest.fixture(scope="module")
def task():
    return get_task("digits-lr", n_train=80, n_test=12)


class _Killed(Exception):
    pass


@settings(max_examples=15)
@given(n=st.integers(2, 60), m=st.integers(1, 6), alpha=st.sampled_from([0.1, 0.5, 0.9]),
       seed=st.integers(0, 2**20))
def test_draw_subsets(n, m, alpha, seed):
    """Each row holds round(alpha n) examples; rows depend on (seed, k) only: prefix-stable."""
    s = draw_subsets(n, m + 2, alpha=alpha, seed=seed)
    assert s.dtype == torch.bool and s.shape == (m + 2, n)
    assert (s.sum(1) == max(1, round(alpha * n))).all()
    assert torch.equal(draw_subsets(n, m, alpha=alpha, seed=seed), s[:m])


def test_lds_ground_truth_deterministic(task, tmp_path, device):
    """Two runs in separate caches agree exactly; targets[k] = mean_s target(model(S_k, s))."""
    task = task.to(device)
    a = lds_ground_truth(task, 3, 2, cache_dir=tmp_path / "a", progress=False)
    b = lds_ground_truth(task, 3, 2, cache_dir=tmp_path / "b", progress=False)
    assert torch.equal(a.subsets, b.subsets) and torch.equal(a.targets, b.targets)
    assert a.targets.shape == (3, 12) and a.subsets.shape == (3, 80)
    seeds = [retrain._model_seed(0, s) for s in range(2)]
    manual = torch.stack([task.target(train_model(task, seed=s, keep=a.subsets[1].to(device)),
                                      task.x_test, task.y_test) for s in seeds]).mean(0)
    assert torch.allclose(a.targets[1], manual.cpu(), atol=1e-6)


def test_resume_after_kill(task, tmp_path, capsys):
    """Killed after 3 of 8 units, a rerun trains only the 5 missing; result as uninterrupted."""
    seen = []

    def die_after_three(name):
        seen.append(name)
        if len(seen) == 3:
            raise _Killed

    with pytest.raises(_Killed):
        lds_ground_truth(task, 4, 2, cache_dir=tmp_path / "c", on_unit=die_after_three)
    assert "lds_ground_truth digits-lr: 3/8 units" in capsys.readouterr().err
    resumed = []
    got = lds_ground_truth(task, 4, 2, cache_dir=tmp_path / "c", on_unit=resumed.append,
                           progress=False)
    assert len(resumed) == 5 and not set(resumed) & set(seen)
    clean = lds_ground_truth(task, 4, 2, cache_dir=tmp_path / "d", progress=False)
    assert torch.equal(got.targets, clean.targets)
    again = []
    grown = lds_ground_truth(task, 5, 2, cache_dir=tmp_path / "c", on_unit=again.append,
                             progress=False)
    assert len(again) == 2 and torch.equal(grown.targets[:4], clean.targets)


def test_cache_key_covers_what_changes_the_answer(task, monkeypatch):
    """The key changes with hparams, data, alpha, seed, kind and torch version; is stable else."""
    base = cache_key(task, kind="lds", seed=0, alpha=0.5)
    assert base == cache_key(get_task("digits-lr", n_train=80, n_test=12), kind="lds", seed=0,
                             alpha=0.5)
    variants = [
        cache_key(get_task("digits-lr", n_train=80, n_test=12, hparams={"weight_decay": 1e-2}),
                  kind="lds", seed=0, alpha=0.5),
        cache_key(dataclasses.replace(task, hparams=dict(task.hparams, epochs=5)), kind="lds",
                  seed=0, alpha=0.5),
        cache_key(get_task("digits-lr", n_train=81, n_test=12), kind="lds", seed=0, alpha=0.5),
        cache_key(get_task("digits-lr", n_train=80, n_test=12, seed=1), kind="lds", seed=0,
                  alpha=0.5),
        cache_key(get_task("digits-lr", n_train=80, n_test=12, noisy=True), kind="lds",
                  seed=0, alpha=0.5),
        cache_key(task, kind="lds", seed=0, alpha=0.4),
        cache_key(task, kind="lds", seed=1, alpha=0.5),
        cache_key(task, kind="loo", seed=0, alpha=0.5),
    ]
    monkeypatch.setattr(torch, "__version__", "0.0.0-test")
    variants.append(cache_key(task, kind="lds", seed=0, alpha=0.5))
    assert len({base, *variants}) == len(variants) + 1


def test_loo_ground_truth_sign_and_value(task, tmp_path):
    """diffs[i, j] = target_j(full) - target_j(without i); a point's own removal hurts it (> 0)."""
    self_task = dataclasses.replace(task, x_test=task.x_train[:4], y_test=task.y_train[:4])
    gt = loo_ground_truth(self_task, [0, 1, 2, 3], cache_dir=tmp_path, progress=False)
    assert torch.equal(gt.indices, torch.arange(4)) and gt.diffs.shape == (4, 4)
    assert (gt.diffs.diagonal() > 0).all()
    s = retrain._model_seed(0, 0)
    keep = torch.ones(80, dtype=torch.bool)
    keep[2] = False
    full = self_task.target(train_model(self_task, seed=s), self_task.x_test, self_task.y_test)
    drop = self_task.target(train_model(self_task, seed=s, keep=keep), self_task.x_test,
                            self_task.y_test)
    assert torch.allclose(gt.diffs[2], full - drop, atol=1e-6)


def test_predict_fn_with_brittleness(task):
    """make_predict_fn(all kept) is the full model's argmax; brittleness runs on it."""
    predict = make_predict_fn(task, 0, seed=0)
    full = train_model(task, seed=0)(task.x_test[:1]).argmax(-1)[0]
    assert torch.equal(predict(torch.ones(80, dtype=torch.bool)), full)
    res = brittleness(torch.arange(80, dtype=torch.float64), predict, ks=(1,))
    assert set(res.flipped) == {1}


@pytest.mark.slow
def test_workers_match_single_process(task, tmp_path):
    """2 spawn workers (1 thread each) give the targets of the in-process run (float tolerance)."""
    one = lds_ground_truth(task, 4, 1, cache_dir=tmp_path / "one", progress=False)
    names = []
    two = lds_ground_truth(task, 4, 1, cache_dir=tmp_path / "two", workers=2,
                           on_unit=names.append, progress=False)
    assert sorted(names) == [f"subset{k:06d}-seed0000" for k in range(4)]
    assert torch.allclose(one.targets, two.targets, atol=1e-4)


def test_retrain_errors(task):
    """Wrong task kinds, bad indices and bad alpha raise errors naming the argument."""
    with pytest.raises(TypeError, match=r"lds_ground_truth\(task=...\): expected a dattri_fn"):
        lds_ground_truth("digits-lr", 2)
    with pytest.raises(ValueError, match=r"lds_ground_truth\(alpha=...\): expected a fraction"):
        lds_ground_truth(task, 2, alpha=1.5)
    with pytest.raises(ValueError, match=r"loo_ground_truth\(indices=...\): expected distinct"):
        loo_ground_truth(task, [1, 1])
    with pytest.raises(ValueError, match=r"loo_ground_truth\(indices=...\): expected values in"):
        loo_ground_truth(task, [80])
    with pytest.raises(ValueError, match=r"lds_ground_truth\(workers=...\): expected an int >= 1"):
        lds_ground_truth(task, 2, workers=0)


@pytest.mark.parametrize("name", ["../../escape", "/abs", "a/b", "a\\b", ".hidden", "..", "",
                                  "tab\tname", "caf\u00e9"])
def test_task_name_must_be_a_plain_name(task, tmp_path, name):
    """task.name becomes a directory under cache_dir: a path-like name is refused, nothing written."""
    bad = dataclasses.replace(task, name=name)
    cache = tmp_path / "deep" / "cache"
    for run in (lambda: lds_ground_truth(bad, 1, cache_dir=cache, progress=False),
                lambda: loo_ground_truth(bad, [0], cache_dir=cache, progress=False)):
        with pytest.raises(ValueError, match=r"_ground_truth\(task=...\): expected a task\.name "
                                             r"of letters, digits, '-', '_' and '\.', not starting "
                                             r"with '\.', got name .*rename the task"):
            run()
    assert list(tmp_path.rglob("*")) == []
    with pytest.raises(TypeError, match=r"lds_ground_truth\(task=...\): expected a str task\.name"):
        lds_ground_truth(dataclasses.replace(task, name=7), 1, cache_dir=cache, progress=False)


def test_task_name_plain_names_accepted(task, tmp_path):
    """Letters, digits, '-', '_' and inner dots form one directory right under cache_dir."""
    named = dataclasses.replace(task, name="my_task-v1.2")
    lds_ground_truth(named, 1, cache_dir=tmp_path, progress=False)
    assert [p.name.split("-lds-")[0] for p in tmp_path.iterdir()] == ["my_task-v1.2"]


def test_exact_influence_scores_positive_lds_and_loo(tmp_path):
    """Exact IF, scores = g_i^T H^-1 g_test / n (positive = proponent): LDS and LOO r > 0.6."""
    from torch.func import functional_call, grad, hessian, vmap

    from dattri_fn.eval.metrics import lds, loo_correlation

    task = get_task("digits-lr", n_train=60, n_test=8)
    model = train_model(task, seed=retrain._model_seed(0, 0)).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    wd = task.hparams["weight_decay"]

    def loss(flat, x, y):
        parts, start = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = flat[start:start + s.numel()].reshape(s)
            start += s.numel()
        out = functional_call(model, parts, (x.double(),))
        return task.loss_fn(out, y)

    hess = hessian(lambda f: loss(f, task.x_train, task.y_train) + 0.5 * wd * f @ f)(flat0)
    per = lambda x, y: vmap(grad(lambda f, xi, yi: loss(f, xi[None], yi[None])),
                            in_dims=(None, 0, 0))(flat0, x, y)
    g_train, g_test = per(task.x_train, task.y_train), per(task.x_test, task.y_test)
    scores = g_train @ torch.linalg.solve(hess, g_test.T) / task.n_train  # [n_train, n_test]
    gt = lds_ground_truth(task, 16, 1, cache_dir=tmp_path, progress=False)
    res = lds(scores, gt.subsets, gt.targets.double())
    assert res.mean > 0.6  # measured 0.88 (CI 0.82..0.94)
    loo = loo_ground_truth(task, list(range(20)), cache_dir=tmp_path, progress=False)
    corr = loo_correlation(scores[:20], loo.diffs.double())
    assert corr.pearson > 0.6 and corr.spearman > 0.5  # measured 0.95 and 0.80


def test_weighted_lds_ground_truth_is_the_fixed_randomness_run(tmp_path):
    """weighted=True: targets[k] == target of train_model(keep=S_k, weighted=True), model seed
    shared; cached apart from the standard units (which train on the subset alone)."""
    from dattri_fn.eval.tasks import SGD_HPARAMS

    sgd_task = get_task("digits-mlp", n_train=40, n_test=6, hparams={**SGD_HPARAMS, "epochs": 2})
    gt = lds_ground_truth(sgd_task, 2, cache_dir=tmp_path, weighted=True, progress=False)
    standard = lds_ground_truth(sgd_task, 2, cache_dir=tmp_path, progress=False)
    seed = retrain._model_seed(0, 0)
    for k in range(2):
        model = train_model(sgd_task, seed=seed, keep=gt.subsets[k], weighted=True)
        expected = sgd_task.target(model, sgd_task.x_test, sgd_task.y_test)
        torch.testing.assert_close(gt.targets[k], expected, rtol=0, atol=0)
    assert not torch.equal(gt.targets, standard.targets)
    assert len(list(tmp_path.iterdir())) == 2


def test_weighted_needs_a_weighted_trainer(task, tmp_path):
    """lds_ground_truth(weighted=True) on an L-BFGS task is refused before any training."""
    with pytest.raises(ValueError, match=r"lds_ground_truth\(weighted=...\): expected a task"):
        lds_ground_truth(task, 2, cache_dir=tmp_path, weighted=True)
