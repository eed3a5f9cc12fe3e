"""Every method end to end on sklearn digits (logistic regression and an MLP), via the recipes."""

import warnings

import pytest
import torch

from dattri_fn.app.recipes import METHODS, recipe
from dattri_fn.attribute import grad_dot, influence
from dattri_fn.eval.metrics import pearson
from dattri_fn.eval.tasks import get_task, train_model
from problems import PROBLEMS


@pytest.fixture(scope="module")
def digits():
    out = {}
    for name in ("digits-lr", "digits-mlp"):
        task = get_task(name, n_train=60, n_test=5, seed=1)
        out[name] = (task, [train_model(task, seed=s) for s in range(2)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["digits-lr", "digits-mlp"])
def test_every_method_runs_and_agrees_in_sign(digits, task_name):
    """All methods give finite [n_train, n_test] scores; self_score == diag(score(train, train));
    IF backends correlate with IF-explicit (Pearson > 0.5, and > 0.999 for CG)."""
    task, models = digits[task_name]
    ref = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in METHODS:
            if name.startswith("magic"):
                # 300 full-batch Adam steps reversed 3 times here took ~60 s: MAGIC's recipe
                # has its own test on a short run (test_magic_recipe_replays_the_task_trainer).
                continue
            r = recipe(name, task, models)
            state = r.method.prepare(r.params, r.train)
            S = r.method.score(r.params, state, r.train, r.test)
            assert S.shape == (60, 5) and torch.isfinite(S).all(), name
            diag = r.method.self_score(r.params, state, r.train)
            full = r.method.score(r.params, state, r.train, r.train)
            torch.testing.assert_close(diag, torch.diagonal(full), rtol=1e-3, atol=1e-6,
                                       msg=name)
            if name == "if-explicit":
                ref = S
            elif name.startswith("if-"):
                corr = float(pearson(S.flatten().double(), ref.flatten().double()))
                assert corr > (0.999 if name == "if-cg" else 0.5), (name, corr)


def test_target_must_be_scalar():
    """A target returning a vector gets a clear error naming the contract."""
    params, loss, batch = PROBLEMS["logistic"](n=5)
    vector_target = lambda p, ex: p["W"] @ ex[0]
    m = influence(loss, solver="explicit", damping=0.1, target=vector_target)
    with pytest.raises(ValueError, match=r"expected a per-example function .* returning a 0-d"):
        m.score(params, m.prepare(params, batch), batch, batch)


def test_no_shared_mutable_configuration():
    """Two methods from the same factory keep their own settings; a caller's options dict can
    change afterwards without touching a built method; prepare returns a fresh state each time."""
    params, loss, batch = PROBLEMS["logistic"](n=8)
    opts = {"rtol": 1e-12, "max_iter": 200}
    a = influence(loss, solver="cg", damping=0.1, **opts)
    opts["max_iter"] = 1
    b = influence(loss, solver="cg", damping=10.0)
    sa = a.score(params, a.prepare(params, batch), batch, batch)
    ref = influence(loss, solver="explicit", damping=0.1)
    torch.testing.assert_close(sa, ref.score(params, ref.prepare(params, batch), batch, batch),
                               rtol=1e-8, atol=1e-10)
    sb = b.score(params, b.prepare(params, batch), batch, batch)
    assert not torch.allclose(sa, sb)
    assert a.prepare(params, batch) is not a.prepare(params, batch)
    g1, g2 = grad_dot(loss), grad_dot(loss, proj_dim=4)
    assert g1.score(params, (), batch, batch).shape == g2.score(params, (), batch, batch).shape


def test_trak_sizes():
    """trak_dim keeps four training examples per feature; trak_rows merges small models' batches
    and makes calls of >= 256 rows when R is too big to keep (regenerated per call)."""
    from dattri_fn.app.recipes import trak_dim, trak_rows

    assert [trak_dim(n, 512) for n in (10, 1000, 4000, 64000)] == [16, 250, 512, 512]
    assert trak_rows(2410, 256) == 435 and trak_rows(2410, 256, 512) == 435
    assert trak_rows(10**6, 33) == 33 and trak_rows(10**6, 33, 512) == 256
    assert trak_rows(10**6, 1000, 512) == 1000


@pytest.fixture
def one_thread():
    """train_model's one thread for the whole test: float32 sums in one order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("hparams", [{"optimizer": "sgd", "epochs": 3}, {"epochs": 20}])
def test_magic_recipe_replays_the_task_trainer(hparams, one_thread):
    """recipe('magic'/'magic-ens'): the run MAGIC differentiates ends at train_model(task, seed=c)
    (sgd: same order seed; full-batch Adam + cosine: the task's own step), bit for bit; scores
    [n_train, n_test] finite; magic-ens averages the per-model runs."""
    task = get_task("digits-mlp", n_train=40, n_test=4, seed=1, hparams=hparams)
    models = [train_model(task, seed=c) for c in range(2)]
    single = recipe("magic", task, models)
    ens = recipe("magic-ens", task, models)
    state = ens.method.prepare(ens.params, ens.train)
    for c, model in enumerate(models):
        for k, p in model.named_parameters():
            assert torch.equal(state.runs[c].params[k], p.detach()), k
    both = ens.method.score(ens.params, state, ens.train, ens.test)
    one = single.method.score(single.params, single.method.prepare(single.params, single.train),
                              single.train, single.test)
    assert both.shape == one.shape == (40, 4) and torch.isfinite(both).all()
    from dattri_fn.attribute.magic import MagicState

    second = single.method.score(ens.params[1:], MagicState(state.runs[1:], state.orders[1:]),
                                 ens.train, ens.test)
    torch.testing.assert_close(both, (one + second) / 2, rtol=1e-5, atol=1e-7)


def test_magic_recipe_refuses_lbfgs():
    """L-BFGS is not a fixed sequence of steps: recipe('magic') names the optimizer."""
    task = get_task("digits-lr", n_train=20, n_test=3)
    with pytest.raises(ValueError, match=r"recipe\('magic'\): expected a task trained by 'sgd'"):
        recipe("magic", task, [train_model(task)])


def test_ensemble_and_new_recipes(digits):
    """if-cg-ens = the mean of if-cg over the models, each with its own curvature; tracin-cos
    runs over every model; knn-shapley is refused on a sequence task by name."""
    task, models = digits["digits-mlp"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ens = recipe("if-cg-ens", task, models)
        S = ens.method.score(ens.params, ens.method.prepare(ens.params, ens.train), ens.train,
                             ens.test)
        singles = []
        for m in models:
            r = recipe("if-cg", task, [m])
            singles.append(r.method.score(r.params, r.method.prepare(r.params, r.train), r.train,
                                          r.test))
    ref = torch.stack(singles).mean(0)  # float32 models: bound relative to the scores' scale
    torch.testing.assert_close(S, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    tc = recipe("tracin-cos", task, models)
    assert len(tc.params) == len(models)
    lm = get_task("text-lm", n_train=4, n_test=2, seed=0)
    with pytest.raises(ValueError, match=r"recipe\('knn-shapley'\): expected a classification"):
        recipe("knn-shapley", lm, [train_model(lm, seed=0, epochs=1)])
