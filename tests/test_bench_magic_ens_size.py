"""benchmarks.magic_ens_size: each prefix of the per-run scores is recipe("magic-ens") on that many
models, bit for bit."""

import json

import pytest
import torch

from benchmarks import magic_ens_size


@pytest.mark.slow  # imports the eval stack (sklearn data) and runs MAGIC 2 + 3 times
def test_prefix_means_are_the_recipe_on_that_many_models(tmp_path):
    """digits-lr, 40 examples, 3 test points, 2 runs: run0 alone is recipe("magic") on model 0 and
    the mean of runs {0, 1} is recipe("magic-ens") on models 0-1, torch.equal; times are saved."""
    from dattri_fn.app.recipes import MAGIC_CHUNKS, magic_recipe

    argv = ["--task", "digits-lr", "--n-train", "40", "--n-test", "3", "--runs", "2"]
    magic_ens_size.main(argv + ["--runs-dir", str(tmp_path)])
    runs = [torch.load(tmp_path / f"run{c}.pt") for c in range(2)]
    times = json.loads((tmp_path / "times.json").read_text())
    assert times["runs"] == 2 and len(times["score_cpu_s"]) == 2 and times["prepare_cpu_s"] > 0

    task = magic_ens_size.load_task(magic_ens_size.parse_args(argv))
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    for p in (1, 2):
        method, params = magic_recipe(task, p, chunk_size=MAGIC_CHUNKS.get(task.name))
        want = method.score(params, method.prepare(params, data), data, test)
        got = magic_ens_size.prefix_mean(runs, p)
        assert got.shape == (40, 3)
        assert torch.equal(got, want), p
    assert not torch.equal(runs[0], runs[1])  # two different runs, not one scored twice


def test_bad_ground_truth_name_is_refused():
    with pytest.raises(SystemExit):
        magic_ens_size.parse_args(["--gt", "val,std-r2"])
    assert magic_ens_size.parse_args(["--task", "text-lm"]).m == 32
    assert magic_ens_size.parse_args(["--task", "digits-cnn"]).m == 64
