"""benchmarks.logra_scaling's ``lds`` pieces on toy sizes: the widened task spec and one row's step."""

import numpy as np
import torch

from benchmarks import logra_scaling as ls
from benchmarks.run import load_models, load_task, train_states
from dattri_fn.eval.tasks import VOCAB
from dattri_fn.model import functional_model


def test_lds_spec_widens_to_the_parameter_count():
    """--params p gives dim = _dim_for(p), hidden = 4 dim and the given trainer settings."""
    spec = ls._lds_spec(16, 4, 2e5, 4, 3e-3, 20)
    D = ls._dim_for(2e5, len(VOCAB), 32)
    assert spec["hparams"] == {"dim": D, "heads": 4, "hidden": 4 * D, "lr": 3e-3, "epochs": 20}
    task = load_task(spec)
    P = sum(p.numel() for p in task.make_model(0).parameters())
    assert P <= 2e5 < sum(p.numel() for p in load_task(
        {**spec, "hparams": {**spec["hparams"], "dim": D + 4, "hidden": 4 * D + 16}}
    ).make_model(0).parameters())
    assert ls._lds_spec(16, 4, None, 4, 3e-3, 20)["hparams"] is None


def test_lds_row_step_scores_the_trained_model():
    """A row's step returns prepare + score of its method on the trained parameters, bit for bit,
    and its feature width (d, or 5 layers x k^2)."""
    threads = torch.get_num_threads()
    try:
        spec = ls._lds_spec(8, 3, None, 4, 3e-3, 20)
        task = load_task(spec)
        state = train_states(task, 1)[0]
        for name, dim in (("grad-dot", 16), ("logra", 2)):
            out = ls._lds_row_setup(spec, state, name, dim, 1)()
            fm = functional_model(load_models(task, [state])[0], task.loss_fn)
            method = ls._row_method(name, fm, dim, 1)
            train = [(task.x_train, task.y_train)]
            want = method.score(fm.params, method.prepare(fm.params, train), train,
                                (task.x_test, task.y_test)).double().numpy()
            assert out["scores"].shape == (8, 3)
            np.testing.assert_array_equal(out["scores"], want)
            # LoGra's features: k x k per captured Linear layer (qkv, proj, fc1, fc2, head).
            assert out["cpu_s"] > 0 and out["width"] == (dim if name == "grad-dot" else 5 * dim * dim)
    finally:
        torch.set_num_threads(threads)


def test_lds_search_tables_from_kept_runs(tmp_path, capsys):
    """With every (row, seed) run kept, lds_search trains and spawns nothing and prints each row's
    LDS = mean over seeds of the per-test LDS of its kept scores, and LoGra - dense paired."""
    from dattri_fn.eval.metrics import lds
    from dattri_fn.eval.retrain import lds_ground_truth

    spec = ls._lds_spec(8, 3, None, 4, 3e-3, 20)
    gt = lds_ground_truth(load_task(spec), 4, cache_dir=tmp_path, progress=False)
    g = torch.Generator().manual_seed(0)
    runs = {(name, dim, seed): {"result": {"scores": torch.randn(8, 3, generator=g,
                                                                  dtype=torch.float64).numpy(),
                                           "time_s": 2.0 + seed, "cpu_s": 1.0 + seed, "width": dim},
                                "peak_mib": 10.0 * (seed + 1)}
            for name, dim in (("logra", 2), ("trak", 16)) for seed in (0, 1)}
    keep = str(tmp_path / "keep.pt")
    torch.save({"spec": spec, "m": 4, "states": None, "runs": runs}, keep)
    ls.lds_search(spec, 4, [16], [2], 2, cache_dir=tmp_path, names=["trak"], keep=keep)
    printed = capsys.readouterr().out

    def row_lds(name, dim):
        per = [lds(torch.from_numpy(runs[(name, dim, s)]["result"]["scores"]), gt.subsets,
                   gt.targets.double()).per_test for s in (0, 1)]
        return torch.stack(per).mean(0)

    for name, dim, label in (("logra", 2, "k=2"), ("trak", 16, "d=16")):
        mean = ls._mean_ci(row_lds(name, dim))[0]
        assert f"| {name} | {label} | {dim} | {mean:.3f} [" in printed
        assert "| 2.50 | 1.50 | 20 |" in printed  # mean wall and CPU time, the larger peak
    diff = ls._paired(row_lds("logra", 2), row_lds("trak", 16))[0]
    assert f"| trak d=16 | {diff:+.3f} [" in printed
    assert "attributed model" not in printed  # nothing was trained
