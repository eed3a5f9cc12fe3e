"""recipe("magic"/"magic-ens")'s per-task settings (stop 26): the runs averaged and the early exit
each run's reverse pass takes, by task name (MAGIC_RUNS, MAGIC_EXIT; chosen on a validation
ground truth, benchmarks/magic_config.py)."""

import importlib

import pytest
import torch

from dattri_fn.app.recipes import MAGIC_EXIT, MAGIC_RUNS, magic_recipe, recipe
from dattri_fn.attribute.metagradient import EARLY_EXIT
from dattri_fn.eval.tasks import get_task, train_model

# The module (dattri_fn.attribute re-exports the function magic under its name).
magic_module = importlib.import_module("dattri_fn.attribute.magic")


def calls(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every metagradient call MAGIC's score makes."""
    seen, real = [], magic_module.metagradient

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(magic_module, "metagradient", spy)
    return seen


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name,hparams", [("text-lm", {"epochs": 4}),
                                          ("digits-lr", {"optimizer": "sgd", "epochs": 2})])
def test_ensemble_takes_the_tasks_runs_and_early_exit(monkeypatch, one_thread, name, hparams):
    """recipe('magic-ens') on 3 models averages min(3, MAGIC_RUNS[task]) runs, each reverse pass
    with MAGIC_EXIT[task] (else every model and EARLY_EXIT), and equals magic_recipe on that many
    runs with that rule, torch.equal; recipe('magic') takes the same rule on one run."""
    task = get_task(name, n_train=12, n_test=2, seed=0, hparams=hparams)
    models = [train_model(task, seed=c) for c in range(3)]
    runs = min(3, MAGIC_RUNS.get(name, 3))
    rule = MAGIC_EXIT.get(name, EARLY_EXIT)
    for method_name, want_runs in (("magic-ens", runs), ("magic", 1)):
        r = recipe(method_name, task, models)
        assert len(r.params) == want_runs
        seen = calls(monkeypatch)
        got = r.method.score(r.params, r.method.prepare(r.params, r.train), r.train, r.test)
        monkeypatch.undo()
        assert len(seen) == want_runs
        assert all(kw["early_exit"] == rule and kw["horizon"] == "band" for kw in seen)
        method, params = magic_recipe(task, want_runs, early_exit=rule)
        want = method.score(params, method.prepare(params, r.train), r.train, r.test)
        assert torch.equal(got, want)


def test_settings_are_valid_rules():
    """Every per-task rule passes the library's own check and every run count is >= 1."""
    from dattri_fn.attribute.metagradient import _check_early_exit

    for name, rule in MAGIC_EXIT.items():
        assert _check_early_exit("test", rule, "band") == rule, name
    assert all(isinstance(v, int) and v >= 1 for v in MAGIC_RUNS.values())


def test_cnn_recipe_takes_the_tasks_chunk_size(monkeypatch, one_thread):
    """recipe('magic-ens') on digits-cnn vmaps its targets in chunks of MAGIC_CHUNKS['digits-cnn']
    (patched to 3 here, which does not divide the 7 targets); the scores equal all targets at
    once to float32 reordering (a chunk only changes the batched GEMM/conv shapes; on the bundled
    run chunks of 25 and 10 gave torch.equal scores, benchmarks/magic_chunks.py --full).
    Mutation: recipe() passing chunk_size=None -> fails."""
    from dattri_fn.app.recipes import MAGIC_CHUNKS
    from dattri_fn.eval.tasks import SGD_HPARAMS

    task = get_task("digits-cnn", n_train=16, n_test=7, seed=0,
                    hparams=dict(SGD_HPARAMS, epochs=1, batch_size=8))
    models = [train_model(task, seed=c) for c in range(2)]
    monkeypatch.setitem(MAGIC_CHUNKS, "digits-cnn", 3)
    r = recipe("magic-ens", task, models)
    seen = calls(monkeypatch)
    got = r.method.score(r.params, r.method.prepare(r.params, r.train), r.train, r.test)
    monkeypatch.undo()
    assert [kw["chunk_size"] for kw in seen] == [3, 3]
    method, params = magic_recipe(task, 2, chunk_size=None)
    want = method.score(params, method.prepare(params, r.train), r.train, r.test)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
